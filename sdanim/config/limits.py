"""What one request may ask for: `Limits`, checked on the final plan by the task
functions (frames after audio timing and in-betweens, output pixels after upscaling,
steps, batch, images) and by the browser app before a render starts.

A shared app (network mode) gets `NETWORK_LIMITS` for every limit its operator leaves
unset (`Limits.over`); a local app and the Python API have none unless asked.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from sdanim.config.errors import check


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for (None: not limited here; math.inf: explicitly none).

    Args:
        max_frames: int. Frames of one animation's video: rendered frames after audio
            timing, plus RIFE in-betweens or blended doubles. Defaults to None.
        max_size: int. Pixels on the longer side of an output image, after upscaling.
            Defaults to None.
        max_steps: int. Denoising steps. Defaults to None.
        max_images: int. Images of one generate call. Defaults to None.
        max_batch: int. Images per model call. Defaults to None.
        max_output_gb: float. The output folder's size beyond which no render starts
            (the browser app checks it: `sdanim.frontends.ui.model.check_disk`).
            Defaults to None.
    """

    max_frames: Optional[float] = None
    max_size: Optional[float] = None
    max_steps: Optional[float] = None
    max_images: Optional[float] = None
    max_batch: Optional[float] = None
    max_output_gb: Optional[float] = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            check(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0),
                  f"{field.name} must be a number > 0. Received: {field.name}={value!r}")

    def over(self, base: "Limits") -> "Limits":
        """These limits, each one left None taking `base`'s (an operator's few flags
        over the network defaults)."""
        return Limits(**{f.name: getattr(base, f.name) if getattr(self, f.name) is None else getattr(self, f.name)
                         for f in dataclasses.fields(self)})

    def _within(self, name: str, value, what: str) -> None:
        limit = getattr(self, name)
        if limit is None or math.isinf(limit):
            return
        check(value <= limit,
              f"this app renders at most {limit:g} {what} per request (the operator's --{name.replace('_', '-')}). "
              f"Received: {what}={value}")

    def check_settings(self, settings, upscale: Optional[int] = None) -> None:
        """Size (after an upscale by `upscale`), steps and batch of `RenderSettings`."""
        self._within("max_size", max(settings.height, settings.width) * (upscale or 1), "pixels")
        self._within("max_steps", settings.num_steps, "steps")
        self._within("max_batch", settings.batch_size, "batch_size")

    def check_frames(self, frames: int) -> None:
        self._within("max_frames", frames, "frames")

    def check_images(self, images: int) -> None:
        self._within("max_images", images, "images")


# Defaults for an app reachable from the network: a GPU-sized request, not a day of rendering.
NETWORK_LIMITS = Limits(max_frames=240, max_size=768, max_steps=50, max_images=8, max_batch=8, max_output_gb=20.0)

__all__ = ["Limits", "NETWORK_LIMITS"]
