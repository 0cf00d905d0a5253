"""Pure interpolation math: lerp, slerp, easing, and where frames sit along a path."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from sdanim.config.choices import INTERPOLATIONS
from sdanim.config.errors import check


def lerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """(1 - t) a + t b."""
    return (1.0 - t) * a + t * b


def slerp(a: np.ndarray, b: np.ndarray, t: float, dot_threshold: float = 0.9995) -> np.ndarray:
    """Spherical interpolation of two tensors treated as single flat vectors.

    Keeps the norm profile of Gaussian noise (a lerp of two noises shrinks towards the
    middle). Falls back to lerp when the vectors are nearly parallel, where the sine
    formula loses precision (as in stable-diffusion-videos and k-diffusion).
    """
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
    if na == 0 or nb == 0:
        return lerp(a64, b64, t).astype(np.float32)
    dot = float(np.sum(a64 * b64) / (na * nb))
    if abs(dot) > dot_threshold:
        return lerp(a64, b64, t).astype(np.float32)
    theta = np.arccos(np.clip(dot, -1.0, 1.0))
    s = np.sin(theta)
    out = (np.sin((1.0 - t) * theta) / s) * a64 + (np.sin(t * theta) / s) * b64
    return out.astype(np.float32)


def interpolate(a: np.ndarray, b: np.ndarray, t: float, method: str) -> np.ndarray:
    check(
        method in INTERPOLATIONS,
        f"interpolation must be one of {', '.join(INTERPOLATIONS)}. Received: interpolation={method!r}",
    )
    if t == 0.0:
        return np.asarray(a, dtype=np.float32)
    if t == 1.0:
        return np.asarray(b, dtype=np.float32)
    return slerp(a, b, t) if method == "slerp" else lerp(a, b, t).astype(np.float32)


def split_frames(total_frames: int, num_transitions: int) -> list[int]:
    """Splits `total_frames` frames over transitions so that every keyframe is a frame.

    Returns the number of intervals per transition; they sum to total_frames - 1, the
    first transitions taking the remainder. E.g. 24 frames over 2 transitions -> [12, 11].
    """
    check(
        isinstance(total_frames, int) and total_frames >= 2,
        f"frames must be at least 2. Received: frames={total_frames}",
    )
    check(
        total_frames >= num_transitions + 1,
        f"frames must be at least {num_transitions + 1} to show all "
        f"{num_transitions + 1} prompts. Received: frames={total_frames}",
    )
    base, extra = divmod(total_frames - 1, num_transitions)
    return [base + (1 if i < extra else 0) for i in range(num_transitions)]


# Easing curves: [0, 1] -> [0, 1], f(0) = 0, f(1) = 1 (Penner's easing equations).
EASINGS = {
    "linear": lambda t: t,
    "ease-in": lambda t: t * t,
    "ease-out": lambda t: 1.0 - (1.0 - t) ** 2,
    "ease-in-out": lambda t: 0.5 - 0.5 * math.cos(math.pi * t),
    "ease-in-cubic": lambda t: t**3,
    "ease-out-cubic": lambda t: 1.0 - (1.0 - t) ** 3,
    "ease-in-out-cubic": lambda t: 4 * t**3 if t < 0.5 else 1.0 - (-2 * t + 2) ** 3 / 2,
}


def check_easing(name: str, field: str = "easing") -> str:
    check(
        name in EASINGS,
        f"{field} must be one of {', '.join(EASINGS)}. Received: {field}={name!r}",
    )
    return name


def path_positions(
    intervals: Sequence[int],
    easings: Optional[Sequence[str]] = None,
    include_end: bool = True,
) -> np.ndarray:
    """Positions u in [0, K-1] of every frame along a path of K keyframes.

    Frame positions within transition k are k + ease_k(j / intervals[k]),
    j = 0..intervals[k]-1, and the path ends at exactly K-1 (unless include_end is
    False, for loops whose last keyframe is the first): each join is rendered once.
    """
    for n in intervals:
        check(
            isinstance(n, int) and n >= 1,
            f"frames per transition must be at least 1. Received: frames_per_transition={n}",
        )
    easings = list(easings) if easings is not None else ["linear"] * len(intervals)
    parts = []
    for k, (n, name) in enumerate(zip(intervals, easings)):
        ease = EASINGS[check_easing(name)]
        parts.append(k + np.array([ease(j / n) for j in range(n)]))
    if include_end:
        parts.append(np.array([float(len(intervals))]))
    return np.concatenate(parts)
