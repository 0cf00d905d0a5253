"""The text context's projections, made once per batch instead of at every step.

Every cross-attention layer of the UNet projects the text context to keys and values
(KerasCV's `to_k`, `to_v`). The context is the same at every denoising step, so those
projections (32 matmuls of the 77 context tokens for SD 1.x) give the same tensors at
every step. `attach` gives a UNet a *context model* that makes them all from a context
in one call; a UNet call made inside `reuse(...)` reads them instead of recomputing them.
Same layers, same weights (a LoRA merged later is seen by both), same sums: the step's
result is unchanged (bit for bit on TensorFlow's CPU kernels).

Which layers project the context is the model-loading module's knowledge
(`sdanim.model.layers.attach_context_cache`); this module only knows Keras layers. A UNet
without a context model (tests' tiny stand-ins) is called as it is.
"""

from __future__ import annotations

import contextlib
import threading
import types
import weakref
from typing import Optional, Sequence

from sdanim.core.runtime import import_keras

_STATE = threading.local()  # .values: {id(layer): tensor} while a `reuse` is open
_CONTEXT_MODELS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # UNet -> (model, layers)


def _reusing_call(self, *args, **kwargs):
    """A context-projection layer's call: the tensor given to `reuse`, or its own."""
    values = getattr(_STATE, "values", None)
    if values is not None and id(self) in values:
        return values[id(self)]
    return type(self).call(self, *args, **kwargs)


def attach(unet, layers: Sequence, context_shape: tuple) -> int:
    """Makes `layers` (each maps the UNet's context, shape `context_shape` without the
    batch, to one tensor) reusable: builds the context model (a Keras model sharing
    those layers, context -> [one tensor per layer]) and patches each layer instance's
    call to read `reuse`'s tensors. Returns the number of layers."""
    keras = import_keras()
    detach(unet)
    context = keras.Input(tuple(context_shape), name="context")
    model = keras.Model(context, [layer(context) for layer in layers], name="context_projections")
    for layer in layers:
        object.__setattr__(layer, "call", types.MethodType(_reusing_call, layer))
    _CONTEXT_MODELS[unet] = (model, list(layers))
    return len(layers)


def detach(unet) -> None:
    """Undoes `attach`: the layers compute their projections at every call again."""
    entry = _CONTEXT_MODELS.pop(unet, None)
    if entry is not None:
        for layer in entry[1]:
            layer.__dict__.pop("call", None)


def context_model(unet):
    """The UNet's context model (context -> every cross-attention's projections), or
    None when it has none."""
    try:
        entry = _CONTEXT_MODELS.get(unet)
    except TypeError:  # not weak-referenceable
        return None
    return None if entry is None else entry[0]


@contextlib.contextmanager
def reuse(unet, values: Optional[Sequence]):
    """Within this block, a call of `unet` takes its context projections from `values`
    (the context model's outputs for the very context the UNet is called with) instead
    of computing them. values=None, or a UNet whose context model was detached since
    the values were made: a no-op (the UNet projects the context itself)."""
    entry = None if values is None else _CONTEXT_MODELS.get(unet)
    if entry is None:
        yield
        return
    layers = entry[1]
    previous = getattr(_STATE, "values", None)
    _STATE.values = {id(layer): value for layer, value in zip(layers, values)}
    try:
        yield
    finally:
        _STATE.values = previous
