"""Motion modules as a render asks for them: `MotionSpec`, checked where it is made.

    MotionSpec(file="mm_sd_v15_v2.ckpt", context=16, stride=4)

The frames of a motion render are denoised together in windows of `context` frames every
`stride` frames (docs/architecture.md, "Motion modules"); `weighting` blends the windows
where they overlap, `blend` says where (the UNet's predictions, or inside the motion
modules' attention), `norm` chooses the motion GroupNorm's statistics, `betas` the
noise schedule the sampler runs on.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from sdanim.config.choices import BETA_SCHEDULES
from sdanim.config.errors import check

WEIGHTINGS = ("pyramid", "flat")
MOTION_NORMS = ("frame", "window")
BLENDS = ("unet", "attention")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class MotionSpec:
    """AnimateDiff motion modules for a walk.

    Args:
        file: str. The motion modules: guoyww's original .ckpt/.safetensors (v1, v2, v3),
            AnimateLCM's, or a diffusers MotionAdapter folder or file; "random": the exact
            architecture (v2's, with a mid-block module) with seeded random weights
            (offline smoke runs, as --weights random).
        context: int. Frames denoised together (a window), 2 to the modules' positions
            (24 for v1, 32 otherwise). Defaults to 16 (what they were trained on).
        stride: int. Frames between the starts of consecutive windows, 1 to `context`.
            Defaults to 4.
        weighting: str. "pyramid" (a frame's prediction weighted by how central it is in
            each window) or "flat". Defaults to "pyramid".
        norm: str. "frame": the motion GroupNorm's statistics per frame (as the original
            modules were trained; ComfyUI); "window": over the frames of a UNet call
            (diffusers). Defaults to "frame".
        blend: str. "unet": each window goes through the whole UNet and the windows'
            noise predictions are blended (AnimateDiff-Evolved, animatediff-cli): memory
            is one window's, whatever the length. "attention": every frame goes through
            the UNet at once and the windows are blended inside each motion module's
            attention (the FreeNoise paper, diffusers' `enable_free_noise`): memory grows
            with the length. Defaults to "unet".
        betas: str. The noise schedule: "linear" (0.00085-0.012, what AnimateDiff,
            AnimateLCM and AnimateDiff-Lightning were trained on) or "scaled_linear"
            (SD's). Defaults to "linear".
        spatial_chunk: int or None. UNet rows (a guided window has two per frame) its own
            layers take at once, the motion modules still seeing every frame: less memory
            per window where self-attention's maps dominate (512 px and up; at small sizes
            it only costs time). A memory setting: the frames are the same
            within rounding, and it is not part of a run's record. None: all rows at once.
            Defaults to None.
    """

    file: str
    context: int = 16
    stride: int = 4
    weighting: str = "pyramid"
    norm: str = "frame"
    blend: str = "unet"
    betas: str = "linear"
    spatial_chunk: Optional[int] = None

    def __post_init__(self):
        check(isinstance(self.file, str) and self.file.strip() != "",
              f"motion_module must name a file, a folder or 'random'. Received: motion_module={self.file!r}")
        check(_whole(self.context) and self.context >= 2,
              f"context must be a whole number of frames, at least 2. Received: context={self.context!r}")
        check(_whole(self.stride) and 1 <= self.stride <= self.context,
              f"context_stride must be a whole number of frames in [1, context={self.context}]. "
              f"Received: context_stride={self.stride!r}")
        check(self.weighting in WEIGHTINGS,
              f"context_weighting must be one of {', '.join(WEIGHTINGS)}. Received: context_weighting={self.weighting!r}")
        check(self.norm in MOTION_NORMS,
              f"motion_norm must be one of {', '.join(MOTION_NORMS)}. Received: motion_norm={self.norm!r}")
        check(self.blend in BLENDS,
              f"context_blend must be one of {', '.join(BLENDS)}. Received: context_blend={self.blend!r}")
        check(self.betas in BETA_SCHEDULES,
              f"betas must be one of {', '.join(BETA_SCHEDULES)}. Received: betas={self.betas!r}")
        check(self.spatial_chunk is None or (_whole(self.spatial_chunk) and self.spatial_chunk >= 1),
              f"spatial_chunk must be a whole number of rows >= 1, or None. Received: spatial_chunk={self.spatial_chunk!r}")


__all__ = ["BLENDS", "MOTION_NORMS", "MotionSpec", "WEIGHTINGS"]
