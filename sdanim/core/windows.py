"""Context windows for motion modules: which frames are denoised together, how their
predictions are blended, and FreeNoise's noise (Qiu et al. 2023), as pure NumPy.

A clip of F frames is denoised in windows of `context` frames every `stride` frames; the
last window ends on the last frame (an open clip) or wraps round to the first (a closed
loop, so the last frames move into the first). A frame covered by several windows takes
the weighted mean of their predictions, the weights peaking mid-window ("pyramid") or
equal ("flat"), so windows meet without seams.

    context_windows(24, 16, 4)          -> [0..15], [4..19], [8..23]
    context_windows(24, 16, 4, closed)  -> [0..15], [4..19], ..., [20..23, 0..11]

FreeNoise's noise: the first window's frames drawn from the seed, each later run of
`stride` frames a seeded shuffle of the `stride` frames one window earlier, so every window
sees noise of the same statistics and motion that continues, at any length.
"""

from __future__ import annotations

import numpy as np

from sdanim.config.errors import check
from sdanim.config.motion import WEIGHTINGS
from sdanim.core.noise import check_seed, seeded_noise


def check_context(frames: int, context: int, stride: int) -> None:
    check(isinstance(context, int) and not isinstance(context, bool) and context >= 2,
          f"context must be a whole number of frames, at least 2. Received: context={context!r}")
    check(isinstance(stride, int) and not isinstance(stride, bool) and 1 <= stride <= context,
          f"context_stride must be a whole number of frames in [1, context={context}]. Received: context_stride={stride!r}")
    check(isinstance(frames, int) and frames >= 1, f"frames must be at least 1. Received: frames={frames!r}")


def context_windows(frames: int, context: int = 16, stride: int = 4, closed: bool = False) -> list:
    """The windows of a clip, each an int array of frame indices (see the module docstring).
    A clip no longer than `context` is one window of all its frames."""
    check_context(frames, context, stride)
    if frames <= context:
        return [np.arange(frames)]
    if closed:
        return [(start + np.arange(context)) % frames for start in range(0, frames, stride)]
    starts = list(range(0, frames - context + 1, stride))
    if starts[-1] + context < frames:
        starts.append(frames - context)  # the last window ends on the last frame
    return [start + np.arange(context) for start in starts]


def window_weights(length: int, weighting: str = "pyramid") -> np.ndarray:
    """A window's blending weights: "pyramid" 1, 2, ..., 2, 1 (peaking mid-window), or
    "flat" all 1."""
    check(weighting in WEIGHTINGS, f"context_weighting must be one of {', '.join(WEIGHTINGS)}. "
                                   f"Received: context_weighting={weighting!r}")
    if weighting == "flat":
        return np.ones(length, np.float32)
    half = np.arange(1, (length + 1) // 2 + 1, dtype=np.float32)
    return np.concatenate([half, half[: length // 2][::-1]]).astype(np.float32)


def coverage(frames: int, windows: list, weighting: str = "pyramid") -> np.ndarray:
    """Each frame's total weight over the windows (every frame is covered: > 0)."""
    total = np.zeros(frames, np.float32)
    for window in windows:
        np.add.at(total, window, window_weights(len(window), weighting))
    return total


def fusion_weights(frames: int, windows: list, stride: int, weighting: str = "pyramid") -> list:
    """Each window's per-frame weights for FreeNoise's fusion inside the motion modules'
    attention, by diffusers' rule (`FreeNoiseTransformerBlock`): `window_weights`, except
    that a last window added to end on the last frame (its start off the stride) fills
    only the frames no earlier window covers (weight 0 on the others)."""
    weights = [window_weights(len(w), weighting) for w in windows]
    last = windows[-1]
    if len(windows) > 1 and int(last[-1]) == frames - 1 and int(last[0]) % stride != 0:
        covered = np.isin(last, np.concatenate(windows[:-1]))
        weights[-1] = np.where(covered, 0.0, weights[-1]).astype(np.float32)
    return weights


def free_noise(seed: int, frames: int, context: int, stride: int, latent_shape: tuple,
               on_permutation=None) -> np.ndarray:
    """(frames, h, w, 4) float32: FreeNoise's noise for a clip (see the module docstring),
    determined by the seed, the context and the stride alone. `on_permutation` is handed
    each shuffle as it is drawn (tests replay them in diffusers' implementation)."""
    seed = check_seed(seed)
    check_context(frames, context, stride)
    first = min(frames, context)
    rng = np.random.default_rng(seed)
    frame_seeds = rng.integers(0, 2**63 - 1, size=first)
    noise = np.empty((frames, *latent_shape), np.float32)
    for i in range(first):
        noise[i] = seeded_noise(int(frame_seeds[i]), latent_shape)
    for start in range(context, frames, stride):
        source = np.arange(start - context, min(start - context + stride, frames))
        order = rng.permutation(len(source))
        if on_permutation is not None:
            on_permutation(order)
        count = min(stride, frames - start)
        noise[start:start + count] = noise[source[order][:count]]
    return noise


__all__ = ["WEIGHTINGS", "check_context", "context_windows", "coverage", "free_noise", "fusion_weights", "window_weights"]
