"""Tiny Keras stand-ins with the KerasCV sub-models' call signatures (diffusers'
get_dummy_components idea): fast enough to run whole pipelines in milliseconds."""

from __future__ import annotations

import dataclasses
import zlib

import keras
import numpy as np

CONTEXT_DIM = 16


class TinyTokenizer:
    """Words -> stable ids in [1, 1000); start and end tokens as CLIP's."""

    def encode(self, text: str):
        ids = [zlib.crc32(w.encode()) % 999 + 1 for w in text.lower().split()]
        return [49406] + ids + [49407]


def tiny_text_encoder(dim: int = CONTEXT_DIM):
    tokens = keras.Input((77,), dtype="int32", name="tokens")
    positions = keras.Input((77,), dtype="int32", name="positions")
    x = keras.layers.Embedding(49408, dim)(tokens) + keras.layers.Embedding(77, dim)(positions)
    x = keras.layers.Dense(dim, activation="tanh")(x)
    return keras.Model([tokens, positions], x, name="tiny_text_encoder")


def tiny_unet(height: int, width: int, dim: int = CONTEXT_DIM):
    latent = keras.Input((height // 8, width // 8, 4), name="latent")
    t_emb = keras.Input((320,), name="timestep_embedding")
    context = keras.Input((77, dim), name="context")
    x = keras.layers.Conv2D(8, 3, padding="same")(latent)
    t = keras.layers.Dense(8)(t_emb)[:, None, None, :]  # (B, 1, 1, 8)
    # Each token projected, as a cross-attention's keys and values are (the layer a
    # context model reuses: `attach_context_cache`), then pooled.
    projection = keras.layers.Dense(8, name="context_projection")
    c = keras.ops.mean(projection(context), axis=1)[:, None, None, :]  # (B, 77, 8) -> (B, 1, 1, 8)
    x = keras.activations.tanh(x + t + c)
    out = keras.layers.Conv2D(4, 3, padding="same")(x)
    return keras.Model([latent, t_emb, context], out, name="tiny_unet")


def tiny_attention_unet(height: int, width: int, dim: int = CONTEXT_DIM):
    """A UNet with one of KerasCV's own transformer blocks (self-attention, then
    cross-attention to the context): the layers sdanim's attention interpolation and
    context cache work on, at a few thousand parameters."""
    from keras_cv.src.models.stable_diffusion.diffusion_model import SpatialTransformer

    latent = keras.Input((height // 8, width // 8, 4), name="latent")
    t_emb = keras.Input((320,), name="timestep_embedding")
    context = keras.Input((77, dim), name="context")
    x = keras.layers.Conv2D(32, 3, padding="same")(latent)
    x = x + keras.layers.Dense(32)(t_emb)[:, None, None, :]  # (B, h, w, 32)
    x = SpatialTransformer(2, 16)([x, context])  # 2 heads of 16: GroupNormalization's 32 groups
    out = keras.layers.Conv2D(4, 3, padding="same")(x)
    return keras.Model([latent, t_emb, context], out, name="tiny_attention_unet")


def tiny_decoder(height: int, width: int):
    latent = keras.Input((height // 8, width // 8, 4))
    x = keras.layers.UpSampling2D(8)(latent)
    x = keras.layers.Conv2D(3, 3, padding="same", activation="tanh")(x)
    return keras.Model(latent, x, name="tiny_decoder")


def tiny_image_encoder():
    image = keras.Input((None, None, 3))
    x = keras.layers.AveragePooling2D(8)(image)
    x = keras.layers.Conv2D(4, 1)(x)
    return keras.Model(image, x, name="tiny_image_encoder")


@dataclasses.dataclass
class TinyModel:
    height: int
    width: int
    tokenizer: object
    text_encoder: object
    diffusion_model: object
    decoder: object
    image_encoder: object = None
    jit_compile: bool = False
    taesd: object = None  # TAESD weights for decoder="tiny" (a file), as StableDiffusionModel.taesd
    _tiny_decoder: object = None

    @property
    def tiny_decoder(self):
        from sdanim.model.taesd import check_taesd, load_part

        if self._tiny_decoder is None:
            self._tiny_decoder = load_part(check_taesd(self.taesd), "decoder")
        return self._tiny_decoder

    def describe(self):
        return {"version": "tiny", "weights": "tiny", "height": self.height, "width": self.width, "precision": "float32"}


def attach_context_cache(unet) -> int:
    """The tiny UNet's context projection made once per batch, as `load_model` does for
    KerasCV's cross-attentions (sdanim.context_cache)."""
    from sdanim.model import context_cache

    layer = unet.get_layer("context_projection")
    return context_cache.attach(unet, [layer], tuple(unet.inputs[2].shape[1:]))


def make_tiny_model(height: int = 64, width: int = 64, seed: int = 0, context_cache: bool = True,
                    attention: bool = False) -> TinyModel:
    """attention: the UNet has KerasCV's attention layers (`tiny_attention_unet`), made
    ready for attention interpolation as `load_model` makes the real one."""
    keras.utils.set_random_seed(seed)
    if attention:
        from sdanim.model import layers

        unet = tiny_attention_unet(height, width)
        if context_cache:
            layers.attach_context_cache(unet)
        layers.attach_attention_interp(unet)
    else:
        unet = tiny_unet(height, width)
        if context_cache:
            attach_context_cache(unet)
    return TinyModel(
        height, width, TinyTokenizer(), tiny_text_encoder(), unet,
        tiny_decoder(height, width), tiny_image_encoder(),
    )


def random_inputs(batch: int, height: int, width: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    contexts = rng.standard_normal((batch, 77, CONTEXT_DIM), dtype=np.float32)
    noises = rng.standard_normal((batch, height // 8, width // 8, 4), dtype=np.float32)
    return contexts, noises
