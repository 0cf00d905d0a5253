"""AnimateDiff's motion modules (Guo et al. 2023) for SD 1.x in Keras: temporal attention
that makes the frames of one UNet call move together.

A motion module is a temporal transformer with a residual; it sees the frames of a call
as a sequence at every latent pixel:

    x (B*F, h, w, C) -> GroupNorm (per frame, or over the F frames: `norm`) -> (B*h*w, F, C)
    -> proj_in -> [LayerNorm -> + sinusoid -> self-attention over F] x 2
    -> LayerNorm -> GEGLU feed-forward -> proj_out -> back to (B*F, h, w, C) -> + x

(each step with its residual). One follows each resnet/attention pair of the UNet's down
and up levels (2 per down level, 3 per up level) and, for v2, the mid block's attention.

    motion_unet(unet, modules, frames)([latent, t_emb, context]) -> eps

is the UNet itself (the same layer objects: its weights, LoRAs and context cache) run
again with the modules inserted (`Functional._run_through_graph`, as `controlled_unet`
does); its rows are B clips of `frames` frames each, clip-major, every row with its own
time embedding and text context (prompt travel).

`spatial_chunk=N` runs every layer of the UNet itself (resnets, attention: each row on its
own) on at most N rows at a time and joins the results, so a window's spatial activations
(self-attention's maps above all) are held for N rows, not all of them; the motion modules
still see every frame of the call (diffusers' `enable_free_noise_split_inference`).

`norm="frame"` (the default) normalises each frame on its own, as the original modules
were trained and as ComfyUI runs them; `norm="window"` takes the statistics over all the
frames of the call, as diffusers' `UNetMotionModel` does.
"""

from __future__ import annotations

import dataclasses
import math
import weakref

import numpy as np

from sdanim.config.errors import SdanimError, check
from sdanim.config.motion import MOTION_NORMS, MotionSpec
from sdanim.core.runtime import import_keras
from sdanim.formats.digest import weights_sha256
from sdanim.formats.motion_files import MODULE_TENSORS, MotionFile, inspect_motion_module, module_names
from sdanim.model.torch_weights import assign

NORMS = MOTION_NORMS
HEADS = 8  # every released SD 1.x motion module


def sinusoid(positions: int, channels: int) -> np.ndarray:
    """AnimateDiff's position encoding (positions, channels): sin on even channels, cos on
    odd, frequencies 10000^(-2i/C)."""
    position = np.arange(positions, dtype=np.float64)[:, None]
    frequency = np.exp(np.arange(0, channels, 2, dtype=np.float64) * (-math.log(10000.0) / channels))
    pe = np.zeros((positions, channels), np.float64)
    pe[:, 0::2] = np.sin(position * frequency)
    pe[:, 1::2] = np.cos(position * frequency)
    return pe.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class MotionConfig:
    """A set of motion modules' shape: positions (the longest window), whether the mid
    block has one, how the GroupNorm takes its statistics."""

    positions: int = 32
    mid: bool = True
    norm: str = "frame"

    def __post_init__(self):
        check(self.norm in NORMS, f"motion_norm must be one of {', '.join(NORMS)}. Received: {self.norm!r}")


def _temporal_transformer_class():
    keras = import_keras()
    ops = keras.ops

    class TemporalTransformer(keras.layers.Layer):
        """One motion module on (B*F, h, w, C) rows, F = `frames` (see the module docstring)."""

        def __init__(self, channels: int, frames: int, positions: int, norm: str = "frame", heads: int = HEADS,
                     groups: int = 32, windows=None, fusion=None, **kwargs):
            super().__init__(**kwargs)
            self.channels, self.frames, self.norm_mode, self.heads = channels, frames, norm, heads
            # Attention windows (FreeNoise's fusion): each window's frames attend among
            # themselves, the results blended per frame; None: all `frames` attend together.
            self.windows = None if windows is None or len(windows) == 1 else [np.asarray(w) for w in windows]
            length = frames if self.windows is None else len(self.windows[0])
            check(length <= positions, f"context must be at most {positions} frames for these motion modules "
                                       f"(their position encoding's length). Received: context={length}")
            self.pe = sinusoid(positions, channels)[:length]
            if self.windows is not None:
                self.fusion = [np.asarray(w, np.float32) for w in fusion]
                self.coverage = np.zeros(frames, np.float32)
                for window, weights in zip(self.windows, self.fusion):
                    np.add.at(self.coverage, window, weights)
            dense = keras.layers.Dense
            self.norm = keras.layers.GroupNormalization(groups, epsilon=1e-6, name="norm")
            self.proj_in = dense(channels, name="proj_in")
            self.attn = [{n: dense(channels, use_bias=n == "to_out", name=f"attn{k}_{n}")
                          for n in ("to_q", "to_k", "to_v", "to_out")} for k in (1, 2)]
            self.norms = [keras.layers.LayerNormalization(epsilon=1e-5, name=f"norm{k}") for k in (1, 2, 3)]
            self.ff_in = dense(channels * 8, name="ff_proj")
            self.ff_out = dense(channels, name="ff_out")
            self.proj_out = dense(channels, name="proj_out")

        def build(self, input_shape):
            c = self.channels
            self.norm.build((None, None, None, c))
            for layer in (self.proj_in, self.proj_out, *self.norms,
                          *(layer for attn in self.attn for layer in attn.values())):
                layer.build((None, None, c))
            self.ff_in.build((None, None, c))
            self.ff_out.build((None, None, c * 4))
            self.built = True

        def torch_layers(self) -> dict:
            """{diffusers module name: Keras layer} within the module."""
            layers = {"norm": self.norm, "proj_in": self.proj_in, "proj_out": self.proj_out,
                      "transformer_blocks.0.ff.net.0.proj": self.ff_in, "transformer_blocks.0.ff.net.2": self.ff_out}
            for k, attn in enumerate(self.attn, 1):
                for n, layer in attn.items():
                    layers[f"transformer_blocks.0.attn{k}.{'to_out.0' if n == 'to_out' else n}"] = layer
            for k, layer in enumerate(self.norms, 1):
                layers[f"transformer_blocks.0.norm{k}"] = layer
            return layers

        def _attend(self, x, attn):
            f, c, heads = x.shape[1], self.channels, self.heads

            def split(t):  # (N, F, C) -> (N, heads, F, C / heads)
                return ops.transpose(ops.reshape(t, (-1, f, heads, c // heads)), (0, 2, 1, 3))

            q, k, v = (split(attn[n](x)) for n in ("to_q", "to_k", "to_v"))
            scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) * ((c // heads) ** -0.5)
            out = ops.matmul(ops.softmax(scores, axis=-1), v)
            return attn["to_out"](ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (-1, f, c)))

        def call(self, x):
            f, c = self.frames, self.channels
            h, w = x.shape[1], x.shape[2]
            if self.norm_mode == "window":  # the statistics over the F frames of each clip
                hidden = ops.reshape(self.norm(ops.reshape(x, (-1, f * h, w, c))), (-1, h, w, c))
            else:
                hidden = self.norm(x)
            hidden = ops.reshape(ops.transpose(ops.reshape(hidden, (-1, f, h, w, c)), (0, 2, 3, 1, 4)), (-1, f, c))
            hidden = self.proj_in(hidden)
            if self.windows is None:
                hidden = self._attentions(hidden)
            else:
                hidden = self._windowed_attentions(hidden)
            projected = self.ff_in(self.norms[2](hidden))
            value, gate = ops.split(projected, 2, axis=-1)
            hidden = self.ff_out(value * keras.activations.gelu(gate, approximate=False)) + hidden
            hidden = self.proj_out(hidden)
            hidden = ops.reshape(ops.transpose(ops.reshape(hidden, (-1, h, w, f, c)), (0, 3, 1, 2, 4)), (-1, h, w, c))
            return hidden + x

        def _attentions(self, hidden):
            """The two temporal self-attentions (each with its residual) over axis 1."""
            pe = ops.convert_to_tensor(self.pe[None], dtype=hidden.dtype)
            for attn, norm in zip(self.attn, self.norms[:2]):
                hidden = self._attend(norm(hidden) + pe, attn) + hidden
            return hidden

        def _windowed_attentions(self, hidden):
            """FreeNoise's window fusion (diffusers' FreeNoiseTransformerBlock): each window's
            frames through `_attentions` on their own, positions counted from the window's
            start; each frame's results averaged with the window weights. A window that wraps
            round (a closed loop) is gathered and scattered in its consecutive runs."""
            f = self.frames
            total = None
            for window, fusion in zip(self.windows, self.fusion):
                runs = np.split(window, np.flatnonzero(np.diff(window) != 1) + 1)
                chunk = ops.concatenate([hidden[:, int(r[0]):int(r[-1]) + 1] for r in runs], axis=1)
                weights = ops.convert_to_tensor(fusion[None, :, None], dtype=hidden.dtype)
                out = self._attentions(chunk) * weights
                start = 0
                for r in runs:
                    piece = out[:, start:start + len(r)]
                    start += len(r)
                    piece = ops.pad(piece, [[0, 0], [int(r[0]), f - int(r[-1]) - 1], [0, 0]])
                    total = piece if total is None else total + piece
            return total / ops.convert_to_tensor(self.coverage[None, :, None], dtype=hidden.dtype)

    return TemporalTransformer


_CLASS = []


def temporal_transformer(channels: int, frames: int, positions: int, norm: str = "frame", name: str = None,
                         windows=None, fusion=None):
    if not _CLASS:
        _CLASS.append(_temporal_transformer_class())
    return _CLASS[0](channels, frames, positions, norm, name=name, windows=windows, fusion=fusion)


def motion_positions(unet, mid: bool) -> list:
    """The UNet's layers each motion module follows, in the order the UNet runs them (the
    names of `formats.motion_files.module_names`): every SpatialTransformer, and every
    ResBlock that no SpatialTransformer follows, except the mid block's last ResBlock;
    the mid block's SpatialTransformer only where `mid`."""
    kinds = {"ResBlock": "res", "SpatialTransformer": "attn", "Concatenate": "join"}
    order = [(layer, kinds[type(layer).__name__]) for layer in unet.layers if type(layer).__name__ in kinds]

    def feeds_attention(layer) -> bool:
        return any(type(node.operation).__name__ == "SpatialTransformer" for node in layer._outbound_nodes)

    first_join = next(i for i, (_, kind) in enumerate(order) if kind == "join")
    down_and_mid = [layer for layer, kind in order[:first_join]
                    if kind == "attn" or (kind == "res" and not feeds_attention(layer))]
    up = [layer for layer, kind in order[first_join:]
          if kind == "attn" or (kind == "res" and not feeds_attention(layer))]
    # down_and_mid: 8 down positions, the mid block's attention, the mid block's last ResBlock.
    check(len(down_and_mid) == 10 and len(up) == 12,
          f"motion modules fit SD 1.x's UNet (10 + 12 resnet/attention ends); this UNet has "
          f"{len(down_and_mid)} + {len(up)}. Received: unet={unet.name!r}")
    return down_and_mid[:8] + (down_and_mid[8:9] if mid else []) + up


@dataclasses.dataclass
class MotionModules:
    """Loaded motion modules, by diffusers' module names, with what they came from."""

    config: MotionConfig
    weights: dict  # module name -> {diffusers tensor name: array}
    version: str = "random"
    digest: str = ""

    def describe(self) -> str:
        return f"motion modules {self.version} ({self.config.positions} positions, norm per {self.config.norm})"


def _module_channels(unet, mid: bool) -> list:
    return [int(layer.output.shape[-1]) for layer in motion_positions(unet, mid)]


def _check_file(file: MotionFile, unet) -> None:
    width = int(unet.inputs[2].shape[-1])
    if width != 768:
        raise SdanimError(f"motion modules are for SD 1.x (no SD 2.x modules exist); this UNet takes a {width}-wide "
                          f"text context, SD 1.x's is 768. Received: motion_module={file.path!r}")
    for name, channels in zip(module_names(file.mid), _module_channels(unet, file.mid)):
        have = int(file.tensors[f"{name}.proj_in.weight"].shape[0])
        if have != channels:
            raise SdanimError(f"the motion modules do not fit this UNet: {name} is {have} channels wide, the UNet's "
                              f"layer {channels}. Received: motion_module={file.path!r}")


def load_motion_modules(unet, file: MotionFile, norm: str = "frame", digest: str = "") -> MotionModules:
    """A motion module file's weights, checked against `unet`'s shapes (the arrays are
    read here; the layers are made per window length by `motion_unet`)."""
    check(norm in NORMS, f"motion_norm must be one of {', '.join(NORMS)}. Received: {norm!r}")
    _check_file(file, unet)
    weights: dict = {}
    for name in module_names(file.mid):
        own = {k[len(name) + 1:]: v for k, v in file.tensors.items() if k.startswith(name + ".")}
        for key in [k for k in own if k.startswith("pe.")]:
            pe = own.pop(key).load()[0]
            expected = sinusoid(pe.shape[0], pe.shape[1])
            if np.abs(pe - expected).max() > 1e-3:
                raise SdanimError(f"{name}'s position encoding is not AnimateDiff's sinusoid (learned positions "
                                  f"are not supported). Received: motion_module={file.path!r}")
        weights[name] = own
    return MotionModules(MotionConfig(file.positions, file.mid, norm), weights, file.version, digest)


def random_motion_modules(unet, mid: bool = True, positions: int = 32, norm: str = "frame",
                          seed: int = 0) -> MotionModules:
    """Motion modules of the exact shapes with every weight drawn at random (smoke runs and
    tests: the original's zero-initialised proj_out would make every module the identity)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, c in zip(module_names(mid), _module_channels(unet, mid)):
        shapes = {"norm": (c,), "proj_in": (c, c), "proj_out": (c, c), "ff.net.0.proj": (8 * c, c),
                  "ff.net.2": (c, 4 * c)}
        own = {}
        for key in MODULE_TENSORS:
            module, kind = key.rsplit(".", 1)
            short = module.replace("transformer_blocks.0.", "")
            shape = next((s for n, s in shapes.items() if short == n), (c, c))
            if short.startswith("norm") and kind == "weight":
                value = 1.0 + 0.1 * rng.standard_normal(c)
            elif kind == "bias":
                value = 0.1 * rng.standard_normal(shape[0])
            else:
                value = rng.standard_normal(shape) / np.sqrt(shape[1])
            own[key] = _Array(np.asarray(value, np.float32))
        weights[name] = own
    return MotionModules(MotionConfig(positions, mid, norm), weights)


@dataclasses.dataclass(frozen=True)
class _Array:
    value: np.ndarray

    @property
    def shape(self):
        return self.value.shape

    def load(self) -> np.ndarray:
        return self.value


def _values(tensors: dict):
    def special(name, layer):
        kind = type(layer).__name__
        if kind == "Dense":
            keys = [f"{name}.weight"] + ([f"{name}.bias"] if layer.use_bias else [])
            values = [np.transpose(tensors[keys[0]].load())] + ([tensors[keys[1]].load()] if layer.use_bias else [])
            return values, keys
        keys = [f"{name}.weight", f"{name}.bias"]  # GroupNorm / LayerNorm: gamma, beta
        return [tensors[k].load() for k in keys], keys

    return special


_MOTION: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _motion_unet_class():
    keras = import_keras()

    class MotionUNet(keras.Model):
        """The UNet run through its own graph with motion modules after the layers they
        follow: [latent, t_emb, context] (B*F rows, clip-major) -> eps. No symbolic pass is
        made (the UNet's layers are KerasCV's, which Keras would trace one by one): every
        call runs the graph on its tensors, eagerly or inside a compiled function."""

        def __init__(self, unet, inserted: dict, frames: int, spatial_chunk=None, **kwargs):
            super().__init__(**kwargs)
            self.unet, self.frames, self.spatial_chunk = unet, frames, spatial_chunk
            self.motion_layers = list(inserted.values())  # tracked: their weights are the model's
            self._inserted = {id(layer): module for layer, module in zip(inserted, self.motion_layers)}
            self.built = True

        def _chunked(self, op):
            """`op` on at most `spatial_chunk` rows at a time, its results joined (every
            tensor argument with the call's rows is split; the others are passed whole)."""
            chunk = self.spatial_chunk
            if chunk is None:
                return op
            ops, tree = keras.ops, keras.tree

            def run(*args, **kwargs):
                leaves = [x for x in tree.flatten((args, kwargs)) if hasattr(x, "shape") and len(x.shape) > 0]
                rows = leaves[0].shape[0] if leaves else None
                if rows is None or rows <= chunk:
                    return op(*args, **kwargs)
                parts = []
                for start in range(0, rows, chunk):
                    def part(x, start=start):
                        if hasattr(x, "shape") and len(x.shape) > 0 and x.shape[0] == rows:
                            return x[start:start + chunk]
                        return x

                    cut_args, cut_kwargs = tree.map_structure(part, (args, kwargs))
                    parts.append(op(*cut_args, **cut_kwargs))
                return tree.map_structure(lambda *xs: ops.concatenate(xs, axis=0), *parts)

            return run

        def _operation(self, op):
            module = self._inserted.get(id(op))
            spatial = self._chunked(op)
            if module is None:
                return spatial

            def followed(*args, **kwargs):
                return module(spatial(*args, **kwargs))  # the motion module: every frame at once

            return followed

        def call(self, inputs, training=None):
            """inputs: [latent, t_emb, context], or those and ControlNet's 13 residuals
            (r_0 .. r_11, r_mid), added where `controlnet.controlled_unet` adds them.
            `training` is taken (JAX's compiled path, `stateless_call`, passes it) and
            unused: nothing in the UNet behaves differently in training."""
            inputs = list(inputs)
            residuals = inputs[3:]
            if not residuals:
                return self.unet._run_through_graph(inputs, operation_fn=self._operation)
            check(len(residuals) == 13, f"a motion UNet takes 0 or 13 ControlNet residuals. Received: {len(residuals)}")
            ops = keras.ops
            skips, mid = residuals[:12], residuals[12]
            joins = [0]

            def operation(op):
                if type(op).__name__ != "Concatenate":
                    return self._operation(op)

                def joined(tensors, *args, **kwargs):
                    x, skip = tensors  # the up flow's tensor and the skip connection it takes
                    k = joins[0]
                    joins[0] += 1
                    if k == 0:
                        x = x + ops.cast(mid, x.dtype)
                    return self._chunked(op)([x, skip + ops.cast(skips[11 - k], skip.dtype)], *args, **kwargs)

                return joined

            eps = self.unet._run_through_graph(inputs[:3], operation_fn=operation)
            check(joins[0] == 12, f"internal: {joins[0]} skip connections joined, not 12")
            return eps

    return MotionUNet


def motion_unet(unet, modules: MotionModules, frames: int, windows=None, fusion=None, spatial_chunk=None):
    """The UNet with `modules` after each resnet/attention pair, on clips of `frames` rows
    (see the module docstring). `windows` (index arrays into the `frames`, all one
    length) and `fusion` (each window's per-frame weights, `core.windows.fusion_weights`):
    the motion modules' attention in those windows, each frame's results blended by the
    weights (FreeNoise's fusion, as diffusers' `enable_free_noise`); None: all frames
    attend together. `spatial_chunk`: rows the UNet's own layers take at once (None: all;
    see the module docstring). Made once per (UNet, modules, frames, windows, fusion,
    spatial_chunk)."""
    cache = _MOTION.setdefault(unet, {})
    shape = None if windows is None else (tuple(tuple(int(i) for i in w) for w in windows),
                                          tuple(tuple(float(v) for v in w) for w in fusion))
    key = (id(modules), frames, shape, spatial_chunk)
    if key in cache and cache[key][0] is modules:
        return cache[key][1]
    check(isinstance(frames, int) and frames >= 1, f"context must be a whole number of frames. Received: {frames!r}")
    config = modules.config
    inserted = {}
    for name, layer in zip(module_names(config.mid), motion_positions(unet, config.mid)):
        channels = int(layer.output.shape[-1])
        module = temporal_transformer(channels, frames, config.positions, config.norm,
                                      name="motion_" + name.replace(".", "_"), windows=windows, fusion=fusion)
        module.build((None, None, None, channels))
        assign(module.torch_layers(), modules.weights[name], "the motion module file", f"module={name!r}",
               special=_values(modules.weights[name]))
        inserted[layer] = module
    if not _CLASS_UNET:
        _CLASS_UNET.append(_motion_unet_class())
    model = _CLASS_UNET[0](unet, inserted, frames, spatial_chunk, name=f"motion_unet_{frames}")
    cache[key] = (modules, model)
    return model


_CLASS_UNET = []


_LOADED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # unet -> {(sha256, norm): MotionModules}


def motion_modules_for(model, spec: MotionSpec) -> MotionModules:
    """The modules `spec` names, checked against the model's UNet and loaded once per
    (UNet, file contents, norm); "random" gives v2-shaped modules with seeded weights."""
    unet = model.diffusion_model
    width = int(unet.inputs[2].shape[-1])
    check(width == 768, f"motion modules are for SD 1.x (no SD 2.x modules exist); this model's UNet takes a "
                        f"{width}-wide text context. Received: motion_module={spec.file!r}")
    cache = _LOADED.setdefault(unet, {})
    if spec.file == "random":
        key = ("random", spec.norm)
        if key not in cache:
            cache[key] = random_motion_modules(unet, norm=spec.norm)
        return cache[key]
    digest = weights_sha256(spec.file)
    key = (digest, spec.norm)
    if key not in cache:
        cache[key] = load_motion_modules(unet, inspect_motion_module(spec.file), spec.norm, digest)
    return cache[key]


__all__ = ["MotionConfig", "motion_modules_for", "MotionModules", "NORMS", "load_motion_modules", "motion_positions", "motion_unet",
           "random_motion_modules", "sinusoid", "temporal_transformer"]
