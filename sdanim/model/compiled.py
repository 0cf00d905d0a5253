"""Compiled functions of models, made once per model and reused.

`compiled(fn, models, jit_compile)` compiles fn(calls, *tensors) for the Keras backend
(calls[k](inputs) runs models[k]) and keeps it per model (held weakly), so every
renderer of a model reuses the traced graph; `forget_compiled(model)` drops them when
the model's layers change (`sdanim.model.layers`).
"""

from __future__ import annotations

import weakref
from typing import Callable

from sdanim.core.runtime import import_keras, import_tensorflow


class _Bound:
    """fn(calls, *args) with its calls bound: what one tf.function traces. A callable
    object rather than a lambda: TensorFlow counts traces per function *code* to warn
    about "tf.function retracing", and every model's function sharing one lambda's code
    made every new model (an upscaler tile size, a second renderer's model) look like a
    retrace of the same function, with a warning on the user's screen."""

    def __init__(self, fn: Callable, calls: list):
        self.fn, self.calls = fn, calls

    def __call__(self, *args):
        return self.fn(self.calls, *args)


def _compile(fn: Callable, models: tuple, jit_compile: bool) -> Callable:
    """Compiles fn(calls, *tensors) for the Keras backend, where calls[k](inputs) runs
    models[k].

    TensorFlow: one tf.function (XLA if jit_compile), traced once per input shape.
    JAX: jax.jit over each model's stateless_call, the weights passed as arguments (not
    baked in as constants). torch: eager under no_grad. The function holds the models
    weakly, so it can be cached per model (see `compiled`) without keeping them alive;
    calls[k].model_ref() is models[k] (for `context_cache.reuse`).
    """
    keras = import_keras()
    refs = [weakref.ref(m) for m in models]
    backend = keras.backend.backend()

    def direct(ref):
        call = lambda inputs: ref()(inputs, training=False)  # noqa: E731
        call.model_ref = ref
        return call

    if backend == "tensorflow":
        tf = import_tensorflow()
        return tf.function(_Bound(fn, [direct(r) for r in refs]), jit_compile=jit_compile)
    if backend == "jax":
        import jax

        def stateless(ref, weights):
            def call(inputs):
                out, _ = ref().stateless_call(weights[0], weights[1], inputs, training=False)
                return out

            call.model_ref = ref
            return call

        def pure(weights, *args):
            return fn([stateless(r, w) for r, w in zip(refs, weights)], *args)

        return jax.jit(pure)  # takes the weights first; `compiled` binds them
    if backend == "torch":
        import torch

        def run(*args):
            with torch.no_grad():
                return fn([direct(r) for r in refs], *args)

        return run
    raise RuntimeError(f"unsupported Keras backend: {backend}")


# first model -> {(function, jit_compile, backend, other models' ids): (compiled, other
# models' weak references)}. Every Renderer of a model shares one compiled function, so
# a second `generate`, a grid column or an image-to-image call reuses the traced graph
# instead of tracing the UNet again.
_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def forget_compiled(model) -> None:
    """Drops the compiled functions of `model` (after its layers' calls were changed),
    including the programs it shares with another model, and Keras's own
    (`predict_on_batch`'s)."""
    if getattr(model, "predict_function", None) is not None:
        model.predict_function = None  # retraced at the next predict_on_batch
    try:
        _COMPILED.pop(model, None)
    except TypeError:
        pass
    for cache in list(_COMPILED.values()):
        for key, (_, others) in list(cache.items()):
            if any(r() is model for r in others):
                del cache[key]


def compiled(fn: Callable, models: tuple, jit_compile: bool) -> Callable:
    """`_compile(fn, models, jit_compile)`, made once per models and reused."""
    keras = import_keras()
    backend = keras.backend.backend()
    first, others = models[0], models[1:]
    key = (fn.__name__, bool(jit_compile), backend, tuple(id(m) for m in others))
    try:
        cache = _COMPILED.setdefault(first, {})
    except TypeError:  # not weak-referenceable
        cache = {}
    entry = cache.get(key)
    if entry is None or any(r() is not m for r, m in zip(entry[1], others)):
        entry = cache[key] = (_compile(fn, models, jit_compile), [weakref.ref(m) for m in others])
    function = entry[0]
    if backend == "jax":
        # The weights as they are now, read once per renderer (not per call).
        weights = [
            ([v.value for v in m.trainable_variables], [v.value for v in m.non_trainable_variables])
            for m in models
        ]
        return lambda *args: function(weights, *args)
    return function


def compiled_entries(model) -> dict:
    """A copy of the compiled functions kept for `model` (to put back with
    `restore_compiled` after switching its layers away and back, as reference runs do)."""
    return dict(_COMPILED.get(model, {}))


def restore_compiled(model, entries: dict) -> None:
    """Puts back compiled functions saved by `compiled_entries`: only valid when the
    model runs exactly the layers they were traced with again."""
    _COMPILED.setdefault(model, {}).update(entries)
