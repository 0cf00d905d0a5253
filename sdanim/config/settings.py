"""How frames are sampled: `RenderSettings`, a small frozen dataclass that checks itself,
and the size parsing the front-ends share."""

from __future__ import annotations

import dataclasses
from typing import Optional

from sdanim.config.choices import DECODERS, SCHEDULERS
from sdanim.config.errors import check

# (steps, guidance) when the caller leaves them out. The consistency samplers run
# step-distilled weights (LCM-LoRA, TCD-LoRA): a few steps, no unconditional pass.
DEFAULT_STEPS_AND_GUIDANCE = (25, 7.5)
SAMPLER_DEFAULTS = {"lcm": (4, 1.0), "tcd": (4, 1.0)}
# Flow matching (SD3): SD3 medium's card (28 steps, guidance 7); the other SD3 models'
# own defaults are the CLI's (`sdanim.model.sd3.SD3_CONFIGS`).
FLOW_DEFAULTS = {"flow_euler": (28, 7.0)}


# Fields added after manifests were first written, with their defaults (see `record`).
_LATER_FIELDS = {"decoder": "full"}


def sampler_defaults(scheduler: str) -> tuple[int, float]:
    """(num_steps, guidance_scale) used for `scheduler` when not given."""
    return SAMPLER_DEFAULTS.get(scheduler) or FLOW_DEFAULTS.get(scheduler) or DEFAULT_STEPS_AND_GUIDANCE


def parse_size(text: str) -> tuple[int, int]:
    """Parses "WIDTHxHEIGHT" (or one number for a square) into (height, width).

    Example:
    >>> parse_size("768x512")
    (512, 768)
    """
    parts = str(text).lower().replace(" ", "").split("x")
    ok = len(parts) in (1, 2) and all(p.isdigit() for p in parts)
    check(ok, f"size must look like 512x512 (WIDTHxHEIGHT). Received: size={text!r}")
    width = int(parts[0])
    height = int(parts[-1])
    return height, width


def check_image_size(height: int, width: int) -> None:
    """The UNet halves the 1/8-scale latent three times, so sides are multiples of 64."""
    for name, value in (("height", height), ("width", width)):
        check(
            isinstance(value, int) and value >= 64 and value % 64 == 0,
            f"{name} must be a positive multiple of 64 (the UNet downsamples the "
            f"1/8-scale latent three times). Received: {name}={value}",
        )


@dataclasses.dataclass(frozen=True)
class RenderSettings:
    """How each frame is sampled.

    Args:
        height: int. Image height in pixels, a multiple of 64. Defaults to 512.
        width: int. Image width in pixels, a multiple of 64. Defaults to 512.
        num_steps: int. Number of denoising steps. Defaults to 25, or 4 for the
            "lcm" and "tcd" samplers.
        guidance_scale: float. Classifier-free guidance scale; 1 disables the
            unconditional pass (one UNet pass per step). Defaults to 7.5, or 1 for
            "lcm" and "tcd".
        scheduler: str. One of "ddim", "ddpm", "euler", "euler_trailing" (Euler on
            trailing spacing, for few-step distilled weights such as
            AnimateDiff-Lightning), "euler_a", "dpmpp_2m", "lcm" (Latent Consistency
            Models, for LCM-LoRA weights), "tcd" (Trajectory Consistency Distillation,
            gamma 0.3), "flow_euler" (flow matching: the SD3 models' only sampler, and
            for them only; 28 steps, guidance 7 unless given). Defaults to "ddim"
            (KerasCV's sampler and timestep spacing).
        batch_size: int. Frames rendered per model call. Defaults to 4.
        decoder: str. "full" (the SD VAE decoder) or "tiny" (TAESD: about 40x less
            work, softer detail; for previews and fast drafts). Defaults to "full".
    """

    height: int = 512
    width: int = 512
    num_steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    scheduler: str = "ddim"
    batch_size: int = 4
    decoder: str = "full"

    def __post_init__(self):
        check_image_size(self.height, self.width)
        check(
            self.scheduler in SCHEDULERS,
            f"scheduler must be one of {', '.join(SCHEDULERS)}. "
            f"Received: scheduler={self.scheduler!r}",
        )
        steps, guidance = sampler_defaults(self.scheduler)
        if self.num_steps is None:
            object.__setattr__(self, "num_steps", steps)
        if self.guidance_scale is None:
            object.__setattr__(self, "guidance_scale", guidance)
        check(
            isinstance(self.num_steps, int) and self.num_steps >= 1,
            f"steps must be at least 1. Received: steps={self.num_steps}",
        )
        check(
            self.scheduler not in SAMPLER_DEFAULTS or self.num_steps <= 50,
            f"steps must be from 1 to 50 with the {self.scheduler} sampler (its 50-step "
            f"distillation schedule). Received: steps={self.num_steps}",
        )
        check(
            self.guidance_scale >= 0,
            f"guidance must be >= 0. Received: guidance={self.guidance_scale}",
        )
        check(
            isinstance(self.batch_size, int) and self.batch_size >= 1,
            f"batch_size must be at least 1. Received: batch_size={self.batch_size}",
        )
        check(self.decoder in DECODERS,
              f"decoder must be one of {', '.join(DECODERS)}. Received: decoder={self.decoder!r}")

    def record(self) -> dict:
        """The settings as manifests and PNG metadata record them: every field, except
        those added after the first runs where they keep their default (a run that does
        not use them reads and resumes as before)."""
        record = dataclasses.asdict(self)
        for name, default in _LATER_FIELDS.items():
            if record.get(name) == default:
                del record[name]
        return record

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(H/8, W/8, 4): the shape of one frame's latent."""
        return (self.height // 8, self.width // 8, 4)



def _whole(value):
    """An integral float (a browser number field's 4.0) as an int; anything else as is,
    for RenderSettings to check."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def render_settings(size: str, steps=None, guidance=None, scheduler: str = "ddim", batch_size=4,
                    decoder: str = "full") -> RenderSettings:
    """`RenderSettings` from what a front-end collects: the size as "WIDTHxHEIGHT"
    (`parse_size`), steps and guidance (None: the sampler's defaults), sampler and batch
    size. The CLI and the browser app both build their settings here.

    Example:
    >>> render_settings("768x512", scheduler="lcm").num_steps
    4
    """
    height, width = parse_size(size)
    return RenderSettings(
        height=height, width=width, num_steps=_whole(steps),
        guidance_scale=None if guidance is None else float(guidance),
        scheduler=scheduler, batch_size=_whole(batch_size), decoder=decoder,
    )
