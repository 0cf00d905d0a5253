"""ControlNet hints: pictures -> the images a ControlNet is conditioned on, made without
downloaded weights, and which hint and scale each frame of a plan gets.

Preprocessors (pure functions of (H, W, 3) uint8 pictures -> (H, W, 3) hints: uint8 levels
of [0, 1], or float32 where a hint holds -1):

    none      the picture itself, [0, 1] (a hint made elsewhere: depth, pose, HED ...)
    canny     OpenCV's Canny edges, thresholds 100 / 200 (ControlNet's canny model)
    lineart   "standard" line art: the picture's difference from its Gaussian blur
              (sigma 6), normalised by the median of its strong values
              (controlnet-aux's LineartStandardDetector)
    shuffle   the picture remapped through a smooth random flow from a seed (the same
              remap for every frame; controlnet-aux's ContentShuffleDetector, seeded)
    tile      the picture itself (control_v11f1e_sd15_tile: details from the prompt)
    inpaint   the picture with its masked pixels set to -1 (control_v11p_sd15_inpaint;
              the mask of the inpaint and outpaint commands)
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from sdanim.config.choices import PREPROCESSORS
from sdanim.config.errors import check


def canny(picture: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """OpenCV's Canny edges of an RGB picture (its gradient over the three channels), white
    on black, as ControlNet's canny model was trained on."""
    import cv2

    edges = cv2.Canny(np.ascontiguousarray(picture), low, high)  # (H, W) uint8, 0 or 255
    return np.repeat(edges[..., None], 3, axis=-1)


def lineart_standard(picture: np.ndarray, sigma: float = 6.0, threshold: float = 8.0) -> np.ndarray:
    """Line art without a network: how much darker each pixel is than its surroundings
    (a Gaussian blur of sigma 6), in the darkest channel, scaled so that the median of
    the values above `threshold` is half of full scale."""
    import cv2

    x = picture.astype(np.float32)
    blurred = cv2.GaussianBlur(x, (0, 0), sigma)
    intensity = np.min(blurred - x, axis=2).clip(0, 255)  # (H, W)
    strong = intensity[intensity > threshold]
    intensity /= max(16.0, float(np.median(strong)) if strong.size else 16.0)
    lines = (intensity * 127).clip(0, 255).astype(np.uint8)
    return np.repeat(lines[..., None], 3, axis=-1)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """A smooth random field in [0, 1]: uniform values on a grid of `cell` pixels,
    resampled bicubically."""
    import cv2

    coarse = rng.uniform(0.0, 1.0, (height // cell + 2, width // cell + 2)).astype(np.float64)
    field = cv2.resize(coarse, (width + 2 * cell, height + 2 * cell), interpolation=cv2.INTER_CUBIC)
    field = field[cell:cell + height, cell:cell + width]
    field = field - field.min()
    return field / max(float(field.max()), 1e-12)


def shuffle(picture: np.ndarray, seed: int = 0, cell: int = 256) -> np.ndarray:
    """The picture's content shuffled: remapped through a smooth random flow (each pixel
    fetched from a random place), the flow drawn from `seed`."""
    import cv2

    h, w = picture.shape[:2]
    rng = np.random.default_rng(seed)
    x = _smooth_noise(rng, h, w, cell) * float(w - 1)
    y = _smooth_noise(rng, h, w, cell) * float(h - 1)
    flow = np.stack([x, y], axis=-1).astype(np.float32)  # (H, W, 2): where each pixel comes from
    return cv2.remap(np.ascontiguousarray(picture), flow, None, cv2.INTER_LINEAR)


def inpaint_hint(picture: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The picture in [0, 1] with the pixels to repaint (mask True) set to -1."""
    hint = picture.astype(np.float32) / 255.0
    hint[np.asarray(mask, bool)] = -1.0
    return hint


def make_hint(picture: np.ndarray, preprocess: str, seed: int = 0, mask: Optional[np.ndarray] = None) -> np.ndarray:
    """(H, W, 3) uint8 picture -> (H, W, 3) hint by `preprocess` (module docstring): uint8
    levels of [0, 1], float32 for inpaint (-1 where masked)."""
    check(preprocess in PREPROCESSORS,
          f"control_preprocess must be one of {', '.join(PREPROCESSORS)}. Received: control_preprocess={preprocess!r}")
    if preprocess == "canny":
        return canny(picture)
    if preprocess == "lineart":
        return lineart_standard(picture)
    if preprocess == "shuffle":
        return shuffle(picture, seed)
    if preprocess == "inpaint":
        check(mask is not None, "the inpaint preprocessor sets the masked pixels to -1: it needs the inpaint or "
                                "outpaint command's mask. Received: control_preprocess='inpaint'")
        return inpaint_hint(picture, mask)
    return np.ascontiguousarray(picture, np.uint8)  # none, tile


def resample(count: int, frames: int) -> list:
    """Which of `count` control images each of `frames` frames takes: spread evenly, the
    first frame the first image and the last the last (frame i of F: image
    round(i (count - 1) / (F - 1)))."""
    if frames <= 1 or count == 1:
        return [0] * frames
    return [int(round(i * (count - 1) / (frames - 1))) for i in range(frames)]


@dataclasses.dataclass(frozen=True, eq=False)
class NetHints:
    """One ControlNet's hints over a plan's frames.

    Args:
        hints: (M, H, W, 3) hint images: uint8 levels of [0, 1], or float32.
        at: "all" (hints[0] for every frame), "frames" (frame i takes hints[order[i]]) or
            "keyframes" (hints per keyframe, blended linearly between keyframes).
        scales: (K,) per keyframe (interpolated by position) or (1,): the frame's
            conditioning scale, times `scale`.
        scale: float. The net's own scale.
        order: frame -> hint index, for at="frames".
    """

    hints: np.ndarray
    at: str = "all"
    scales: np.ndarray = dataclasses.field(default_factory=lambda: np.ones(1, np.float32))
    scale: float = 1.0
    order: tuple = ()

    def frame(self, index: int, position: float) -> tuple:
        """(hint (H, W, 3) float32, scale) of the frame at `index`, `position` along the
        keyframes."""
        if self.at == "frames":
            hint = _unit(self.hints[self.order[index]])
        elif self.at == "keyframes":
            hint = _lerp([_unit(h) for h in self.hints], position)
        else:
            hint = _unit(self.hints[0])
        return hint, float(self.scale * _lerp(self.scales, position))


def _unit(hint: np.ndarray) -> np.ndarray:
    """A stored hint as the net takes it: float32, uint8 levels over 255."""
    return hint.astype(np.float32) / 255.0 if hint.dtype == np.uint8 else hint.astype(np.float32)


def _lerp(values, position: float):
    """values[k] at integer positions, linear between them (the last one past the end)."""
    if len(values) == 1:
        return values[0]
    k = min(int(np.floor(position)), len(values) - 2)
    t = float(position - k)
    if t == 0.0:
        return values[k]
    return np.float32(1.0 - t) * values[k] + np.float32(t) * values[k + 1]


def control_inputs(nets: Sequence[NetHints], index: int, position: float) -> tuple:
    """((hint, scale), ...) of frame `index` at `position`, one per net."""
    return tuple(net.frame(index, position) for net in nets)


__all__ = ["canny", "lineart_standard", "shuffle", "inpaint_hint", "make_hint", "resample", "NetHints",
           "control_inputs"]
