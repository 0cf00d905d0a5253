"""Checkpoints into a built model, and a model's weights out as KerasCV .h5 files.

    checkpoint (sdanim.formats.checkpoints) -> every tensor accounted for
    (sdanim.formats.weight_map.check_keys) -> values assigned into the existing
    variables (compiled functions stay valid, except where the process's oneDNN kernels
    keep weights: `sdanim.model.device.weights_kept`) -> the model's derived state invalidated
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from sdanim.config.errors import check
from sdanim.core.runtime import import_keras
from sdanim.core.schedulers import timestep_embedding
from sdanim.formats.checkpoints import inspect_checkpoint, refuse_v_prediction
from sdanim.formats.weight_map import bind, check_keys
from sdanim.model.compiled import compiled
from sdanim.model.registry import PART_ORDER, file_name
from sdanim.model.stable_diffusion import StableDiffusionModel


def checked_checkpoint(weights: str, version: Optional[str]):
    """Reads a checkpoint's header and accounts for every tensor (nothing is built)."""
    checkpoint = inspect_checkpoint(weights)
    check(
        version in (None, checkpoint.version),
        f"the checkpoint holds a Stable Diffusion {checkpoint.version[0]}.x model; leave "
        f"out --model or pass {checkpoint.version}. Received: model={version!r}",
    )
    check_keys(checkpoint)
    return checkpoint


def bind_checkpoint(model: StableDiffusionModel, checkpoint) -> None:
    """Copies a checked checkpoint's tensors into the model's four parts (in place)."""
    # Values are assigned into the existing variables: compiled steps stay valid
    # (`model.invalidate` drops them where the kernels keep the weights they saw).
    for part in PART_ORDER:
        sub = getattr(model, part)
        bind(sub, checkpoint, part)
        # An SD 2.x single file does not say whether it predicts v (768-v) or noise.
        if part == "diffusion_model" and not checkpoint.prediction_known and looks_like_v_prediction(sub):
            refuse_v_prediction(checkpoint, "its UNet answers AUTOMATIC1111's v-prediction test")
    model.invalidate(base=True)  # every weight now holds the new base
    if model.loras:
        model.set_loras(model.loras)  # merged again, into the new base weights
    model.weights = checkpoint.path
    model.image_encoder_factory = None  # bound above; the model keeps no handle on the file


def looks_like_v_prediction(diffusion_model) -> bool:
    """AUTOMATIC1111's test for SD 2.x files that do not say what they predict.

    On a flat 0.5 latent at t=999 with a flat 0.5 context, a v-prediction UNet (the 768-v
    models) returns values far below the input (mean of output - input < -1); a noise
    predictor does not. It needs trained weights to mean anything.
    """
    ops = import_keras().ops
    shape = tuple(diffusion_model.inputs[0].shape[1:])
    context_shape = tuple(diffusion_model.inputs[2].shape[1:])
    latent = np.full((1,) + shape, 0.5, np.float32)
    context = np.full((1,) + context_shape, 0.5, np.float32)
    # Compiled, never eager: where oneDNN keeps weights (`weights_kept`), an eager
    # convolution computes with the weights the first one of its kind saw. (There,
    # `bind_checkpoint`'s `model.invalidate` drops this function and its converted copy.)
    call = compiled(_unet_call, (diffusion_model,), False)
    out = call(latent, timestep_embedding(999)[None].astype(np.float32), context)
    return float(np.mean(ops.convert_to_numpy(out).astype(np.float32) - latent)) < -1.0


def _unet_call(calls, latent, t_emb, context):
    return calls[0]([latent, t_emb, context])


def write_keras_weights(model: StableDiffusionModel, out: str, parts=PART_ORDER) -> dict:
    """Writes the sub-models' weights (`parts`: the four by default) as KerasCV .h5 files
    in `out`; {part: path}."""
    import h5py

    import_keras()
    from keras.src.legacy.saving import legacy_h5_format

    written = {}
    for part in parts:
        path = os.path.join(out, file_name(model.version, part))
        partial = path + ".partial"
        with h5py.File(partial, "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, getattr(model, part))
        os.replace(partial, path)
        written[part] = path
    return written
