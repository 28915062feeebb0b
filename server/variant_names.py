"""Which checkpoints a server serves, and which names a fine-tune may have.

The base `--model` is the variant "dev"; `Settings.variants` adds Fill, Kontext and Krea (fixed
names) and fine-tunes under names of their own. `--model tiny` with no `--variant` serves every
tiny variant (Fill, Kontext, Krea and the fine-tune "tiny-finetune"), so that every endpoint
works without weights; this is the rule models/variants/spec.py `configured_variants` applies on
the worker side, and the two must agree. A fine-tune is chosen on fal's API by the owner
part of the app id (`mystyle/flux/dev` runs fal-ai/flux/dev's schema on "mystyle", see
docs/api/fal.md), so its name must be a URL path segment that no other route of the server and
no fal client treats specially: `fine_tune_name_problem` says why a name is not one.
"""

from __future__ import annotations

import re

from server.config import Settings
from server.jobs import BASE_VARIANT, FAMILY_VARIANTS

FINE_TUNE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# First path segments taken by other routes (fal's own owner, the sync and proxy prefixes,
# BFL and OpenAI, the server's pages), and the two owners both fal clients parse as namespaces
# (`workflows/...`, `comfy/...`), whose ids they split differently.
RESERVED_NAMES = frozenset(
    {
        "fal-ai", "workflows", "comfy", "run", "api", "v1", "storage", "files", "health", "metrics",
        "docs", "redoc", "openapi.json", "static", "requests", ".well-known",
        BASE_VARIANT, *FAMILY_VARIANTS,
    }
)  # fmt: skip


TINY_MODEL = "tiny"
TINY_FINE_TUNE = "tiny-finetune"
DEFAULT_TINY_VARIANTS = (*FAMILY_VARIANTS, TINY_FINE_TUNE)


def configured_variants(settings: Settings) -> dict[str, str]:
    """The variants beyond the base, by name: as configured, or every tiny variant with
    `--model tiny` and none configured."""
    if not settings.variants and settings.model == TINY_MODEL:
        return dict.fromkeys(DEFAULT_TINY_VARIANTS, TINY_MODEL)
    return dict(settings.variants)


def served_variants(settings: Settings) -> frozenset[str]:
    """Every variant this server's workers can run: the base and each configured one."""
    return frozenset({BASE_VARIANT, *configured_variants(settings)})


def fine_tune_name_problem(name: str) -> str | None:
    """Why `name` cannot be a fine-tune's name (None: it can). Fill, Kontext and Krea are
    variants under their fixed names, not fine-tunes."""
    if name.lower() in RESERVED_NAMES:
        return f"'{name}' is reserved (fal-ai, dev, fill, kontext, krea and the server's own path prefixes)"
    if not FINE_TUNE_NAME.fullmatch(name):
        return (
            f"'{name}' is not a valid fine-tune name: 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return None


def fine_tunes(settings: Settings) -> list[str]:
    """The configured fine-tunes (variants other than Fill, Kontext and Krea), sorted."""
    return sorted(
        name for name in configured_variants(settings) if name not in (BASE_VARIANT, *FAMILY_VARIANTS)
    )
