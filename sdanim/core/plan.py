"""Keyframes + noise -> frame plan: every frame a pure function of (plan, index).

A plan holds the keyframe embeddings and noises and each frame's position along the
keyframe path. `plan.frame(i)` derives frame i's context and noise from those alone,
so any batching, resume or sharding of the frames gives the same frames.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from sdanim.config.errors import check
from sdanim.config.choices import INTERPOLATIONS, PLAN_NOISES
from sdanim.core.interpolation import interpolate
from sdanim.core.noise import seeded_noise



def step_seed(seed: int) -> int:
    """The seed of the per-step (ancestral) noise of an image drawn from `seed` alone:
    a keyframe, a `generate` image, an image-to-image result, a grid cell."""
    state = np.random.SeedSequence([int(seed), 2]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


@dataclasses.dataclass(frozen=True)
class FrameInputs:
    """What the sampler needs for one frame."""

    index: int
    context: np.ndarray  # (77, D) text embedding
    noise: np.ndarray  # (h, w, 4) initial latent noise
    seed: int  # the frame's own seed, for ancestral samplers' per-step noise
    position: float  # u along the keyframe path, in [0, K-1]
    init_latent: Optional[np.ndarray] = None  # (h, w, 4) image latent (image-to-image, inpainting)
    mask: Optional[np.ndarray] = None  # (h, w, 1) 1 = paint, 0 = keep init_latent (inpainting)


@dataclasses.dataclass(frozen=True, eq=False)
class FramePlan:
    """The frames of an animation.

    Args:
        embeddings: (K, 77, D) float32 keyframe text embeddings.
        noises: (K, h, w, 4) float32 keyframe noises.
        seeds: K ints, the keyframe seeds the noises were drawn from.
        positions: (F,) floats in [0, K-1]: frame i sits at positions[i].
        interpolation: "slerp" or "linear", for the embeddings.
        noise_mode: "fixed" (keyframe 0's noise for every frame), "slerp" (noise
            slerped between the keyframes' seeds) or "circle" (frame i of F gets
            cos(2 pi i/F) n_0 + sin(2 pi i/F) n_1 from two basis noises: unit variance
            all the way round, and the last frame is next to the first).
    """

    embeddings: np.ndarray
    noises: np.ndarray
    seeds: tuple
    positions: np.ndarray
    interpolation: str = "slerp"
    noise_mode: str = "fixed"

    def __post_init__(self):
        k = len(self.embeddings)
        check(k >= 1, f"a plan needs at least one keyframe. Received: {k} keyframes")
        if self.noise_mode == "circle":
            check(
                len(self.noises) == 2 and len(self.seeds) == 2,
                f"a circular noise walk needs two basis noises and seeds. Received: "
                f"{len(self.noises)} noises, {len(self.seeds)} seeds",
            )
        else:
            check(
                len(self.noises) == k and len(self.seeds) == k,
                f"a plan needs one noise and one seed per keyframe. Received: "
                f"{k} embeddings, {len(self.noises)} noises, {len(self.seeds)} seeds",
            )
        check(
            self.interpolation in INTERPOLATIONS,
            f"interpolation must be one of {', '.join(INTERPOLATIONS)}. "
            f"Received: interpolation={self.interpolation!r}",
        )
        check(
            self.noise_mode in PLAN_NOISES,
            f"noise must be one of {', '.join(PLAN_NOISES)}. Received: noise={self.noise_mode!r}",
        )
        pos = np.asarray(self.positions, dtype=np.float64)
        check(
            pos.ndim == 1 and len(pos) >= 1 and pos.min() >= 0 and pos.max() <= k - 1,
            f"frame positions must lie in [0, {k - 1}]. Received: {pos.min()}..{pos.max()}",
        )

    def __len__(self) -> int:
        return len(self.positions)

    def _at(self, values: np.ndarray, u: float, method: str) -> np.ndarray:
        k = min(int(np.floor(u)), len(values) - 2) if len(values) > 1 else 0
        t = float(u - k)
        if len(values) == 1:
            return values[0]
        return interpolate(values[k], values[k + 1], t, method)

    def frame_seed(self, index: int) -> int:
        """Frame `index`'s own seed (for ancestral samplers' per-step noise).

        At a keyframe it depends on that keyframe's seed alone, so an image rendered
        as keyframe k equals the same (prompt, seed) rendered on its own; between
        keyframes it depends on both seeds and the position.
        """
        if self.noise_mode == "circle":
            key = [int(self.seeds[0]), int(self.seeds[1]), int(index), 3]
            state = np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0]
            return int(state >> np.uint64(1))
        u = float(self.positions[index])
        k = min(int(np.floor(u)), len(self.seeds) - 1)
        t = u - k
        if t == 0.0:
            return step_seed(self.seeds[k])
        key = [int(self.seeds[k]), int(self.seeds[k + 1]), k, int(round(t * 2**32)), 2]
        state = np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0]
        return int(state >> np.uint64(1))

    def frame(self, index: int) -> FrameInputs:
        """Frame `index`'s context and noise: a pure function of the plan and index."""
        check(
            0 <= index < len(self),
            f"frame index must be in [0, {len(self)}). Received: index={index}",
        )
        u = float(self.positions[index])
        context = self._at(self.embeddings, u, self.interpolation)
        if self.noise_mode == "fixed":
            noise = self.noises[0]
        elif self.noise_mode == "circle":
            theta = 2.0 * np.pi * index / len(self)
            noise = (np.cos(theta) * self.noises[0] + np.sin(theta) * self.noises[1]).astype(np.float32)
        else:
            noise = self._at(self.noises, u, "slerp")
        return FrameInputs(index, context, noise, self.frame_seed(index), u)

    def batch(self, indices: Sequence[int]) -> list[FrameInputs]:
        return [self.frame(i) for i in indices]


@dataclasses.dataclass(frozen=True, eq=False)
class ImagePlan:
    """Frames that start from image latents: frame i is a pure function of (plan, i).

    Args:
        context: (77, D) text embedding, shared by every frame.
        latents: (K, h, w, 4) clean image latents (K = 1, or 2 for an image morph).
        seeds: F ints, frame i's noise seed.
        positions: F floats in [0, K-1]: frame i's latent is interpolated there.
        mask: (h, w, 1) latent mask (1 = paint) for inpainting, or None.
        interpolation: "slerp" or "linear", between the latents.
    """

    context: np.ndarray
    latents: np.ndarray
    seeds: tuple
    positions: np.ndarray
    mask: Optional[np.ndarray] = None
    interpolation: str = "linear"

    def __len__(self) -> int:
        return len(self.seeds)

    def frame(self, index: int) -> FrameInputs:
        u = float(self.positions[index])
        if len(self.latents) == 1:
            latent = self.latents[0]
        else:
            k = min(int(np.floor(u)), len(self.latents) - 2)
            latent = interpolate(self.latents[k], self.latents[k + 1], u - k, self.interpolation)
        seed = int(self.seeds[index])
        noise = seeded_noise(seed, latent.shape)
        return FrameInputs(index, self.context, noise, step_seed(seed), u, latent.astype(np.float32), self.mask)

    def batch(self, indices: Sequence[int]) -> list:
        return [self.frame(i) for i in indices]


@dataclasses.dataclass(frozen=True)
class ListPlan:
    """Frames given one by one (a grid's cells): frame i is frames[i]."""

    frames: list

    def __len__(self):
        return len(self.frames)

    def batch(self, indices):
        return [self.frames[i] for i in indices]
