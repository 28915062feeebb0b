"""A tiny, random, dev-style FLUX.1 pipeline that every test can run on a CPU.

`ensure_tiny(data_dir)` builds it once into `data_dir / "tiny-flux"` (about 1.6 MB, a few
seconds) and returns the folder. It is an ordinary diffusers folder (`FluxPipeline`, guidance
embedding on, FLUX dev's scheduler) plus tiny redux parts in `tiny-flux/redux/`. The build is
byte-identical every time: weights come from fixed seeds and both tokenizers are constructed
from a fixed text by deterministic rules (no trainer that breaks ties at random), so a test
that compares image bytes across machines with the same library versions stays meaningful.

`build_tiny_safety_checker(path, flag=...)` writes a tiny image classifier that always (or
never) labels an image "nsfw", to prove the black-out path.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

TINY_DIRNAME = "tiny-flux"
# Bump when the build changes: an existing folder with another stamp is rebuilt.
TINY_BUILD_VERSION = "2"
_STAMP_FILE = "tiny-build.json"

# Sizes: T5 d_model and CLIP hidden are both 32, matching the transformer's
# joint_attention_dim and pooled_projection_dim.
TEXT_WIDTH = 32
CLIP_MAX_LENGTH = 77
BPE_MERGES = 400
SIGLIP_HIDDEN = 32

_CORPUS = """
A photograph of a cat sitting on a red chair near the window, soft morning light.
A painting of a mountain lake at sunset with pine trees and a small wooden boat.
An astronaut riding a horse on the moon, highly detailed, digital art, 4k.
A bowl of fresh fruit on a kitchen table: apples, oranges, bananas and grapes.
Portrait of an old man with a white beard, studio lighting, black and white photo.
A city street at night in the rain, neon signs reflecting in the puddles.
A cozy living room with a fireplace, a green sofa and books on the shelves.
A watercolor illustration of a fox in a snowy forest, children's book style.
Close-up of a blue butterfly on a yellow flower in a sunny garden.
A futuristic car driving through the desert, cinematic, wide angle lens.
The quick brown fox jumps over the lazy dog. The five boxing wizards jump quickly.
A logo for a coffee shop with the text "Morning Brew" in elegant letters.
Aerial view of a beach with turquoise water, white sand and palm trees.
A dragon flying over a medieval castle, fantasy art, dramatic clouds.
A plate of pasta with tomato sauce and basil, food photography, shallow depth of field.
Two dogs playing in the park with a ball, happy, summer afternoon.
An ancient temple in the jungle covered with vines and moss, mysterious atmosphere.
A robot reading a newspaper in a cafe, 3d render, pastel colors.
Snow covered village in the mountains at dawn, smoke rising from the chimneys.
A sailing ship on a stormy sea, oil painting, dark and moody, large waves.
"""


# --------------------------------------------------------------------------- tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE in CLIP's layout, merges learned greedily from `_CORPUS`.

    Ties between equally frequent pairs go to the lexicographically smallest pair, so the
    result never changes. All 256 bytes (with and without the end-of-word suffix) are in the
    vocabulary, so no input ever maps to the unknown token.
    """
    byte_chars = _bytes_to_unicode()
    alphabet = [byte_chars[b] for b in sorted(byte_chars)]
    vocab_list = alphabet + [c + "</w>" for c in alphabet]

    words = Counter(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", _CORPUS.lower()))
    segmented: dict[tuple[str, ...], int] = {}
    for word, count in words.items():
        symbols = [byte_chars[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        segmented[tuple(symbols)] = count

    merges: list[tuple[str, str]] = []
    for _ in range(BPE_MERGES):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in segmented.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        vocab_list.append(best[0] + best[1])
        segmented = {_merge(symbols, best): count for symbols, count in segmented.items()}

    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab_list)}, merges


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def _t5_unigram_vocab() -> list[tuple[str, float]]:
    """A sentencepiece-style Unigram vocabulary in T5's layout (pad 0, eos 1, unk 2).

    Whole corpus words carry their log frequency; every printable ASCII character (alone and
    word-initial) is a low-scoring fallback, so ASCII text never needs the unknown token.
    """
    words = Counter(re.findall(r"\S+", _CORPUS))
    total = sum(words.values())
    scored: dict[str, float] = {"▁": -2.0}
    for word, count in words.items():
        scored["▁" + word] = round(math.log(count / total), 4)
    for code in range(33, 127):
        char = chr(code)
        scored.setdefault(char, -12.0)
        scored.setdefault("▁" + char, -11.0)
    pieces = sorted(scored.items(), key=lambda item: (-item[1], item[0]))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(99, -1, -1)]
    return vocab


def _save_tokenizers(root: Path) -> tuple[dict[str, int], int]:
    """Write tokenizer/ (CLIP) and tokenizer_2/ (T5); return CLIP's vocab and T5's size."""
    from transformers import CLIPTokenizer, T5Tokenizer

    vocab, merges = _clip_vocab_and_merges()
    clip = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)
    clip.save_pretrained(root / "tokenizer")

    t5 = T5Tokenizer(vocab=_t5_unigram_vocab(), model_max_length=512)
    t5.save_pretrained(root / "tokenizer_2")
    return vocab, len(t5)


# --------------------------------------------------------------------------- models


def _build_pipeline(root: Path) -> None:
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5Tokenizer,
    )

    clip_vocab, t5_vocab_size = _save_tokenizers(root)
    eos_id = clip_vocab["<|endoftext|>"]

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,
        pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_vocab),
            hidden_size=TEXT_WIDTH,
            intermediate_size=64,
            projection_dim=TEXT_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CLIP_MAX_LENGTH,
            hidden_act="quick_gelu",
            bos_token_id=clip_vocab["<|startoftext|>"],
            eos_token_id=eos_id,  # pooling picks the hidden state at this token
            pad_token_id=eos_id,
        )
    )
    torch.manual_seed(2)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=t5_vocab_size,
            d_model=TEXT_WIDTH,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    torch.manual_seed(3)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    # FLUX.1 [dev]'s published scheduler_config.json.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True),
        tokenizer_2=T5Tokenizer.from_pretrained(root / "tokenizer_2", local_files_only=True),
    )
    pipe.save_pretrained(root, safe_serialization=True)


def _build_redux(root: Path) -> None:
    import torch
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(4)
    encoder = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=SIGLIP_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
    )
    encoder.save_pretrained(root / "image_encoder", safe_serialization=True)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "feature_extractor")
    torch.manual_seed(5)
    embedder = ReduxImageEncoder(redux_dim=SIGLIP_HIDDEN, txt_in_features=TEXT_WIDTH)
    embedder.save_pretrained(root / "image_embedder", safe_serialization=True)


def _build_into(root: Path) -> None:
    _build_pipeline(root)
    _build_redux(root / "redux")
    stamp = {"builder": "flux-server models.tiny", "version": TINY_BUILD_VERSION}
    (root / _STAMP_FILE).write_text(json.dumps(stamp, sort_keys=True) + "\n")


def _is_current(folder: Path) -> bool:
    try:
        stamp = json.loads((folder / _STAMP_FILE).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("version") == TINY_BUILD_VERSION


def ensure_tiny(data_dir: Path) -> Path:
    """Return `data_dir / "tiny-flux"`, building it first if it is missing or outdated.

    Safe with several processes at once: each builds in a private temporary folder next to
    the target and renames it into place; whoever renames first wins and the others discard
    their copy (the builds are identical anyway).
    """
    data_dir = Path(data_dir)
    target = data_dir / TINY_DIRNAME
    if _is_current(target):
        return target
    data_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{TINY_DIRNAME}-build-", dir=data_dir))
    try:
        _build_into(staging)
        if target.exists() and not _is_current(target):
            # An older build: move it aside atomically, then delete it.
            stale = Path(tempfile.mkdtemp(prefix=f".{TINY_DIRNAME}-stale-", dir=data_dir))
            with contextlib.suppress(FileNotFoundError):  # another process moved it already
                os.rename(target, stale / TINY_DIRNAME)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(staging, target)
        except OSError:
            if not _is_current(target):
                raise
            # Another process finished first; its folder is identical to ours.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- safety checker


def build_tiny_safety_checker(path: Path, *, flag: bool) -> Path:
    """Write a tiny image classifier with labels normal/nsfw into `path` and return it.

    Its classifier weights are zero and the bias favours "nsfw" (flag=True) or "normal"
    (flag=False), so every image gets the same verdict. Loads offline with
    `transformers.pipeline("image-classification", model=path)`.
    """
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    path = Path(path)
    torch.manual_seed(6)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=2,
        id2label={0: "normal", 1: "nsfw"},
        label2id={"normal": 0, "nsfw": 1},
    )
    model = ViTForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([-4.0, 4.0] if flag else [4.0, -4.0]))
    model.save_pretrained(path, safe_serialization=True)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path
