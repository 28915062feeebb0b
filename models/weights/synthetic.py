"""`--model synthetic`: the full FLUX.1 [dev] architecture with random weights, made at load.

For capacity planning and load tests before real weights arrive: every matrix product has
the real size, so time, memory, presets, memory plans and warm-up behave as with the real
model, while the images are noise. Nothing is downloaded and no file is written: the
weights are made directly on the device in bf16 (never in fp32 first), from a fixed seed.
Tokenizers and the scheduler come from the tiny model (only token ids matter, and every id
of the tiny vocabularies is below the full ones). There is no safety checker.

    synthetic                                         the real sizes (transformer ~11.9 B)
    synthetic:layers=1,single_layers=1,t5_layers=1    the same widths, fewer blocks (CPU tests)

Overrides: `layers` (double-stream blocks, 19), `single_layers` (single-stream blocks, 38),
`t5_layers` (T5-XXL encoder layers, 24), `clip_layers` (CLIP-L text layers, 12) and
`siglip_layers` (the redux image encoder's layers, 27). Parsing is torch-free (the
supervisor's preflight runs it); building imports torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.weights.synthetic_spec import (
    CLIP,
    SIGLIP,
    T5,
    VAE,
    SyntheticSpec,
    is_synthetic,
    parse_synthetic,
)

if TYPE_CHECKING:
    import torch

    from models.weights.load import LoadedComponents

__all__ = ["SyntheticSpec", "build_components", "build_transformer", "is_synthetic", "parse_synthetic"]


@contextmanager
def materialised_on(device: str, dtype: torch.dtype) -> Iterator[None]:
    """Modules built inside are created on `device` in `dtype` and initialised there, in place:
    a 12 B transformer never exists in fp32 or on another device first."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_transformer(spec: SyntheticSpec, *, device: str, dtype: torch.dtype) -> Any:
    from diffusers import FluxTransformer2DModel

    with materialised_on(device, dtype):
        return FluxTransformer2DModel(**spec.transformer_config()).eval()


def build_components(
    spec: SyntheticSpec, tiny_dir: Path, *, device: str, dtype: torch.dtype, redux: bool = True
) -> LoadedComponents:
    """Every FLUX.1 [dev] component at full width, random weights from seed 0, on `device`."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
        T5Config,
        T5EncoderModel,
        T5Tokenizer,
    )

    from models.weights.load import LoadedComponents

    local = {"local_files_only": True}
    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer", model_max_length=77, **local)
    eos = tokenizer.eos_token_id  # CLIP pools the hidden state at this id: it must be the tokenizer's
    torch.manual_seed(0)
    transformer = build_transformer(spec, device=device, dtype=dtype)
    with materialised_on(device, dtype):
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                **CLIP,
                num_hidden_layers=spec.clip_layers,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=eos,
                pad_token_id=eos,
            )
        )
        text_encoder_2 = T5EncoderModel(T5Config(**T5, num_layers=spec.t5_layers))
        vae = AutoencoderKL(**VAE)
    components = LoadedComponents(
        transformer=transformer,
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=T5Tokenizer.from_pretrained(tiny_dir / "tokenizer_2", **local),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_dir / "scheduler", **local),
    )
    if redux:
        with materialised_on(device, dtype):
            components.redux_image_encoder = SiglipVisionModel(
                SiglipVisionConfig(**SIGLIP, num_hidden_layers=spec.siglip_layers)
            ).eval()
            components.redux_image_embedder = ReduxImageEncoder(
                redux_dim=SIGLIP["hidden_size"], txt_in_features=T5["d_model"]
            ).eval()
        size = SIGLIP["image_size"]
        components.redux_feature_extractor = SiglipImageProcessor(size={"height": size, "width": size})
    return components


def parameter_count(spec: SyntheticSpec) -> int:
    """The transformer's parameters, counted on the meta device (nothing is allocated)."""
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**spec.transformer_config())
    return sum(p.numel() for p in model.parameters())
