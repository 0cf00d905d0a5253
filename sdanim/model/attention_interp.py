"""Attention interpolation (AID: He et al., "Attention Interpolation of Text-to-Image
Diffusion", NeurIPS 2024, arXiv 2403.17924), training-free.

A frame at position t between keyframes A and B is denoised with, in every attention
layer of the UNet (self- and cross-attention), its queries attending to keys and values
interpolated from A's and B's:

    inner (AID eq. 5):   K_t = (1 - t) K_A + t K_B,  V_t likewise;  Attn(Q_t, K_t, V_t)
    outer (AID eq. 6):   (1 - t) Attn(Q_t, K_A, V_A) + t Attn(Q_t, K_B, V_B)
    fused (AID's default, "fused outer"): as outer, each attention over the frame's own
                         keys and values concatenated with A's (B's): [K_t, K_A]

For self-attention K_A, K_B come from A's and B's own rows at that layer and step: the
keyframes are denoised alongside the frames, from the same fixed noise (helper rows the
renderer adds to a batch). For cross-attention they come from the keyframe prompts'
embeddings (the helper rows' contexts). Interpolation runs in the conditional pass only
and for the first `warmup` fraction of the steps; plain attention after (AID sec. 4.3).

This module holds the math and the per-call state; `sdanim.model.layers` routes KerasCV's
attention layers through `mix` while a state is active (`active`), the renderer
(`sdanim.render.sampling`) opens the state for the steps that interpolate.

    rows of the conditional half (R = frames + helpers):
        t  (R,) float32   the row's position between its keyframes
        a  (R,) int32     the row index of keyframe A's helper (within the conditional half)
        b  (R,) int32     keyframe B's
        on (R,) float32   1 where the row interpolates (frames strictly between keyframes)
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import weakref
from typing import Optional

import numpy as np

from sdanim.config.errors import check
from sdanim.core.runtime import keras_ops

MODES = ("off", "inner", "outer", "fused")
_STATE = threading.local()
_READY: "weakref.WeakSet" = weakref.WeakSet()  # UNets whose attention layers route through `mix`


def enable(unet) -> None:
    """Marks a UNet whose attention layers route through `mix` (`sdanim.model.layers`)."""
    _READY.add(unet)


def supports(unet) -> bool:
    """Whether attention interpolation reaches this UNet's attention layers."""
    try:
        return unet in _READY
    except TypeError:  # not weak-referenceable
        return False


def check_mode(mode: str, warmup: float = 0.5) -> None:
    check(mode in MODES, f"attention_interp must be one of {', '.join(MODES)}. Received: attention_interp={mode!r}")
    check(isinstance(warmup, (int, float)) and not isinstance(warmup, bool) and 0.0 <= warmup <= 1.0,
          f"attention_warmup must be a fraction of the steps in [0, 1]. Received: attention_warmup={warmup!r}")


def warmup_steps(num_steps: int, warmup: float) -> int:
    """How many of the first steps interpolate: int(num_steps * warmup). (AID's code runs
    steps 1 .. int(N * warmup) - 1, one fewer; the paper says the first half.)"""
    return int(num_steps * warmup)


@dataclasses.dataclass(frozen=True, eq=False)
class AidBatch:
    """One batch's attention interpolation: its first `frames` rows are the batch's
    frames, the rest their keyframes' helper rows; t, a, b, on (NumPy, one entry per
    row; see the module docstring) say how each conditional row attends. `mode` and
    `warmup` as `check_mode` takes them."""

    mode: str
    warmup: float
    frames: int
    t: np.ndarray
    a: np.ndarray
    b: np.ndarray
    on: np.ndarray

    def __post_init__(self):
        check_mode(self.mode, self.warmup)
        check(self.mode != "off", "an AidBatch interpolates: mode must not be 'off'")

    def __len__(self) -> int:
        return len(self.t)

    def steps(self, num_steps: int) -> int:
        return warmup_steps(num_steps, self.warmup)

    def plain_rows(self) -> np.ndarray:
        """(frames,) bool: the frame rows that do not interpolate (frames on a keyframe).
        The renderer takes their noise predictions from a UNet call on the frames alone,
        the batch shape a plain render calls it with, so that they are the plain render's
        frames bit for bit wherever a kernel's rounding depends on the batch's shape
        (oneDNN, bfloat16, GPU libraries)."""
        return np.asarray(self.on[: self.frames]) == 0

    def tensors(self) -> tuple:
        ops = keras_ops()
        return (ops.convert_to_tensor(np.asarray(self.t, np.float32)), ops.convert_to_tensor(np.asarray(self.a, np.int32)),
                ops.convert_to_tensor(np.asarray(self.b, np.int32)), ops.convert_to_tensor(np.asarray(self.on, np.float32)))


@dataclasses.dataclass
class _State:
    mode: str
    cond_start: int  # where the conditional rows start in the UNet's batch (R when guided, 0 when not)
    t: object  # (R,) tensors
    a: object
    b: object
    on: object


@contextlib.contextmanager
def active(mode: str, cond_start: int, t, a, b, on):
    """Within this block, attention layers routed through `mix` interpolate the
    conditional rows (`cond_start` onwards) as the tensors say."""
    previous = getattr(_STATE, "state", None)
    _STATE.state = _State(mode, cond_start, t, a, b, on)
    try:
        yield
    finally:
        _STATE.state = previous


def current() -> Optional[_State]:
    return getattr(_STATE, "state", None)


def _attend(ops, q, k, v, scale: float):
    """softmax(Q K^T scale) V per head: q (N, T, h, d), k and v (N, S, h, d) -> (N, T, h, d)."""
    return ops.dot_product_attention(q, k, v, scale=scale)


def mix(layer, inputs, context, plain, state: _State):
    """A KerasCV CrossAttention layer's output with the conditional rows that interpolate
    replaced by their interpolated attention; every other row is `plain` (the layer's own
    result), bit for bit. inputs (N, T, C), context (N, S, D) or None (self-attention)."""
    ops = keras_ops()
    context = inputs if context is None else context
    heads, size = layer.num_heads, layer.head_size
    start = state.cond_start
    x = inputs[start:]  # the conditional rows: (R, T, C)
    q = ops.reshape(layer.to_q(x), (-1, x.shape[1], heads, size))  # (R, T, h, d)
    # Keys and values of the whole batch, then its conditional rows: a cross-attention's
    # projections of the text context may come from `context_cache` for the whole batch.
    k = ops.reshape(layer.to_k(context)[start:], (-1, context.shape[1], heads, size))  # (R, S, h, d)
    v = ops.reshape(layer.to_v(context)[start:], (-1, context.shape[1], heads, size))
    k_a, k_b = ops.take(k, state.a, axis=0), ops.take(k, state.b, axis=0)  # (R, S, h, d): A's, B's rows
    v_a, v_b = ops.take(v, state.a, axis=0), ops.take(v, state.b, axis=0)
    t = ops.cast(ops.reshape(state.t, (-1, 1, 1, 1)), q.dtype)  # (R,) -> (R, 1, 1, 1)
    if state.mode == "inner":
        out = _attend(ops, q, (1.0 - t) * k_a + t * k_b, (1.0 - t) * v_a + t * v_b, layer.scale)
    elif state.mode == "outer":
        out = (1.0 - t) * _attend(ops, q, k_a, v_a, layer.scale) + t * _attend(ops, q, k_b, v_b, layer.scale)
    else:  # fused: the frame's own keys and values beside the keyframe's, along the key axis
        out = ((1.0 - t) * _attend(ops, q, ops.concatenate([k, k_a], axis=1), ops.concatenate([v, v_a], axis=1), layer.scale)
               + t * _attend(ops, q, ops.concatenate([k, k_b], axis=1), ops.concatenate([v, v_b], axis=1), layer.scale))
    out = layer.out_proj(ops.reshape(out, (-1, x.shape[1], heads * size)))  # (R, T, C)
    on = ops.reshape(ops.cast(state.on, "bool"), (-1, 1, 1))
    mixed = ops.where(on, ops.cast(out, plain.dtype), plain[start:])
    return mixed if start == 0 else ops.concatenate([plain[:start], mixed], axis=0)


__all__ = ["MODES", "AidBatch", "enable", "supports", "active", "current", "mix", "check_mode", "warmup_steps"]
