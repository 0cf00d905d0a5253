"""Where the frames of each transition sit: perceptually uniform spacing (below), or
AID's Beta prior (`beta_positions`).

Perceptually uniform spacing: move frames so consecutive frames are equally far apart.

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


BETA_PRIOR = (3.0, 3.0)  # AID's generate_beta_tensor default (alpha, beta)


def beta_positions(intervals: Sequence[int], easings: Sequence[str], include_end: bool = True,
                   alpha: float = BETA_PRIOR[0], beta: float = BETA_PRIOR[1]) -> np.ndarray:
    """Frame positions with AID's Beta prior (He et al. 2024, sec. 4.4): in each
    transition the j-th of n frames sits at the j/n quantile of Beta(alpha, beta)
    (after the transition's easing), so frames gather where the middle of a transition
    changes most and thin out next to the keyframes. Keyframes stay frames exactly
    (the quantile of 0 is 0). Returns (F,) positions as `uniform_positions` does."""
    from scipy.special import betaincinv  # the Beta distribution's inverse CDF

    check(alpha > 0 and beta > 0, f"the Beta prior needs alpha, beta > 0. Received: alpha={alpha}, beta={beta}")
    out = []
    for k, (n, easing) in enumerate(zip(intervals, easings)):
        fractions = np.array([EASINGS[easing](j / n) for j in range(n)], dtype=np.float64)
        out.append(k + betaincinv(alpha, beta, fractions))
    if include_end:
        out.append(np.array([float(len(intervals))]))
    return np.concatenate(out)
