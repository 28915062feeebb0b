"""Load the components a checked `ModelSpec` names, from local files only."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.weights.check import ModelSpec, WeightsError
from models.weights.offline import enforce_offline

if TYPE_CHECKING:
    import torch


@dataclass
class LoadedComponents:
    transformer: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any
    scheduler: Any
    redux_image_encoder: Any = None
    redux_feature_extractor: Any = None
    redux_image_embedder: Any = None

    def pipeline_kwargs(self) -> dict[str, Any]:
        """The seven components FluxPipeline (and FluxImg2ImgPipeline) take."""
        return {
            "transformer": self.transformer,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
            "tokenizer": self.tokenizer,
            "tokenizer_2": self.tokenizer_2,
            "scheduler": self.scheduler,
        }


def load_single_file_transformer(
    path: Path, config_dir: Path | None, *, dtype: torch.dtype, config: Mapping[str, Any] | None = None
) -> Any:
    """Build FluxTransformer2DModel from `config_dir`'s config (or `config` itself: a variant
    takes the loaded base's, with its own input width) and the file's tensors.

    Any storage dtype (bf16, fp16, fp32, float8_e4m3fn) is cast to `dtype`.
    """
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    from models.single_file import bfl_to_diffusers, looks_like_bfl, strip_prefix

    try:
        raw = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise WeightsError(f"cannot read the transformer file {path}: {exc}") from exc
    try:
        state = bfl_to_diffusers(raw) if looks_like_bfl(raw) else strip_prefix(raw)
    except ValueError as exc:
        raise WeightsError(f"{path}: {exc}") from exc
    del raw
    state = {k: v.to(dtype) for k, v in state.items()}

    if config is None:
        assert config_dir is not None
        config = FluxTransformer2DModel.load_config(str(config_dir), local_files_only=True)
    where = config_dir if config_dir is not None else "the base model's transformer config"
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise WeightsError(
            f"{path} does not match {where}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # shape mismatch: a file for another model size
        raise WeightsError(f"{path} does not match {where}: {exc}") from exc
    # Every tensor was cast to dtype above and assigned as is: no .to(dtype) pass needed.
    return model.eval()


def load_components(spec: ModelSpec, *, dtype: torch.dtype, device: str = "cpu") -> LoadedComponents:
    """Load every component of `spec` from local files, cast to `dtype`.

    Files load on the CPU (the memory plan places them afterwards); `device` is where weights
    made at load time, with no file behind them, are made."""
    enforce_offline()
    if spec.kind == "synthetic":
        from models.tiny import ensure_tiny
        from models.weights.synthetic import build_components

        assert spec.synthetic is not None
        return build_components(spec.synthetic, ensure_tiny(spec.folder.parent), device=device, dtype=dtype)
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

    folder = spec.folder
    local = {"local_files_only": True}
    if spec.kind == "single-file":
        assert spec.transformer_file is not None
        transformer = load_single_file_transformer(spec.transformer_file, folder / "transformer", dtype=dtype)
    else:
        transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer", dtype=dtype, **local)
    components = LoadedComponents(
        transformer=transformer,
        vae=AutoencoderKL.from_pretrained(folder / "vae", dtype=dtype, **local),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype, **local),
        text_encoder_2=T5EncoderModel.from_pretrained(folder / "text_encoder_2", dtype=dtype, **local),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer", **local),
        tokenizer_2=T5Tokenizer.from_pretrained(folder / "tokenizer_2", **local),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler", **local),
    )
    if spec.redux_dir is not None:
        from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
        from transformers import SiglipImageProcessor, SiglipVisionModel

        redux = spec.redux_dir
        components.redux_image_encoder = SiglipVisionModel.from_pretrained(
            redux / "image_encoder", dtype=dtype, **local
        )
        components.redux_feature_extractor = SiglipImageProcessor.from_pretrained(
            redux / "feature_extractor", **local
        )
        components.redux_image_embedder = ReduxImageEncoder.from_pretrained(
            redux / "image_embedder", dtype=dtype, **local
        )
    return components
