"""PyTorch state dicts into Keras layers built by the tensors' own names: the one
assignment the post-processing networks (RIFE, Real-ESRGAN, TAESD) and ControlNet share.

    torch Conv2d          weight (out, in, kh, kw) -> Keras kernel (kh, kw, in, out), bias
    torch ConvTranspose2d weight (in, out, kh, kw) -> Keras kernel (kh, kw, out, in), bias
    anything else         `special(name, layer)` gives (values, keys)

Every tensor is accounted for: a missing one, a shape that does not fit and a tensor
with no place in the network are each one line naming it.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import numpy as np

from sdanim.config.errors import SdanimError

# A torch module's dotted name cannot name a Keras layer on Keras's torch backend: its
# layers register their variables as torch parameters, whose names may not contain ".".
_DOT = "-"


def keras_layer_name(module: str) -> str:
    """The Keras layer name of a torch module's name ("encode.cnn0" -> "encode-cnn0")."""
    return module.replace(".", _DOT)


def module_name(layer: str) -> str:
    """The torch module's name of a layer named by `keras_layer_name`."""
    return layer.replace(_DOT, ".")


def conv_values(tensors: dict, name: str, bias: bool = True) -> tuple:
    """A torch convolution's (values in Keras's order, the keys they came from)."""
    kernel = np.transpose(tensors[f"{name}.weight"].load(), (2, 3, 1, 0))  # (out, in, kh, kw) -> (kh, kw, in, out)
    if not bias:
        return [kernel], [f"{name}.weight"]
    return [kernel, tensors[f"{name}.bias"].load()], [f"{name}.weight", f"{name}.bias"]


def assign(layers: dict, tensors: dict, what: str, received: str,
           special: Optional[Callable] = None, ignored: Iterable[str] = ()) -> None:
    """Copies `tensors` ({torch name: LazyTensor}) into `layers` ({torch module name:
    Keras layer}); convolutions by default, other layers through `special(name, layer)`
    -> (values, keys) or None.

    what: how messages name the file ("the RIFE file"); received: the "Received: ..."
    tail ("rife='flownet.pkl'"); ignored: key prefixes the network has no use for
    (training-only tensors).
    """
    used = set()
    for name, layer in layers.items():
        found = special(name, layer) if special is not None else None
        try:
            values, keys = found if found is not None else conv_values(tensors, name, bool(getattr(layer, "use_bias", True)))
        except KeyError as missing:
            raise SdanimError(f"{what} lacks {missing.args[0]}. Received: {received}") from None
        shapes = [tuple(w.shape) for w in layer.get_weights()]
        if [tuple(v.shape) for v in values] != shapes:
            raise SdanimError(f"{what} has {keys[0]} of the wrong shape {tuple(values[0].shape)} for this "
                              f"architecture ({shapes[0]} wanted). Received: {received}")
        layer.set_weights([np.asarray(v, np.float32) for v in values])
        used.update(keys)
    extra = sorted(k for k in set(tensors) - used if not k.startswith(tuple(ignored)))
    if extra:
        raise SdanimError(f"{what} holds {len(extra)} tensors this architecture has no place for "
                          f"(e.g. {extra[0]}). Received: {received}")


__all__ = ["assign", "conv_values"]
