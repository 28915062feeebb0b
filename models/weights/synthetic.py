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
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from models.weights.load import LoadedComponents

PREFIX = "synthetic"
MAX_LAYERS = 64

TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
T5 = dict(
    d_model=4096,
    d_ff=10240,
    d_kv=64,
    num_heads=64,
    vocab_size=32128,
    feed_forward_proj="gated-gelu",
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
CLIP = dict(
    hidden_size=768,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=77,
    vocab_size=49408,
    projection_dim=768,
    hidden_act="quick_gelu",
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
# The redux image encoder: SigLIP so400m at 384 px, patch 14 (what FLUX.1 Redux uses).
SIGLIP = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
)


@dataclass(frozen=True)
class SyntheticSpec:
    """Block counts of a synthetic model; the defaults are FLUX.1 [dev]'s."""

    layers: int = 19
    single_layers: int = 38
    t5_layers: int = 24
    clip_layers: int = 12
    siglip_layers: int = 27

    @property
    def name(self) -> str:
        changed = [
            f"{f.name}={getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name) != f.default
        ]
        return PREFIX + (":" + ",".join(changed) if changed else "")

    def transformer_config(self) -> dict[str, Any]:
        return {**TRANSFORMER, "num_layers": self.layers, "num_single_layers": self.single_layers}


def is_synthetic(model: str) -> bool:
    return model == PREFIX or model.startswith(PREFIX + ":")


def parse_synthetic(model: str) -> SyntheticSpec:
    """`synthetic[:key=N,...]` -> SyntheticSpec; ValueError naming the bad part."""
    if not is_synthetic(model):
        raise ValueError(f"{model!r} is not a synthetic model name (synthetic[:key=N,...])")
    spec = SyntheticSpec()
    known = [f.name for f in fields(SyntheticSpec)]
    overrides = model[len(PREFIX) + 1 :]
    for item in filter(None, (part.strip() for part in overrides.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise ValueError(f"synthetic override {item!r}: expected one of {', '.join(known)} as key=N")
        if not value.strip().isdigit() or not 1 <= int(value) <= MAX_LAYERS:
            raise ValueError(f"synthetic override {item!r}: the value must be a whole number 1..{MAX_LAYERS}")
        spec = replace(spec, **{key: int(value)})
    return spec


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
