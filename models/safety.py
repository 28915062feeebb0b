"""NSFW checking with a local image-classification model (`--safety-checker PATH`).

Any transformers image-classification folder works (for example a local copy of
`Falconsai/nsfw_image_detection`, labels `normal` / `nsfw`). An image is flagged when the
summed probability of its NSFW-like labels reaches the threshold. Accepted label names
(case-insensitive): see `NSFW_LABELS`. A folder whose model has none of them is refused at
load, because it could never flag anything.

Thresholds: fal's requests have no tolerance and use `DEFAULT_THRESHOLD`; BFL's
`safety_tolerance` runs from 0 (strict: flags at a low score) to 6 (permissive: flags only
near-certain images), see `threshold_for_tolerance`.

The runtime replaces a flagged image by a black image of the same size, as fal does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

logger = logging.getLogger(__name__)

NSFW_LABELS = frozenset({"nsfw", "porn", "hentai", "sexy", "explicit", "unsafe"})
DEFAULT_THRESHOLD = 0.5
# Index = BFL safety_tolerance 0 (strict) .. 6 (permissive); 3 matches the default.
TOLERANCE_THRESHOLDS = (0.1, 0.25, 0.4, 0.5, 0.65, 0.8, 0.95)


class SafetyCheckerError(ValueError):
    """The safety checker folder is missing, unreadable or has no NSFW-like label."""


def threshold_for_tolerance(safety_tolerance: int | None) -> float:
    """BFL's 0 (strict) .. 6 (permissive) as a score threshold; None -> DEFAULT_THRESHOLD."""
    if safety_tolerance is None:
        return DEFAULT_THRESHOLD
    if not 0 <= safety_tolerance < len(TOLERANCE_THRESHOLDS):
        raise ValueError(f"safety_tolerance must be between 0 and 6, got {safety_tolerance}")
    return TOLERANCE_THRESHOLDS[safety_tolerance]


class SafetyChecker:
    """An image classifier loaded once from a local folder; never touches the network."""

    def __init__(self, path: Path, *, device: str = "cpu") -> None:
        # Imported here: transformers' auto classes are slow to import and only needed when
        # a checker is configured.
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        path = Path(path)
        if not (path / "config.json").is_file():
            raise SafetyCheckerError(f"safety checker: no config.json in {path}")
        try:
            self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForImageClassification.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise SafetyCheckerError(f"safety checker: cannot load {path}: {exc}") from exc
        self.model.to(device).eval()
        self.device = device
        self.path = path
        labels = {int(i): str(name) for i, name in self.model.config.id2label.items()}
        self.nsfw_label_ids = [i for i, name in labels.items() if name.lower() in NSFW_LABELS]
        if not self.nsfw_label_ids:
            raise SafetyCheckerError(
                f"safety checker {path}: labels {sorted(labels.values())} include none of "
                f"{sorted(NSFW_LABELS)}"
            )
        logger.info("safety checker loaded from %s (labels %s)", path, sorted(labels.values()))

    @torch.no_grad()
    def scores(self, images: Sequence[Image.Image]) -> list[float]:
        """Probability that each image is NSFW (summed over the NSFW-like labels)."""
        if not images:
            return []
        inputs = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, dtype=self.model.dtype)
        probabilities = self.model(pixel_values=pixel_values).logits.float().softmax(dim=-1)
        return probabilities[:, self.nsfw_label_ids].sum(dim=-1).tolist()

    def check(self, images: Sequence[Image.Image], *, threshold: float = DEFAULT_THRESHOLD) -> list[bool]:
        """One flag per image: True when its NSFW score is at least `threshold`."""
        return [score >= threshold for score in self.scores(images)]


def black_like(image: Image.Image) -> Image.Image:
    """The replacement for a flagged image: black RGB of the same size."""
    return Image.new("RGB", image.size, (0, 0, 0))
