"""How evenly an animation moves: distances between consecutive frames.

Equal steps in embedding space give very unequal visual steps (DiffMorpher, CVPR 2024;
AID, NeurIPS 2024). The report gives the spread of consecutive-frame distances:
AID's 1 - Gini (1 = perfectly even) and the variance (DiffMorpher's PDV, here on pixels).
The distance is pluggable; the default works offline with no pretrained network.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

Distance = Callable[[np.ndarray, np.ndarray], float]


def pixel_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two uint8 images, in [0, 1]."""
    return float(np.mean(np.abs(a.astype(np.float32) - b.astype(np.float32))) / 255.0)


def consecutive_distances(frames: Sequence[np.ndarray], distance: Optional[Distance] = None) -> np.ndarray:
    """(F-1,) distances between frame i and i + 1."""
    distance = distance or pixel_distance
    return np.array([distance(frames[i], frames[i + 1]) for i in range(len(frames) - 1)], dtype=np.float64)


def gini(values: Sequence[float]) -> float:
    """Gini coefficient of non-negative values: 0 when all equal, towards 1 when one
    value holds everything."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    n, total = len(x), x.sum()
    if n == 0 or total <= 0:
        return 0.0
    ranks = np.arange(1, n + 1)
    return float(np.sum((2 * ranks - n - 1) * x) / (n * total))


def smoothness_report(frames: Sequence[np.ndarray], distance: Optional[Distance] = None) -> dict:
    """Consecutive-frame distances and their spread (see the module docstring)."""
    d = consecutive_distances(frames, distance)
    if len(d) == 0:
        return {"distances": [], "mean": 0.0, "one_minus_gini": 1.0, "variance": 0.0}
    return {
        "distances": [round(float(v), 6) for v in d],
        "mean": float(d.mean()),
        "one_minus_gini": 1.0 - gini(d),
        "variance": float(d.var()),
    }
