"""Seeded latent noise, drawn with NumPy so a seed means the same noise everywhere.

Backend RNGs (TF, JAX, torch) give different numbers for the same seed, and a batch
draw makes each frame's noise depend on its batch. Drawing per keyframe on the host
with NumPy's PCG64 gives the same latent on every backend, device and batch size.
"""

from __future__ import annotations

import numpy as np

from sdanim.config.errors import check

MAX_SEED = 2**63 - 1


def check_seed(seed, name: str = "seed") -> int:
    check(
        isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED,
        f"{name} must be an integer in [0, 2**63). Received: {name}={seed!r}",
    )
    return int(seed)


def seeded_noise(seed: int, latent_shape: tuple[int, int, int]) -> np.ndarray:
    """Standard normal latent noise (h, w, 4), float32, determined by `seed` alone."""
    seed = check_seed(seed)
    return np.random.default_rng(seed).standard_normal(latent_shape, dtype=np.float32)


def step_noise(frame_seed: int, num_steps: int, latent_shape) -> np.ndarray:
    """Noise for ancestral samplers, (num_steps, h, w, 4), from a frame's own seed.

    Kept apart from the initial noise stream (a different SeedSequence key), so that an
    ancestral sampler does not reuse the starting noise.
    """
    rng = np.random.default_rng(np.random.SeedSequence([check_seed(frame_seed), 1]))
    return rng.standard_normal((num_steps, *latent_shape), dtype=np.float32)
