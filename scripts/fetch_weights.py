"""Download FLUX.1 [dev] into a folder that `flux-server --model` accepts.

For a machine with a connection (the server itself never downloads anything). FLUX.1 [dev]
is gated: accept its licence at https://huggingface.co/black-forest-labs/FLUX.1-dev, create a
read token, then:

    python scripts/fetch_weights.py --dest /models/flux1-dev --token hf_...   # or HF_TOKEN=...

Only the files the runtime loads are fetched (about 34 GB): model_index.json and the
component folders' configs, weights and tokenizer files, not the root `flux1-dev.safetensors`
and `ae.safetensors` duplicates. `--single-file` fetches `flux1-dev.safetensors` instead of
the diffusers transformer shards (use it as `--model flux1-dev.safetensors` with this folder
as `--components-dir`). `--redux` adds FLUX.1 Redux [dev] into `<dest>/redux`.

The family's other checkpoints (`--variant fill|kontext|krea`: FLUX.1 Fill [dev], Kontext
[dev], Krea [dev], each gated like FLUX.1 [dev]) fetch only their transformer (about 24 GB;
the text encoders and VAE are the base's): the diffusers `transformer/` folder, or with
`--single-file` the repository's one-file transformer. Serve it with `--variant NAME=DEST`:

    python scripts/fetch_weights.py --variant kontext --dest /models/flux1-kontext-dev

Re-running resumes an interrupted download. Afterwards the folder gets the same check the
server runs at start-up; `--check-only` runs just that check.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

try:
    from models.weights import WeightsError, check_pipeline_folder, check_redux_folder, check_single_file
except ImportError:  # run as a file from a checkout without the project installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from models.weights import WeightsError, check_pipeline_folder, check_redux_folder, check_single_file

DEV_REPO = "black-forest-labs/FLUX.1-dev"
REDUX_REPO = "black-forest-labs/FLUX.1-Redux-dev"
SINGLE_FILE_NAME = "flux1-dev.safetensors"
# The family's variants: repository and one-file transformer name.
VARIANT_REPOS = {
    "fill": ("black-forest-labs/FLUX.1-Fill-dev", "flux1-fill-dev.safetensors"),
    "kontext": ("black-forest-labs/FLUX.1-Kontext-dev", "flux1-kontext-dev.safetensors"),
    "krea": ("black-forest-labs/FLUX.1-Krea-dev", "flux1-krea-dev.safetensors"),
}

_CONFIG_AND_TOKENIZERS = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "transformer/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "tokenizer/*.json",
    "tokenizer/*.txt",
    "tokenizer_2/*.json",
    "tokenizer_2/*.model",
]
_COMPONENT_WEIGHTS = [
    "vae/*.safetensors",
    "text_encoder/*.safetensors",
    "text_encoder_2/*.safetensors",
    "text_encoder_2/*.safetensors.index.json",
]
_TRANSFORMER_WEIGHTS = ["transformer/*.safetensors", "transformer/*.safetensors.index.json"]
REDUX_PATTERNS = [
    "image_embedder/*.json",
    "image_embedder/*.safetensors",
    "image_encoder/*.json",
    "image_encoder/*.safetensors",
    "feature_extractor/*.json",
]

Downloader = Callable[..., Any]


def dev_patterns(*, single_file: bool) -> list[str]:
    """allow_patterns for the FLUX.1 [dev] repository."""
    transformer = [SINGLE_FILE_NAME] if single_file else _TRANSFORMER_WEIGHTS
    return [*_CONFIG_AND_TOKENIZERS, *_COMPONENT_WEIGHTS, *transformer]


def variant_patterns(name: str, *, single_file: bool) -> list[str]:
    """allow_patterns for a variant's repository: its transformer only."""
    if single_file:
        return [VARIANT_REPOS[name][1]]
    return ["model_index.json", "transformer/config.json", *_TRANSFORMER_WEIGHTS]


def check_variant(name: str, dest: Path, *, single_file: bool) -> str:
    """The server's start-up check of a variant; returns the --variant argument to use."""
    from models.variants.spec import resolve_variants

    path = dest / VARIANT_REPOS[name][1] if single_file else dest
    resolve_variants({name: str(path)}, model=str(dest))
    return f"--variant {name}={path}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fetch_weights.py",
        description="Download FLUX.1 [dev] into a local folder for `flux-server --model`.",
    )
    parser.add_argument(
        "--dest", type=Path, required=True, help="folder to download into (created if missing)"
    )
    parser.add_argument("--token", help="Hugging Face read token (default: $HF_TOKEN)")
    parser.add_argument(
        "--repo", default=None, help=f"repository to fetch (default: {DEV_REPO}, or the variant's)"
    )
    parser.add_argument(
        "--variant",
        choices=sorted(VARIANT_REPOS),
        help="fetch a variant's transformer (FLUX.1 Fill, Kontext or Krea [dev]) instead of FLUX.1 [dev]",
    )
    parser.add_argument(
        "--single-file",
        action="store_true",
        help=f"fetch {SINGLE_FILE_NAME} (BFL layout) instead of the diffusers transformer shards",
    )
    parser.add_argument("--redux", action="store_true", help=f"also fetch {REDUX_REPO} into DEST/redux")
    parser.add_argument("--check-only", action="store_true", help="only check DEST; download nothing")
    return parser.parse_args(argv)


def validate_dest(dest: Path) -> None:
    """DEST must be new, empty, or an earlier (possibly interrupted) download: never clobber."""
    if dest.exists() and not dest.is_dir():
        raise SystemExit(f"error: --dest {dest} exists and is not a folder")
    if dest.is_dir():
        earlier = (dest / ".cache" / "huggingface").is_dir() or (dest / "model_index.json").is_file()
        if any(dest.iterdir()) and not earlier:
            raise SystemExit(
                f"error: --dest {dest} is not empty and does not look like an earlier download; "
                "choose a new or empty folder"
            )
    elif not dest.parent.is_dir():
        raise SystemExit(f"error: the parent folder of --dest does not exist: {dest.parent}")


def check_folder(dest: Path, *, single_file: bool, redux: bool) -> str:
    """Run the server's start-up check; return the --model arguments to use."""
    check_pipeline_folder(dest, need_transformer_weights=not single_file)
    if redux:
        check_redux_folder(dest / "redux")
    if single_file:
        check_single_file(dest / SINGLE_FILE_NAME)
        return f"--model {dest / SINGLE_FILE_NAME} --components-dir {dest}"
    return f"--model {dest}"


def _snapshot_download(**kwargs: Any) -> Any:
    from huggingface_hub import snapshot_download  # only this script ever talks to the hub

    return snapshot_download(**kwargs)


def main(argv: Sequence[str] | None = None, *, download: Downloader = _snapshot_download) -> int:
    args = parse_args(argv)
    args.repo = args.repo or (VARIANT_REPOS[args.variant][0] if args.variant else DEV_REPO)
    dest: Path = args.dest.expanduser().resolve()
    if not args.check_only:
        token = args.token or os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
        if not token:
            print(
                f"error: {args.repo} is gated: accept its licence at https://huggingface.co/{args.repo}, "
                "create a read token at https://huggingface.co/settings/tokens, "
                "then pass --token or set HF_TOKEN",
                file=sys.stderr,
            )
            return 2
        validate_dest(dest)
        dest.mkdir(exist_ok=True)
        print(f"downloading {args.repo} into {dest} (resumes if interrupted)", file=sys.stderr)
        patterns = (
            variant_patterns(args.variant, single_file=args.single_file)
            if args.variant
            else dev_patterns(single_file=args.single_file)
        )
        download(repo_id=args.repo, local_dir=dest, allow_patterns=patterns, token=token)
        if args.redux and not args.variant:
            download(repo_id=REDUX_REPO, local_dir=dest / "redux", allow_patterns=REDUX_PATTERNS, token=token)
    try:
        if args.variant:
            model_args = check_variant(args.variant, dest, single_file=args.single_file)
        else:
            model_args = check_folder(dest, single_file=args.single_file, redux=args.redux)
    except WeightsError as exc:
        print(f"error: {dest} is incomplete: {exc}", file=sys.stderr)
        return 1
    print(f"ok: {dest} is complete. Start the server with: flux-server serve {model_args}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
