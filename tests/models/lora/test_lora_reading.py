"""Every way a LoRA file can be wrong: a LoraError that names the LoRA and the problem."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models.lora import LoraError, LoraLimits, LoraSpec
from models.lora.reading import read_lora
from models.runtime import FluxRuntime


def read(runtime: FluxRuntime, path: Path, **limits: int):
    return read_lora(
        LoraSpec("studio/style.safetensors", path),
        transformer=runtime.pipe.transformer,
        text_encoder=runtime.pipe.text_encoder,
        limits=LoraLimits(**limits),
        dtype=torch.float32,
    )


def problem(runtime: FluxRuntime, path: Path, **limits: int) -> str:
    with pytest.raises(LoraError) as caught:
        read(runtime, path, **limits)
    assert caught.value.lora == "studio/style.safetensors"
    assert str(caught.value).startswith("LoRA 'studio/style.safetensors': ")
    return caught.value.problem


def test_each_layout_reads_into_diffusers_keys(
    lora_runtime: FluxRuntime, lora_file: Callable[..., Path]
) -> None:
    for layout in ("diffusers", "kohya", "xlabs"):
        lora = read(lora_runtime, lora_file(layout, layout=layout, seed=11))
        assert lora.rank == 4
        assert all(k.startswith("transformer.") for k in lora.state_dict)
        assert "transformer.transformer_blocks.0.attn.to_q" in lora.targets
    kohya = read(lora_runtime, lora_file("kohya", layout="kohya", seed=11))
    assert "transformer.single_transformer_blocks.1.proj_out" in kohya.targets


def test_not_safetensors(lora_runtime: FluxRuntime, tmp_path: Path) -> None:
    for content in (b"", b"PK\x03\x04 a zip, maybe a pickle", struct.pack("<Q", 10**9) + b"{}"):
        path = tmp_path / "x.safetensors"
        path.write_bytes(content)
        assert problem(lora_runtime, path) == "is not a safetensors file"
    header = b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}'
    (tmp_path / "short.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    assert "is not a readable safetensors file" in problem(lora_runtime, tmp_path / "short.safetensors")


def test_missing_file(lora_runtime: FluxRuntime, tmp_path: Path) -> None:
    assert "the file cannot be read" in problem(lora_runtime, tmp_path / "gone.safetensors")


def test_too_large(lora_runtime: FluxRuntime, lora_file: Callable[..., Path]) -> None:
    text = problem(lora_runtime, lora_file("a", seed=1), max_file_bytes=1000)
    assert "above this server's limit of 0.0 MB per LoRA" in text


def test_rank_above_the_limit(lora_runtime: FluxRuntime, lora_file: Callable[..., Path]) -> None:
    assert problem(lora_runtime, lora_file("rank16", seed=3, rank=16), max_rank=8) == (
        "has rank 16, above this server's limit of 8"
    )


def test_shapes_of_another_model(lora_runtime: FluxRuntime, tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    save_file(
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4),
        },
        str(path),
    )
    text = problem(lora_runtime, path)
    assert text.startswith(
        "does not fit this model: transformer layer 'transformer_blocks.0.attn.to_q' is 32->32"
    )


def test_layers_this_model_does_not_have(lora_runtime: FluxRuntime, tmp_path: Path) -> None:
    path = tmp_path / "deep.safetensors"
    save_file(
        {
            "transformer.transformer_blocks.7.attn.to_q.lora_A.weight": torch.zeros(4, 32),
            "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": torch.zeros(32, 4),
        },
        str(path),
    )
    assert "'transformer_blocks.7.attn.to_q', which does not exist" in problem(lora_runtime, path)


def test_a_kohya_lora_made_for_full_size_flux(lora_runtime: FluxRuntime, tmp_path: Path) -> None:
    path = tmp_path / "full.safetensors"
    save_file(
        {
            "lora_unet_single_blocks_0_linear1.lora_down.weight": torch.zeros(4, 3072),
            "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.zeros(21504, 4),
            "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(4.0),
        },
        str(path),
    )
    # diffusers' converter splits it with FLUX's widths; the result fits no layer of this model.
    assert problem(lora_runtime, path).startswith("does not fit this model: transformer layer")


def test_not_a_lora(lora_runtime: FluxRuntime, tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    save_file({"transformer.x_embedder.weight": torch.zeros(32, 64)}, str(path))
    assert "cannot apply" in problem(lora_runtime, path) or "not a FLUX LoRA" in problem(lora_runtime, path)
    ints = tmp_path / "ints.safetensors"
    save_file({"transformer.x_embedder.lora_A.weight": torch.zeros(4, 64, dtype=torch.int64)}, str(ints))
    assert problem(lora_runtime, ints) == "is not a LoRA: it holds non-float tensors"


def test_half_a_lora_and_bad_values(lora_runtime: FluxRuntime, tmp_path: Path) -> None:
    half = tmp_path / "half.safetensors"
    save_file({"transformer.x_embedder.lora_A.weight": torch.zeros(4, 64)}, str(half))
    assert problem(lora_runtime, half) == "has only half of the LoRA for transformer layer 'x_embedder'"
    nan = tmp_path / "nan.safetensors"
    save_file(
        {
            "transformer.x_embedder.lora_A.weight": torch.full((4, 64), float("nan")),
            "transformer.x_embedder.lora_B.weight": torch.zeros(32, 4),
        },
        str(nan),
    )
    assert problem(lora_runtime, nan).startswith("contains NaN or infinite values")


def test_a_t5_lora(lora_runtime: FluxRuntime, tmp_path: Path) -> None:
    path = tmp_path / "t5.safetensors"
    save_file(
        {
            "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": torch.zeros(4, 32),
            "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight": torch.zeros(32, 4),
        },
        str(path),
    )
    assert "cannot apply" in problem(lora_runtime, path)


def test_mixed_ranks_and_alphas_are_normalised(lora_runtime: FluxRuntime, tmp_path: Path) -> None:
    """Ranks are zero-padded to the largest and alphas folded in: one plain scaling for all."""
    path = tmp_path / "mixed.safetensors"
    down2, up2 = torch.randn(2, 64), torch.randn(32, 2)
    save_file(
        {
            "transformer.x_embedder.lora_A.weight": down2,
            "transformer.x_embedder.lora_B.weight": up2,
            "transformer.x_embedder.alpha": torch.tensor(1.0),
            "transformer.proj_out.lora_A.weight": torch.randn(6, 32),
            "transformer.proj_out.lora_B.weight": torch.randn(64, 6),
        },
        str(path),
    )
    lora = read(lora_runtime, path)
    assert lora.rank == 6
    a = lora.state_dict["transformer.x_embedder.lora_A.weight"]
    b = lora.state_dict["transformer.x_embedder.lora_B.weight"]
    assert a.shape == (6, 64) and b.shape == (32, 6)
    torch.testing.assert_close(b @ a, (up2 @ down2) * 0.5)  # alpha 1 / rank 2


def test_header_parsing_accepts_real_files(lora_runtime: FluxRuntime, lora_file: Callable[..., Path]) -> None:
    path = lora_file("a", seed=1)
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert isinstance(json.loads(raw[8 : 8 + length]), dict)
    assert read(lora_runtime, path).nbytes > 0
