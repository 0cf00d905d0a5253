"""Settings shared by every stage, as small frozen dataclasses that validate themselves."""

from __future__ import annotations

import dataclasses

from sdanim.errors import check

SCHEDULERS = ("ddim", "ddpm", "euler", "euler_a", "dpmpp_2m")


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
        num_steps: int. Number of denoising steps. Defaults to 25.
        guidance_scale: float. Classifier-free guidance scale; 1 disables the
            unconditional pass. Defaults to 7.5.
        scheduler: str. One of "ddim", "ddpm", "euler", "euler_a", "dpmpp_2m".
            Defaults to "ddim" (KerasCV's sampler and timestep spacing).
        batch_size: int. Frames rendered per model call. Defaults to 4.
    """

    height: int = 512
    width: int = 512
    num_steps: int = 25
    guidance_scale: float = 7.5
    scheduler: str = "ddim"
    batch_size: int = 4

    def __post_init__(self):
        check_image_size(self.height, self.width)
        check(
            isinstance(self.num_steps, int) and self.num_steps >= 1,
            f"steps must be at least 1. Received: steps={self.num_steps}",
        )
        check(
            self.guidance_scale >= 0,
            f"guidance must be >= 0. Received: guidance={self.guidance_scale}",
        )
        check(
            self.scheduler in SCHEDULERS,
            f"scheduler must be one of {', '.join(SCHEDULERS)}. "
            f"Received: scheduler={self.scheduler!r}",
        )
        check(
            isinstance(self.batch_size, int) and self.batch_size >= 1,
            f"batch_size must be at least 1. Received: batch_size={self.batch_size}",
        )

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(H/8, W/8, 4): the shape of one frame's latent."""
        return (self.height // 8, self.width // 8, 4)
