"""ControlNet (Zhang, Rao & Agrawala 2023) for SD 1.x/2.x in Keras, on KerasCV's UNet
blocks: structure that holds while the prompt travels.

A ControlNet is a trainable copy of the UNet's encoder (time embedding, conv_in, the four
down levels and the mid block, built here from KerasCV's own `ResBlock`,
`SpatialTransformer` and `PaddedConv2D`, in the order KerasCV's `DiffusionModel` builds
them) that also sees a hint image:

    hint (B, H, W, 3) -> conv 3->16, SiLU, 6 convs 16->32->96->256 (stride 2 thrice),
    SiLU after each, zero conv 256->C0 -> added to conv_in(latent) (B, H/8, W/8, C0)
    -> down blocks, mid block: 12 skip tensors and the mid block's output
    -> 13 zero 1x1 convs -> residuals, added to the UNet's skip connections and mid block

    controlnet([latent, t_emb, context, hint]) -> 13 residuals (before any scale)
    controlled_unet(unet)([latent, t_emb, context, r_0 .. r_11, r_mid]) -> eps

`controlled_unet` is the UNet itself (the same layer objects: its weights, LoRAs,
context cache and attention interpolation) with the residuals added where diffusers'
UNet2DConditionModel adds them: to each skip connection before the up flow takes it, and
to the mid block's output. Its configuration (channels, heads, linear projections,
context width) is read off the UNet it is built for (`ControlNetConfig.from_unet`), so a
net always matches its UNet (tests build tiny ones).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import weakref
from typing import Sequence

import numpy as np

from sdanim.config.control import ControlNetSpec
from sdanim.config.errors import check
from sdanim.core.runtime import import_keras, import_keras_cv
from sdanim.formats.controlnet_files import ControlNetFile, inspect_controlnet
from sdanim.formats.digest import weights_sha256
from sdanim.formats.weight_map import bind
from sdanim.model.layers import (
    BUILD_LOCK, attach_context_cache, built_in_one_trace, use_fast_layers, use_fused_attention, uses_fast_layers,
)
from sdanim.model.stable_diffusion import model_state

HINT_CHANNELS = (16, 32, 96, 256)  # every released SD 1.x/2.x ControlNet's conditioning embedding
RESIDUALS = 13  # 12 skip connections + the mid block


def _blocks():
    import_keras_cv()
    from keras_cv.src.models.stable_diffusion.diffusion_model import ResBlock, SpatialTransformer
    from keras_cv.src.models.stable_diffusion.padded_conv2d import PaddedConv2D

    return ResBlock, SpatialTransformer, PaddedConv2D


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """What a ControlNet's shapes follow: its UNet's channels per level, the heads and
    head size of each attention level, linear (SD 2.x) or convolutional (SD 1.x)
    projections, and the text context's width."""

    channels: tuple  # (C0, C1, C2, C3)
    heads: tuple  # per attention level (3)
    head_sizes: tuple
    linear: bool
    context_dim: int
    hint_channels: tuple = HINT_CHANNELS

    @classmethod
    def from_unet(cls, unet) -> "ControlNetConfig":
        """Read off a KerasCV-structured UNet (`DiffusionModel`, `DiffusionModelV2`, or a
        test's tiny one): refused in one line for a UNet of another structure."""
        ResBlock, SpatialTransformer, _ = _blocks()
        res = [layer for layer in unet.layers if isinstance(layer, ResBlock)]
        attn = [layer for layer in unet.layers if isinstance(layer, SpatialTransformer)]
        concats = [layer for layer in unet.layers if type(layer).__name__ == "Concatenate"]
        check(len(res) == 22 and len(attn) == 16 and len(concats) == 12,
              "ControlNet needs a Stable Diffusion UNet (KerasCV's structure: 22 ResBlocks, 16 SpatialTransformers, "
              f"12 skip connections). Received: a UNet with {len(res)}, {len(attn)}, {len(concats)}")
        down = [attn[0], attn[2], attn[4]]  # the first transformer of each attention level
        heads = tuple(int(t.transformer_block.attn1.num_heads) for t in down)
        sizes = tuple(int(t.transformer_block.attn1.head_size) for t in down)
        linear = type(attn[0].proj1).__name__ == "Dense"
        channels = tuple(int(res[2 * i].output_dim) for i in range(4))
        return cls(channels, heads, sizes, linear, int(unet.inputs[2].shape[-1]))

    def residual_channels(self) -> list:
        """The channels of the 12 skip connections and the mid block, in order."""
        c = self.channels
        return [c[0]] * 4 + [c[1]] * 3 + [c[2]] * 3 + [c[3]] * 2 + [c[3]]


def _hint_size(height: int, width: int) -> tuple:
    return height * 8, width * 8


def build_controlnet(config: ControlNetConfig, latent_height: int, latent_width: int, context_length: int = 77):
    """The ControlNet as a Keras functional model for latents of (latent_height,
    latent_width): [latent (h, w, 4), t_emb (320,), context (77, D), hint (8h, 8w, 3)] ->
    13 residuals. Its blocks are kept in construction order (`blocks_in_order`) for
    `sdanim.formats.weight_map.bind`."""
    keras = import_keras()
    ResBlock, SpatialTransformer, PaddedConv2D = _blocks()
    c = config.channels
    blocks = []

    def add(layer):
        blocks.append(layer)
        return layer

    latent = keras.Input((latent_height, latent_width, 4), name="latent")
    t_input = keras.Input((320,), name="timestep_embedding")
    context = keras.Input((context_length, config.context_dim), name="context")
    hint = keras.Input(_hint_size(latent_height, latent_width) + (3,), name="hint")

    t_emb = add(keras.layers.Dense(4 * c[0]))(t_input)
    t_emb = keras.layers.Activation("swish")(t_emb)
    t_emb = add(keras.layers.Dense(4 * c[0]))(t_emb)
    x = add(PaddedConv2D(c[0], kernel_size=3, padding=1))(latent)

    # The conditioning embedding: the hint down to the latent's size.
    h = keras.layers.Activation("swish")(add(PaddedConv2D(config.hint_channels[0], 3, padding=1))(hint))
    for k in range(len(config.hint_channels) - 1):
        inner, outer = config.hint_channels[k], config.hint_channels[k + 1]
        h = keras.layers.Activation("swish")(add(PaddedConv2D(inner, 3, padding=1))(h))
        h = keras.layers.Activation("swish")(add(PaddedConv2D(outer, 3, padding=1, strides=2))(h))
    x = x + add(PaddedConv2D(c[0], 3, padding=1))(h)  # (B, h, w, C0)

    # The UNet's encoder, as KerasCV's DiffusionModel builds it.
    skips = [x]
    for level in range(4):
        for _ in range(2):
            x = add(ResBlock(c[level]))([x, t_emb])
            if level < 3:
                x = add(SpatialTransformer(config.heads[level], config.head_sizes[level],
                                           fully_connected=config.linear))([x, context])
            skips.append(x)
        if level < 3:
            x = add(PaddedConv2D(c[level], 3, strides=2, padding=1))(x)  # downsample 2x
            skips.append(x)
    x = add(ResBlock(c[3]))([x, t_emb])
    x = add(SpatialTransformer(config.heads[2], config.head_sizes[2], fully_connected=config.linear))([x, context])
    x = add(ResBlock(c[3]))([x, t_emb])

    residuals = [add(PaddedConv2D(channels, 1))(skip) for skip, channels in zip(skips, config.residual_channels())]
    residuals.append(add(PaddedConv2D(c[3], 1))(x))
    model = keras.Model([latent, t_input, context, hint], residuals, name="controlnet")
    model.blocks_in_order = blocks
    model.config = config
    return model


# UNet -> its controlled copy (the same layers, residual inputs), made once per UNet.
_CONTROLLED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def controlled_unet(unet):
    """The UNet with the 13 ControlNet residuals as inputs: [latent, t_emb, context,
    r_0 .. r_11, r_mid] -> eps. Its layers are the UNet's own objects (one set of
    weights; a LoRA merged into the UNet is the controlled UNet's too). Made once per UNet.

    The residuals are added where diffusers adds them: skip connection k, (B, h_k, w_k,
    C_k), before the up flow concatenates it (KerasCV pops them last to first), and the
    mid block's output before the first concatenation."""
    entry = _CONTROLLED.get(unet)
    if entry is not None:
        return entry
    keras = import_keras()
    ControlNetConfig.from_unet(unet)  # a UNet of another structure: one line
    latent, t_emb, context = (keras.Input(tuple(x.shape[1:]), name=x.name) for x in unet.inputs)
    skip_shapes, mid_shape = _skip_shapes(unet)
    residuals = [keras.Input(shape, name=f"residual_{k}") for k, shape in enumerate(skip_shapes)]
    mid = keras.Input(mid_shape, name="residual_mid")
    state = {"joins": 0}

    def operation(op):
        if type(op).__name__ != "Concatenate":
            return op

        def joined(inputs, *args, **kwargs):
            x, skip = inputs  # the up flow's tensor and the skip connection it takes
            k = state["joins"]
            state["joins"] += 1
            if k == 0:
                x = x + mid
            return op([x, skip + residuals[len(residuals) - 1 - k]], *args, **kwargs)

        return joined

    eps = unet._run_through_graph([latent, t_emb, context], operation_fn=operation)
    check(state["joins"] == len(residuals), f"internal: {state['joins']} skip connections joined, not 12")
    model = keras.Model([latent, t_emb, context, *residuals, mid], eps, name="controlled_unet")
    _CONTROLLED[unet] = model
    return model


def _skip_shapes(unet) -> tuple:
    """The shapes (without the batch) of the UNet's 12 skip connections in the order the
    down flow makes them, and of its mid block's output, read off its concatenations."""
    concats = [layer for layer in unet.layers if type(layer).__name__ == "Concatenate"]
    # KerasCV's up flow concatenates [x, skip] for skips last to first; the first join's
    # x is the mid block's output.
    shapes = []
    for layer in concats:
        x_shape, skip_shape = (tuple(t.shape[1:]) for t in layer._inbound_nodes[0].input_tensors)
        shapes.append(skip_shape)
        if len(shapes) == 1:
            mid = x_shape
    return shapes[::-1], mid


def residual_shapes(unet) -> list:
    """The 13 residuals' shapes (without the batch) a UNet takes, skips then mid."""
    skips, mid = _skip_shapes(unet)
    return list(skips) + [mid]


@dataclasses.dataclass(eq=False)
class LoadedControlNet:
    """A ControlNet built for one model's UNet: the Keras net, the checked file it holds,
    the file's SHA-256, and its context model (the text's keys and values made once per
    batch, `sdanim.model.context_cache`)."""

    net: object
    file: ControlNetFile
    sha256: str

    @property
    def pooled(self) -> bool:
        return self.file.pooled

    def record(self) -> dict:
        return {"file": os.path.basename(self.file.path.rstrip("/")), "sha256": self.sha256,
                "version": self.file.version, "pooled": self.pooled}


def random_controlnet(unet, version: str, seed: int = 0) -> LoadedControlNet:
    """A ControlNet for `unet` with seeded random weights, the zero convolutions too (every
    residual non-zero): the whole pipeline runs offline, as --weights random does."""
    keras = import_keras()
    config = ControlNetConfig.from_unet(unet)
    latent = unet.inputs[0].shape
    with BUILD_LOCK, built_in_one_trace():
        keras.utils.set_random_seed(seed)
        net = build_controlnet(config, int(latent[1]), int(latent[2]), int(unet.inputs[2].shape[1]))
    attach_context_cache(net)
    file = ControlNetFile(path=RANDOM, layout="random", version=version, tensors={}, context_dim=config.context_dim)
    return LoadedControlNet(net, file, RANDOM)


def load_controlnet(unet, file: ControlNetFile, version: str, digest: str = None) -> LoadedControlNet:
    """A ControlNet for `unet` (of SD `version`) with `file`'s weights: a net for another
    SD version is refused in one line; every tensor is checked before any is assigned."""
    check(file.version == version,
          f"this ControlNet is for Stable Diffusion {file.version[0]}.x and the model is {version[0]}.x; use a "
          f"ControlNet made for it. Received: controlnet={file.path!r}")
    config = ControlNetConfig.from_unet(unet)
    check(file.context_dim == config.context_dim,
          f"this ControlNet takes a text context {file.context_dim} wide and the model's is {config.context_dim}; "
          f"use a ControlNet made for this model. Received: controlnet={file.path!r}")
    latent = unet.inputs[0].shape
    with built_in_one_trace():
        net = build_controlnet(config, int(latent[1]), int(latent[2]), int(unet.inputs[2].shape[1]))
    bind(net, file, "controlnet")
    attach_context_cache(net)  # the text's keys and values once per batch, as the UNet's
    return LoadedControlNet(net, file, digest or weights_sha256(file.path))


@dataclasses.dataclass(frozen=True, eq=False)
class ControlUnit:
    """A loaded ControlNet as a renderer runs it: the net, guess mode, and the fraction
    of the steps it acts in (step i of N when start <= i / N and (i + 1) / N <= end)."""

    net: LoadedControlNet
    guess_mode: bool = False
    start: float = 0.0
    end: float = 1.0

    def keeps(self, num_steps: int) -> np.ndarray:
        """(N,) 1.0 where the net acts at step i, else 0.0 (diffusers' controlnet_keep)."""
        return np.array([0.0 if (i / num_steps < self.start or (i + 1) / num_steps > self.end) else 1.0
                         for i in range(num_steps)], np.float32)


# (path, size, mtime) -> (ControlNetFile, SHA-256): a file is read and hashed once.
_CHECKED: dict = {}


RANDOM = "random"  # a ControlNet of the model's exact architecture with seeded random weights (offline smoke runs)


def checked_controlnet(path: str) -> tuple:
    """(ControlNetFile, its SHA-256) for a ControlNet file or folder: recognised (one
    line for anything else), hashed once while the file stays as it is. "random": (None,
    "random"), a net with random weights built for the model."""
    if path == RANDOM:
        return None, RANDOM
    path = os.fspath(path)
    check(os.path.exists(path), f"the ControlNet weights do not exist. Received: controlnet={path!r}")
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _CHECKED:
        file = inspect_controlnet(path)
        _CHECKED[key] = (file, weights_sha256(path))
    return _CHECKED[key]


def controlnets_for(model, specs: Sequence[ControlNetSpec]) -> list:
    """The `ControlUnit`s a renderer of `model` runs for `specs`: each net built once per
    model (its UNet's shapes and layer forms, the model's precision) and kept. A pooled
    net runs in guess mode, as diffusers' pipeline runs it."""
    state = model_state(model)
    version = getattr(model, "version", "1.4")
    units = []
    for spec in specs:
        file, digest = checked_controlnet(spec.file)
        loaded = state.controlnets.get(digest)
        if loaded is None:
            with _dtype_policy(getattr(model, "precision", None)):
                loaded = (random_controlnet(model.diffusion_model, version) if file is None
                          else load_controlnet(model.diffusion_model, file, version, digest))
            if getattr(model, "attention", "keras-cv") == "fused":
                use_fused_attention(loaded.net)
            if uses_fast_layers(model.diffusion_model):
                use_fast_layers(loaded.net)
            state.controlnets[digest] = loaded
        units.append(ControlUnit(loaded, spec.guess_mode or loaded.pooled, spec.start, spec.end))
    return units


@contextlib.contextmanager
def _dtype_policy(name):
    """Builds under the model's precision (Keras's policy is global), then puts back the
    policy it found."""
    keras = import_keras()
    previous = keras.config.dtype_policy()
    if name:
        keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def guess_scales() -> np.ndarray:
    """Guess mode's weights of the 13 residuals: logspace(-1, 0, 13), 0.1 for the first
    skip connection up to 1 for the mid block (diffusers' ControlNetModel)."""
    return np.logspace(-1.0, 0.0, RESIDUALS).astype(np.float32)


__all__ = ["ControlNetConfig", "ControlUnit", "checked_controlnet", "controlnets_for", "build_controlnet", "controlled_unet", "residual_shapes",
           "load_controlnet", "LoadedControlNet", "guess_scales", "HINT_CHANNELS", "RESIDUALS"]
