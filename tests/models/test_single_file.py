"""BFL <-> diffusers key conversion and single-file transformer loading, on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from safetensors.torch import save_file

from models.single_file import BFL_PREFIX, bfl_to_diffusers, diffusers_to_bfl, looks_like_bfl
from models.weights import WeightsError, resolve_model
from models.weights.load import load_components


@pytest.fixture(scope="module")
def transformer(tiny_model_dir: Path) -> FluxTransformer2DModel:
    return FluxTransformer2DModel.from_pretrained(
        tiny_model_dir / "transformer", local_files_only=True
    ).eval()


@pytest.fixture(scope="module")
def diffusers_state(transformer: FluxTransformer2DModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in transformer.state_dict().items()}


def transformer_inputs(config) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    seq, txt = 16, 8
    return {
        "hidden_states": torch.randn(1, seq, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, txt, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.stack(
            torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1
        ).reshape(seq, 3),
        "txt_ids": torch.zeros(txt, 3),
        "return_dict": False,
    }


@pytest.mark.parametrize("prefix", ["", BFL_PREFIX])
def test_round_trip_is_exact(diffusers_state: dict[str, torch.Tensor], prefix: str) -> None:
    bfl = diffusers_to_bfl(diffusers_state, prefix=prefix)
    assert looks_like_bfl(bfl)
    assert all(k.startswith(prefix) for k in bfl)
    back = bfl_to_diffusers(bfl)
    assert back.keys() == diffusers_state.keys()
    for key, tensor in diffusers_state.items():
        assert torch.equal(back[key], tensor), key


def test_bfl_layout_fuses_projections(diffusers_state: dict[str, torch.Tensor], transformer) -> None:
    bfl = diffusers_to_bfl(diffusers_state)
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    assert bfl["double_blocks.0.img_attn.qkv.weight"].shape == (3 * inner, inner)
    assert bfl["double_blocks.0.txt_attn.qkv.bias"].shape == (3 * inner,)
    mlp = diffusers_state["single_transformer_blocks.0.proj_mlp.weight"].shape[0]
    assert bfl["single_blocks.1.linear1.weight"].shape == (3 * inner + mlp, inner)
    assert "guidance_in.in_layer.weight" in bfl
    assert not any(k.startswith(("transformer_blocks", "single_transformer_blocks")) for k in bfl)
    # BFL's final modulation is (shift, scale): the halves are swapped relative to diffusers.
    scale, shift = diffusers_state["norm_out.linear.bias"].chunk(2)
    assert torch.equal(bfl["final_layer.adaLN_modulation.1.bias"], torch.cat([shift, scale]))


def test_matches_diffusers_stock_converter(diffusers_state: dict[str, torch.Tensor]) -> None:
    """Same result as diffusers' converter, which only works at FLUX's full hidden size (3072).

    The single blocks' linear1 is replaced by full-size meta tensors (no memory), so the stock
    converter can split it; every other tensor is the tiny model's and must match exactly.
    """
    bfl = diffusers_to_bfl(diffusers_state, prefix=BFL_PREFIX)
    full_rows = 3 * 3072 + 4 * 3072
    for key in [k for k in bfl if ".linear1." in k]:
        shape = (full_rows, 3072) if key.endswith("weight") else (full_rows,)
        bfl[key] = torch.empty(shape, device="meta")
    stock = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    ours = bfl_to_diffusers(bfl)
    assert ours.keys() == stock.keys()
    for key, tensor in stock.items():
        if tensor.is_meta:
            assert ours[key].shape == tensor.shape, key
        else:
            assert torch.equal(ours[key], tensor), key


def test_unknown_keys_are_rejected(diffusers_state: dict[str, torch.Tensor]) -> None:
    bfl = diffusers_to_bfl(diffusers_state)
    bfl["double_blocks.0.img_attn.lora_up.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="lora_up"):
        bfl_to_diffusers(bfl)


def write_single_file(path: Path, state: dict[str, torch.Tensor], dtype: torch.dtype, prefix: str) -> Path:
    bfl = diffusers_to_bfl(state, prefix=prefix)
    # An all-in-one checkpoint also holds other models' keys; only the prefixed ones count.
    extra = {"vae.decoder.conv_in.weight": torch.zeros(2)} if prefix else {}
    save_file({k: v.to(dtype).contiguous() for k, v in {**bfl, **extra}.items()}, str(path))
    return path


@pytest.mark.parametrize(
    ("storage", "prefix"),
    [(torch.float32, ""), (torch.bfloat16, ""), (torch.float8_e4m3fn, ""), (torch.bfloat16, BFL_PREFIX)],
    ids=["fp32", "bf16", "fp8", "bf16-prefixed"],
)
def test_single_file_loads_through_resolve_and_load(
    tmp_path: Path,
    tiny_model_dir: Path,
    transformer: FluxTransformer2DModel,
    diffusers_state: dict[str, torch.Tensor],
    storage: torch.dtype,
    prefix: str,
) -> None:
    path = write_single_file(tmp_path / "flux1-tiny.safetensors", diffusers_state, storage, prefix)
    spec = resolve_model(str(path), data_dir=tmp_path, components_dir=tiny_model_dir)
    assert (spec.kind, spec.transformer_file, spec.folder) == ("single-file", path, tiny_model_dir)

    loaded = load_components(spec, dtype=torch.float32).transformer
    assert loaded.dtype == torch.float32
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    state = loaded.state_dict()
    for key, tensor in diffusers_state.items():
        # The file's precision, upcast: exactly the original rounded to the storage dtype.
        assert torch.equal(state[key], tensor.to(storage).to(torch.float32)), key
    if storage == torch.float32:
        inputs = transformer_inputs(transformer.config)
        with torch.no_grad():
            assert torch.equal(loaded(**inputs)[0], transformer(**inputs)[0])


def test_single_file_in_diffusers_layout_loads(
    tmp_path: Path, tiny_model_dir: Path, diffusers_state: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "diffusers-layout.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in diffusers_state.items()}, str(path))
    spec = resolve_model(str(path), data_dir=tmp_path, components_dir=tiny_model_dir)
    loaded = load_components(spec, dtype=torch.bfloat16).transformer
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(
        loaded.state_dict()["x_embedder.weight"], diffusers_state["x_embedder.weight"].bfloat16()
    )


def test_single_file_of_another_size_fails_clearly(
    tmp_path: Path, tiny_model_dir: Path, diffusers_state: dict[str, torch.Tensor]
) -> None:
    state = dict(diffusers_state)
    del state["single_transformer_blocks.1.proj_out.weight"]
    path = write_single_file(tmp_path / "partial.safetensors", state, torch.bfloat16, "")
    spec = resolve_model(str(path), data_dir=tmp_path, components_dir=tiny_model_dir)
    with pytest.raises(WeightsError, match=r"partial\.safetensors.*missing.*single_transformer_blocks\.1"):
        load_components(spec, dtype=torch.float32)


def test_single_file_needs_components_dir(tmp_path: Path, diffusers_state: dict[str, torch.Tensor]) -> None:
    path = write_single_file(tmp_path / "flux.safetensors", diffusers_state, torch.bfloat16, "")
    with pytest.raises(WeightsError, match=r"single-file transformer.*folder"):
        resolve_model(str(path), data_dir=tmp_path)


def test_single_file_without_flux_keys_is_rejected(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = tmp_path / "unet.safetensors"
    save_file({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(WeightsError, match=r"unet\.safetensors does not look like a FLUX transformer"):
        resolve_model(str(path), data_dir=tmp_path, components_dir=tiny_model_dir)


def test_scaled_fp8_checkpoint_is_rejected_at_resolve(
    tmp_path: Path, tiny_model_dir: Path, diffusers_state: dict[str, torch.Tensor]
) -> None:
    bfl = diffusers_to_bfl(diffusers_state, prefix=BFL_PREFIX)
    bfl[BFL_PREFIX + "scaled_fp8"] = torch.zeros(0)
    bfl[BFL_PREFIX + "img_in.scale_weight"] = torch.ones(1)
    path = tmp_path / "scaled.safetensors"
    save_file({k: v.contiguous() for k, v in bfl.items()}, str(path))
    with pytest.raises(WeightsError, match=r"scaled\.safetensors is a scaled-fp8 checkpoint"):
        resolve_model(str(path), data_dir=tmp_path, components_dir=tiny_model_dir)
