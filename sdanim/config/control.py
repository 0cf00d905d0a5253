"""ControlNet as a render asks for it: `ControlNetSpec`, one net with its conditioning
image, scale and schedule, checked where it is made.

    ControlNetSpec(file="control_v11p_sd15_canny.pth", image="photo.png", preprocess="canny",
                   scale=0.8, start=0.0, end=1.0)

Each spec names a net and what it is conditioned on: one image for every frame, a folder
of images or a video (one image per frame, resampled to the frame count), and a
preprocessor that turns the pictures into hint images (`sdanim.core.hints`). A walk file
may give per-keyframe images and scales instead (`sdanim.core.keyframes`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from sdanim.config.choices import PREPROCESSORS
from sdanim.config.errors import check


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class ControlNetSpec:
    """One ControlNet of a render.

    Args:
        file: str. The net's weights: a diffusers folder (config.json +
            diffusion_pytorch_model.safetensors), lllyasviel's ControlNet-v1-1
            .pth/.safetensors (`control_model.*`), or a file with bare keys (SD 2.1 nets);
            "random": the model's exact architecture with seeded random weights
            (offline smoke runs, as --weights random).
        image: str or None. What the frames are conditioned on: an image (every frame),
            a folder of images (sorted by name) or a video (one image per frame); None
            where each keyframe of a walk gives its own. Defaults to None.
        preprocess: str. "none" (the image is the hint), "canny", "lineart", "shuffle",
            "tile" or "inpaint" (`sdanim.core.hints`). Defaults to "none".
        scale: float. conditioning_scale: the residuals' weight, >= 0 (0 = no effect).
            Defaults to 1.
        start, end: float. The fraction of the steps the net acts in: step i of N runs it
            when start <= i / N and (i + 1) / N <= end (diffusers' control_guidance_start/
            end). Defaults to 0 and 1.
        guess_mode: bool. The residuals scaled from 0.1 (first) to 1 (mid block) and, under
            guidance, given to the conditional half only: the net decides the content
            (for an empty prompt). Defaults to False.
        shuffle_seed: int. The shuffle preprocessor's seed (the same remap for every frame).
            Defaults to 0.
    """

    file: str
    image: Optional[str] = None
    preprocess: str = "none"
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False
    shuffle_seed: int = 0

    def __post_init__(self):
        check(isinstance(self.file, str) and self.file.strip() != "",
              f"controlnet must be a weights file or folder. Received: controlnet={self.file!r}")
        check(self.preprocess in PREPROCESSORS,
              f"control_preprocess must be one of {', '.join(PREPROCESSORS)}. "
              f"Received: control_preprocess={self.preprocess!r}")
        check(_number(self.scale) and self.scale >= 0,
              f"controlnet scale must be a number >= 0. Received: scale={self.scale!r}")
        for name in ("start", "end"):
            value = getattr(self, name)
            check(_number(value) and 0.0 <= value <= 1.0,
                  f"control_{name} must be a fraction of the steps in [0, 1]. Received: control_{name}={value!r}")
        check(self.start <= self.end,
              f"control_start must not be after control_end. Received: control_start={self.start}, "
              f"control_end={self.end}")
        check(isinstance(self.guess_mode, bool), f"guess_mode must be true or false. Received: {self.guess_mode!r}")
        check(isinstance(self.shuffle_seed, int) and not isinstance(self.shuffle_seed, bool) and self.shuffle_seed >= 0,
              f"shuffle_seed must be a whole number >= 0. Received: shuffle_seed={self.shuffle_seed!r}")


def parse_controlnet(text: str) -> tuple:
    """The command line's FILE[:SCALE] -> (file, scale)."""
    path, sep, scale = str(text).rpartition(":")
    if sep and path:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return str(text), 1.0


__all__ = ["ControlNetSpec", "parse_controlnet"]
