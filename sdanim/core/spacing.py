"""Perceptually uniform spacing: move frames so consecutive frames are equally far apart.

Equal steps along the embedding path give unequal visual steps. Given a cheap preview
of the frames (fewer steps) at positions u_0 < ... < u_{F-1} and the distances between
consecutive preview frames, each transition is re-parametrised by its cumulative
distance and the frames are re-placed at equal distance (the inverse of the cumulative
distance, as DiffMorpher's reschedule does), per transition so that every keyframe
stays a frame. Easing then acts on the perceptual parameter: an ease-in-out transition
slows down in what the viewer sees, not in embedding space.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from sdanim.config.choices import SPACINGS
from sdanim.config.errors import check
from sdanim.core.interpolation import EASINGS


def check_spacing(spacing: str) -> str:
    check(spacing in SPACINGS, f"spacing must be one of {', '.join(SPACINGS)}. Received: spacing={spacing!r}")
    return spacing


def uniform_positions(
    positions: Sequence[float],
    distances: Sequence[float],
    intervals: Sequence[int],
    easings: Sequence[str],
    include_end: bool = True,
) -> np.ndarray:
    """New frame positions with equal preview distance between consecutive frames.

    Args:
        positions: (F,) preview positions: linear spacing, transition k holding
            intervals[k] frames from k (plus the final keyframe if include_end).
        distances: (F - 1,) distances between consecutive preview frames, or (F,)
            for a loop, the last being from the final frame back to frame 0.
        intervals: frames per transition.
        easings: easing name per transition, applied to the perceptual parameter.
        include_end: whether the last keyframe is a frame (False for loops).

    Returns:
        (F,) positions; keyframe frames stay exactly on their keyframes.
    """
    positions = np.asarray(positions, dtype=np.float64)
    distances = np.maximum(np.asarray(distances, dtype=np.float64), 0.0)
    out = []
    start = 0
    for k, (n, easing) in enumerate(zip(intervals, easings)):
        # Preview points of transition k: its n frames, then the next keyframe.
        u = np.append(positions[start : start + n], k + 1.0)  # (n + 1,)
        d = distances[start : start + n]  # (n,) steps between them
        cum = np.concatenate([[0.0], np.cumsum(d)])  # (n + 1,) distance travelled
        ease = EASINGS[easing]
        fractions = np.array([ease(j / n) for j in range(n)])  # eased perceptual parameter
        if cum[-1] <= 0.0:  # nothing moves: keep the (eased) linear placement
            out.append(k + fractions)
        else:
            out.append(np.interp(fractions * cum[-1], cum, u))
        start += n
    if include_end:
        out.append(np.array([float(len(intervals))]))
    return np.concatenate(out)
