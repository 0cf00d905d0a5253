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
    """Tokens embedded CONTEXT_DIM wide, then a dense layer to the context's width `dim`."""
    tokens = keras.Input((77,), dtype="int32", name="tokens")
    positions = keras.Input((77,), dtype="int32", name="positions")
    x = keras.layers.Embedding(49408, CONTEXT_DIM)(tokens) + keras.layers.Embedding(77, CONTEXT_DIM)(positions)
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
    version: str = "1.4"  # the SD family its UNet's structure is (ControlNets check it)

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


# A UNet of KerasCV's structure (its DiffusionModel, layer for layer, from KerasCV's own
# blocks) at a few channels: what ControlNet, motion modules and checkpoint parity need
# from a UNet, in seconds. TINY_SD: SD 1.x's form (convolutional projections); linear=True:
# SD 2.x's. (Channels that change at every down level, as SD's: its weight map expects a shortcut there.)
TINY_SD = dict(channels=(32, 64, 96, 96), heads=(2, 2, 2), context_dim=CONTEXT_DIM, linear=False)


class DiffusionModelTiny(keras.Model):
    """KerasCV's DiffusionModel at `channels` per level (the name keeps its weight map's
    layer order: `sdanim.formats.weight_map.keras_leaves`)."""

    def __init__(self, height, width, channels=(32, 64, 96, 96), heads=(2, 2, 2), context_dim=CONTEXT_DIM,
                 linear=False, max_text_length=77, name=None):
        from keras_cv.src.models.stable_diffusion.diffusion_model import ResBlock, SpatialTransformer, Upsample
        from keras_cv.src.models.stable_diffusion.padded_conv2d import PaddedConv2D

        c = channels
        sizes = [c[i] // heads[i] for i in range(3)]
        context = keras.layers.Input((max_text_length, context_dim), name="context")
        t_embed_input = keras.layers.Input((320,), name="timestep_embedding")
        latent = keras.layers.Input((height // 8, width // 8, 4), name="latent")
        t_emb = keras.layers.Dense(4 * c[0])(t_embed_input)
        t_emb = keras.layers.Activation("swish")(t_emb)
        t_emb = keras.layers.Dense(4 * c[0])(t_emb)
        outputs = []
        x = PaddedConv2D(c[0], kernel_size=3, padding=1)(latent)
        outputs.append(x)
        for level in range(4):
            for _ in range(2):
                x = ResBlock(c[level])([x, t_emb])
                if level < 3:
                    x = SpatialTransformer(heads[level], sizes[level], fully_connected=linear)([x, context])
                outputs.append(x)
            if level < 3:
                x = PaddedConv2D(c[level], 3, strides=2, padding=1)(x)
                outputs.append(x)
        x = ResBlock(c[3])([x, t_emb])
        x = SpatialTransformer(heads[2], sizes[2], fully_connected=linear)([x, context])
        x = ResBlock(c[3])([x, t_emb])
        for level in (3, 2, 1, 0):
            for _ in range(3):
                x = keras.layers.Concatenate()([x, outputs.pop()])
                x = ResBlock(c[level])([x, t_emb])
                if level < 3:
                    x = SpatialTransformer(heads[level], sizes[level], fully_connected=linear)([x, context])
            if level > 0:
                x = Upsample(c[level])(x)
        x = keras.layers.GroupNormalization(epsilon=1e-5)(x)
        x = keras.layers.Activation("swish")(x)
        output = PaddedConv2D(4, kernel_size=3, padding=1)(x)
        super().__init__([latent, t_embed_input, context], output, name=name)


def make_tiny_sd_model(height: int = 64, width: int = 64, seed: int = 0, linear: bool = False,
                       context_dim: int = CONTEXT_DIM) -> TinyModel:
    """A tiny model whose UNet has KerasCV's structure (`DiffusionModelTiny`), made ready
    as load_model makes the real one (context cache, attention interpolation)."""
    from sdanim.model import layers

    keras.utils.set_random_seed(seed)
    with layers.built_in_one_trace():  # as load_model builds the real one
        unet = DiffusionModelTiny(height, width, **dict(TINY_SD, linear=linear, context_dim=context_dim))
    layers.attach_context_cache(unet)
    layers.attach_attention_interp(unet)
    return TinyModel(height, width, TinyTokenizer(), tiny_text_encoder(context_dim), unet, tiny_decoder(height, width),
                     tiny_image_encoder(), version="2.1" if linear else "1.4")


def tiny_sd3_configs():
    """(SD3's layout, 3.5 medium's MMDiT-X): tiny SD3-family architectures with the real
    structure (KerasHub's pieces; the VAE keeps its four levels, so its scale is 8)."""
    import dataclasses

    from sdanim.model import sd3

    sd3_config = sd3.SD3Config(
        hidden_dim=64, num_layers=3, num_heads=2, position_size=16, qk_norm=None, dual_attention=(),
        clip_l=sd3.ClipConfig(32, 2, 2, 64, "quick_gelu"), clip_g=sd3.ClipConfig(48, 2, 2, 96, "gelu"),
        vae_filters=(32, 32, 32, 32), vae_blocks=1)
    return sd3_config, dataclasses.replace(sd3_config, qk_norm="rms_norm", dual_attention=(0, 1))


def make_tiny_sd3_model(height: int = 64, width: int = 64, seed: int = 1):
    """A tiny SD3 model (3.5 medium's MMDiT-X layout) with seeded random weights, wrapped as
    `load_sd3` wraps the real one."""
    from sdanim.model import sd3

    keras.utils.set_random_seed(seed)
    config = tiny_sd3_configs()[1]
    return sd3.wrap("sd3-medium", sd3.build_backbone(config, height, width, "float32"), height, width, "random",
                    "float32")
