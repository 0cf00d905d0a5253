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
from sdanim.config.choices import ATTENTION_INTERPS, INTERPOLATIONS, PLAN_NOISES
from sdanim.core.hints import control_inputs
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
    control: tuple = ()  # ((hint (H, W, 3), scale), ...) one per ControlNet (`sdanim.core.hints`)
    negative: Optional[np.ndarray] = None  # (77, D) the frame's own negative embedding; None: the renderer's


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
        guides: (K - 1, 77, D) float32 or None: PAID's guide embedding of each
            transition (NaN where a transition has none); the frames strictly between
            keyframes k and k + 1 take guides[k] as their context.
        attention: "off", or AID's attention interpolation ("inner", "outer", "fused"):
            frames strictly between keyframes are denoised beside their two keyframes
            (`aid_batch`).
        attention_warmup: float. Fraction of the steps that interpolate attention.
        controls: tuple of `sdanim.core.hints.NetHints`: each ControlNet's hint and scale
            per frame. Defaults to none.
        negatives: (K, 77, D) float32 or None: each keyframe's negative embedding,
            interpolated per frame as the embeddings are (frame i's `negative`); None:
            every frame takes the renderer's negative context.
    """

    embeddings: np.ndarray
    noises: np.ndarray
    seeds: tuple
    positions: np.ndarray
    interpolation: str = "slerp"
    noise_mode: str = "fixed"
    guides: Optional[np.ndarray] = None
    attention: str = "off"
    attention_warmup: float = 0.5
    controls: tuple = ()
    negatives: Optional[np.ndarray] = None

    def __post_init__(self):
        k = len(self.embeddings)
        check(k >= 1, f"a plan needs at least one keyframe. Received: {k} keyframes")
        check(self.negatives is None or np.shape(self.negatives) == np.shape(self.embeddings),
              f"a plan needs one negative embedding per keyframe, shaped as its embedding. Received: negatives of "
              f"shape {np.shape(self.negatives)} for embeddings of shape {np.shape(self.embeddings)}")
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
        check(self.attention in ATTENTION_INTERPS,
              f"attention_interp must be one of {', '.join(ATTENTION_INTERPS)}. Received: attention_interp={self.attention!r}")
        check(self.attention == "off" or self.noise_mode != "circle",
              "attention interpolation needs keyframes; a circle noise walk has none. Received: noise_mode='circle'")
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

    def segment(self, u: float) -> tuple:
        """(k, t): position u lies t of the way from keyframe k to k + 1 (t = 0 on a keyframe)."""
        k = min(int(np.floor(u)), max(len(self.embeddings) - 2, 0))
        return k, float(u - k)

    def _context(self, u: float) -> np.ndarray:
        k, t = self.segment(u)
        if self.guides is not None and 0.0 < t < 1.0 and not np.isnan(self.guides[k]).any():
            return self.guides[k]  # PAID: the guide prompt instead of the blend
        return self._at(self.embeddings, u, self.interpolation)

    def keyframe(self, k: int) -> FrameInputs:
        """Keyframe k's inputs, as a frame sitting exactly on it gets them (index -1:
        not a frame of the plan; AID's helper rows)."""
        check(self.noise_mode != "circle", "a circle walk has no keyframe noises")
        u = float(k)  # computed as `frame` computes a frame at u = k: the same arrays
        noise = self.noises[0] if self.noise_mode == "fixed" else self._at(self.noises, u, "slerp")
        return FrameInputs(-1, self._at(self.embeddings, u, self.interpolation), noise, step_seed(self.seeds[k]), u,
                           control=control_inputs(self.controls, self._frame_at(u), u), negative=self._negative(u))

    def _negative(self, u: float) -> Optional[np.ndarray]:
        """The negative embedding at position u (no guide prompt replaces it), or None."""
        return None if self.negatives is None else self._at(self.negatives, u, self.interpolation)

    def _frame_at(self, u: float) -> int:
        """The frame sitting at position u (the nearest one where none does)."""
        return int(np.argmin(np.abs(np.asarray(self.positions, np.float64) - u)))

    def frame(self, index: int) -> FrameInputs:
        """Frame `index`'s context and noise: a pure function of the plan and index."""
        check(
            0 <= index < len(self),
            f"frame index must be in [0, {len(self)}). Received: index={index}",
        )
        u = float(self.positions[index])
        context = self._context(u)
        if self.noise_mode == "fixed":
            noise = self.noises[0]
        elif self.noise_mode == "circle":
            theta = 2.0 * np.pi * index / len(self)
            noise = (np.cos(theta) * self.noises[0] + np.sin(theta) * self.noises[1]).astype(np.float32)
        else:
            noise = self._at(self.noises, u, "slerp")
        return FrameInputs(index, context, noise, self.frame_seed(index), u,
                           control=control_inputs(self.controls, index, u), negative=self._negative(u))

    def batch(self, indices: Sequence[int]) -> list[FrameInputs]:
        return [self.frame(i) for i in indices]

    def _between(self, index: int) -> Optional[tuple]:
        """(k, t) of a frame strictly between keyframes k and k + 1, else None."""
        k, t = self.segment(float(self.positions[index]))
        return (k, t) if 0.0 < t < 1.0 else None

    def helpers(self, window: Sequence[int]) -> list:
        """The keyframes the in-between frames of `window` interpolate from, in order."""
        needed = set()
        for index in window:
            between = self._between(index)
            if between is not None:
                needed.update((between[0], between[0] + 1))
        return sorted(needed)

    def helper_count(self, batch_size: int) -> int:
        """The most helper rows any batch of `batch_size` needs (every batch gets this
        many, so the model's input shape never changes)."""
        windows = range(0, len(self), batch_size)
        return max(1, max(len(self.helpers(range(w, min(w + batch_size, len(self))))) for w in windows))

    def aid_batch(self, padded: Sequence[int], batch_size: int):
        """AID's rows for a batch: the helper keyframes' inputs (appended after the
        frames) and, per row of frames + helpers, (t, a, b, on) as
        `sdanim.model.attention_interp.AidBatch` wants them. The helpers are those of the
        batch's whole window (i // batch_size), so a frame sees the same helpers however
        many of its batch mates are rendered with it."""
        window = padded[0] // batch_size
        keyframes = self.helpers(range(window * batch_size, min((window + 1) * batch_size, len(self))))
        count = self.helper_count(batch_size)
        keyframes = (keyframes or [0]) + [(keyframes or [0])[-1]] * (count - len(keyframes or [0]))
        rows = len(padded) + count
        t, a, b, on = np.zeros(rows, np.float32), np.zeros(rows, np.int32), np.zeros(rows, np.int32), np.zeros(rows, np.float32)
        for row, index in enumerate(padded):
            between = self._between(index)
            if between is not None:
                k, frac = between
                t[row], on[row] = frac, 1.0
                a[row], b[row] = len(padded) + keyframes.index(k), len(padded) + keyframes.index(k + 1)
        return [self.keyframe(k) for k in keyframes], (t, a, b, on)


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
        controls: tuple of `sdanim.core.hints.NetHints`, as `FramePlan`'s.
    """

    context: np.ndarray
    latents: np.ndarray
    seeds: tuple
    positions: np.ndarray
    mask: Optional[np.ndarray] = None
    interpolation: str = "linear"
    controls: tuple = ()

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
        return FrameInputs(index, self.context, noise, step_seed(seed), u, latent.astype(np.float32), self.mask,
                           control_inputs(self.controls, index, u))

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
