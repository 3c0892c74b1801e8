"""Image decoding and the one square geometry shared by the vision tower and the teachers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageSpec:
    """How the vision tower wants its input (read from the tower's preprocessor config)."""

    size: int  # side of the square input (e.g. 336)
    mean: tuple[float, float, float]  # normalisation mean (also the pad colour, round(255 * mean))
    std: tuple[float, float, float]
    resample: str = "bicubic"  # PIL filter used for resizing
