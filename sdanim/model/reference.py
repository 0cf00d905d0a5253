"""KerasCV's own pipeline over a loaded model's sub-models: the reference for parity tests
and benchmarks (KerasCV's `generate_image` loop)."""

from __future__ import annotations

from sdanim.config.errors import SdanimError
from sdanim.core.runtime import import_keras_cv
from sdanim.model.stable_diffusion import StableDiffusionModel


def keras_cv_pipeline(model: StableDiffusionModel, jit_compile: bool = False):
    """KerasCV's own `StableDiffusion(V2)` object sharing `model`'s sub-models.

    For parity tests and benchmarks against KerasCV's `generate_image` loop. KerasCV's
    constructor rounds sizes to multiples of 128; its loop takes any size its sub-models
    have, so the object is told `model`'s size (any multiple of 64) after it is made.
    The sub-models are shared as they are: on a CPU under TensorFlow they run sdanim's
    layer forms (`use_fast_layers`); call `use_fast_layers(part, enabled=False)` first
    for KerasCV's own computation.
    """
    keras_cv = import_keras_cv()
    cls = keras_cv.models.StableDiffusionV2 if model.version == "2.1" else keras_cv.models.StableDiffusion
    pipeline = cls(img_height=max(128, model.height), img_width=max(128, model.width), jit_compile=jit_compile)
    pipeline.img_height, pipeline.img_width = model.height, model.width  # the size of the noise it draws
    try:
        pipeline._tokenizer = model.tokenizer  # KerasCV's own would download the vocab
    except SdanimError:
        pass  # no openai-clip here (e.g. a GPU box): fine for generate_image, which needs none
    pipeline._text_encoder = model.text_encoder
    pipeline._diffusion_model = model.diffusion_model
    pipeline._decoder = model.decoder
    for sub in (model.text_encoder, model.diffusion_model, model.decoder):
        sub.compile(jit_compile=jit_compile)  # what KerasCV's predict_on_batch runs under
    return pipeline
