"""KerasCV's layers, swapped per model instance for faster or extended forms. Only this
module (with the loader) knows KerasCV's layer classes.

- `use_fused_attention`: attention through keras.ops.dot_product_attention (flash /
  cuDNN kernels where the backend has them).
- `use_fast_layers`: GroupNormalization in two stages and stride-1 padded convolutions
  padded inside the kernel (TensorFlow on a CPU).
- `attach_context_cache`: every cross-attention's keys and values of the text context
  made once per batch (`sdanim.model.context_cache`).
- `attach_attention_interp`: every attention of the UNet (self and cross) interpolates
  keyframes' keys and values while `sdanim.model.attention_interp.active` says so (AID).

Only the given model's layer instances change (their `call`), never KerasCV's classes;
the weights are untouched. Each function drops the model's compiled functions, which
were traced with the old calls.
"""

from __future__ import annotations

import contextlib
import math
import threading
import types

from sdanim.core.runtime import import_keras, import_keras_cv
from sdanim.model import attention_interp, context_cache
from sdanim.model.compiled import forget_compiled


# Held while Keras's Layer class is patched for a build (`built_in_one_trace`, and the
# loader's `_weights_loaded_later`): a build elsewhere must not see a half-set patch.
BUILD_LOCK = threading.RLock()


@contextlib.contextmanager
def built_in_one_trace():
    """While KerasCV-structured models are constructed: a layer without a `build` method
    of its own (KerasCV's SpatialTransformer, CrossAttention, GEGLU, PaddedConv2D ...)
    is marked built when first called, and its sublayers build themselves when the call
    reaches them. Keras would otherwise trace such a layer's call once more just to build
    it, at every level of nesting (a SpatialTransformer's attention was traced eight
    times). The same weights are created in the same order (the same random draws under
    a seed) and the models compute the same; a KerasCV UNet builds 2.5x faster
    (docs/benchmarks.md, "Building models")."""
    import_keras()
    from keras.src import utils
    from keras.src.layers.layer import Layer

    original = Layer._maybe_build

    def maybe_build(self, call_spec):
        if not self.built and utils.is_default(self.build):
            self.built = True  # its sublayers build as this first call reaches them
            return
        return original(self, call_spec)

    with BUILD_LOCK:
        Layer._maybe_build = maybe_build
        try:
            yield
        finally:
            Layer._maybe_build = original


def _keras_cv_layers():
    """KerasCV's layer classes sdanim swaps: (CrossAttention, AttentionBlock,
    BasicTransformerBlock, PaddedConv2D)."""
    import_keras_cv()
    from keras_cv.src.models.stable_diffusion.attention_block import AttentionBlock
    from keras_cv.src.models.stable_diffusion.diffusion_model import BasicTransformerBlock, CrossAttention
    from keras_cv.src.models.stable_diffusion.padded_conv2d import PaddedConv2D

    return CrossAttention, AttentionBlock, BasicTransformerBlock, PaddedConv2D


def _fused_cross_attention_call(self, inputs, context=None):
    """KerasCV CrossAttention.call through keras.ops.dot_product_attention."""
    ops = import_keras().ops
    if context is None:
        context = inputs
    q, k, v = self.to_q(inputs), self.to_k(context), self.to_v(context)
    q = ops.reshape(q, (-1, inputs.shape[1], self.num_heads, self.head_size))  # (B, T, N, H)
    k = ops.reshape(k, (-1, context.shape[1], self.num_heads, self.head_size))  # (B, S, N, H)
    v = ops.reshape(v, (-1, context.shape[1], self.num_heads, self.head_size))  # (B, S, N, H)
    attn = ops.dot_product_attention(q, k, v, scale=self.scale)  # (B, T, N, H)
    out = ops.reshape(attn, (-1, inputs.shape[1], self.num_heads * self.head_size))  # (B, T, N*H)
    return self.out_proj(out)


def _cross_attention_call(self, inputs, context=None):
    """The call sdanim installs on KerasCV's CrossAttention layers: KerasCV's own or the
    fused form (`use_fused_attention`), then, while attention interpolation is active
    (`attention_interp.current()`, read at trace time), the interpolating rows mixed in."""
    if self.__dict__.get("_sdanim_fused", False):
        plain = _fused_cross_attention_call(self, inputs, context)
    else:
        plain = type(self).call(self, inputs, context)
    state = attention_interp.current()
    return plain if state is None else attention_interp.mix(self, inputs, context, plain, state)


def _install_cross_attention(layer, fused: bool) -> None:
    object.__setattr__(layer, "_sdanim_fused", bool(fused))
    object.__setattr__(layer, "call", types.MethodType(_cross_attention_call, layer))


def _fused_vae_attention_call(self, inputs):
    """KerasCV AttentionBlock.call (one head over h*w pixels) through dot_product_attention."""
    ops = import_keras().ops
    x = self.norm(inputs)
    q, k, v = self.q(x), self.k(x), self.v(x)
    h, w, c = q.shape[1], q.shape[2], q.shape[3]
    q = ops.reshape(q, (-1, h * w, 1, c))  # (B, h, w, c) -> (B, hw, 1, c)
    k = ops.reshape(k, (-1, h * w, 1, c))
    v = ops.reshape(v, (-1, h * w, 1, c))
    y = ops.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(c))  # (B, hw, 1, c)
    y = ops.reshape(y, (-1, h, w, c))  # (B, hw, 1, c) -> (B, h, w, c)
    return self.proj_out(y) + inputs


def use_fused_attention(keras_model, enabled: bool = True) -> int:
    """Routes a KerasCV model's attention through `keras.ops.dot_product_attention`.

    That op uses fused (flash / cuDNN) kernels on backends and devices that have them.
    Only the given model's layer instances change (their `call`), not KerasCV's
    classes; the weights are untouched. `enabled=False` restores KerasCV's own call.
    Sampling steps already compiled for the model are dropped, so the next render
    traces the new attention. Returns the number of layers switched.
    """
    CrossAttention, AttentionBlock, _, _ = _keras_cv_layers()
    count = 0
    for layer in keras_model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, CrossAttention):
            _install_cross_attention(layer, enabled)  # stays able to interpolate (AID)
            count += 1
            continue
        if isinstance(layer, AttentionBlock):
            fused_call = _fused_vae_attention_call
        else:
            continue
        if enabled:
            object.__setattr__(layer, "call", types.MethodType(fused_call, layer))
        else:
            layer.__dict__.pop("call", None)
        count += 1
    forget_compiled(keras_model)
    return count


def _group_norm_call(self, inputs):
    """keras.layers.GroupNormalization.call (channels last) with the group statistics
    reduced in two stages: over the pixels (a reduction over one outer axis, which
    TensorFlow's CPU kernels vectorize), then over each group's channels. The same
    two-pass mean and variance in float32; only the summation order differs (about
    4e-6 on unit-scale activations). Half the time of the reduction over (h, w,
    channels-in-group) of a 5-D reshape on a CPU (docs/benchmarks.md)."""
    ops = import_keras().ops
    shape = inputs.shape
    channels, groups = shape[-1], self.groups
    per_group = channels // groups
    pixels = 1
    for size in shape[1:-1]:
        pixels *= size
    count = float(pixels * per_group)
    x = ops.reshape(ops.cast(inputs, "float32"), (-1, pixels, channels))  # (B, ..., C) -> (B, P, C)

    def group_mean(t):  # (B, P, C) -> (B, 1, C): the mean of each channel's group
        sums = ops.sum(t, axis=1)  # (B, C)
        sums = ops.sum(ops.reshape(sums, (-1, groups, per_group)), axis=2, keepdims=True)  # (B, G, 1)
        means = ops.repeat(sums / count, per_group, axis=2)  # (B, G, C/G)
        return ops.reshape(means, (-1, 1, channels))

    mean = group_mean(x)
    inv = ops.rsqrt(group_mean(ops.square(x - mean)) + self.epsilon)  # (B, 1, C)
    if self.scale:
        inv = inv * ops.cast(self.gamma, "float32")
    shift = -mean * inv
    if self.center:
        shift = shift + ops.cast(self.beta, "float32")
    out = ops.cast(x * inv + shift, inputs.dtype)
    return ops.cast(ops.reshape(out, ops.shape(inputs)), self.compute_dtype)


def _same_padded_conv_call(self, inputs):
    """KerasCV PaddedConv2D.call for a stride-1 convolution padded by (k - 1) / 2: the
    convolution pads itself ("same"), so the zero-padded copy of the input is not
    made. The same sums in the same order (bit-identical on TensorFlow's CPU kernels)."""
    return self.conv2d(inputs)


def _pads_like_same(layer) -> bool:
    """Whether a PaddedConv2D is a stride-1 convolution padded by (k - 1) / 2 on each side."""
    conv, pad = layer.conv2d, layer.padding2d.padding
    kh, kw = conv.kernel_size
    return (
        tuple(conv.strides) == (1, 1)
        and kh % 2 == 1 and kw % 2 == 1
        and tuple(pad) == (((kh - 1) // 2,) * 2, ((kw - 1) // 2,) * 2)
        and conv.padding == "valid"
    )


def keep_conv_kernels_in_torch_layout(keras_model) -> int:
    """On Keras's torch backend, lays every Conv2D kernel out in memory the way torch's
    conv2d reads it, so that `keras.ops.conv` stops copying it on every call.

    Keras's torch backend views an HWIO kernel as OIHW and makes that view channels_last
    contiguous, a copy of every kernel at every call: half of a UNet step on a CPU
    (docs/benchmarks.md). Stored as (O, H, W, I), the view is already channels_last and
    nothing is copied. The variable keeps its HWIO shape and values; assigning it (weights
    loaded, LoRAs merged: `copy_`) keeps the layout.

    Returns:
        The kernels laid out (0 on other backends).
    """
    keras = import_keras()
    if keras.backend.backend() != "torch":
        return 0
    import torch

    count = 0
    for layer in keras_model._flatten_layers(include_self=False, recursive=True):
        kernel = getattr(layer, "kernel", None) if isinstance(layer, keras.layers.Conv2D) else None
        if kernel is None or len(kernel.shape) != 4:
            continue
        value = kernel.value
        with torch.no_grad():
            value.data = value.data.permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)
        count += 1
    return count


def use_fast_group_norms(keras_model) -> int:
    """Every channels-last `GroupNormalization` inside `keras_model` (KerasHub's VAE, say)
    computed by `_group_norm_call`; only the instances change, weights are untouched.
    Returns how many. SD3's VAE decode at 512 px on a 2-core CPU: 15.5 s -> 12.5 s
    (docs/benchmarks.md)."""
    keras = import_keras()
    count = 0
    for layer in keras_model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.GroupNormalization) and layer.axis == -1:
            object.__setattr__(layer, "call", types.MethodType(_group_norm_call, layer))
            count += 1
    forget_compiled(keras_model)
    return count


def use_fast_layers(keras_model, enabled: bool = True) -> int:
    """Swaps two of a KerasCV model's layer kinds for faster equivalents on a CPU:
    GroupNormalization with its statistics reduced in two stages (`_group_norm_call`),
    and PaddedConv2D at stride 1 with the padding done inside the convolution instead
    of by a zero-padded copy (`_same_padded_conv_call`). Only the given model's layer
    instances change, not the classes; weights are untouched. `enabled=False` restores
    KerasCV's layers. Compiled sampling functions of the model are dropped (they retrace).
    Returns the number of layers switched.

    Frames move by float32 rounding only: the convolution is bit-identical, the group
    statistics sum in another order (tests/test_heavy.py holds both against KerasCV's).
    """
    keras = import_keras()
    _, _, _, PaddedConv2D = _keras_cv_layers()
    count = 0
    for layer in keras_model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.GroupNormalization):
            if enabled and layer.axis != -1:
                continue
            fast = _group_norm_call
        elif isinstance(layer, PaddedConv2D):
            if enabled and not _pads_like_same(layer):
                continue
            fast = _same_padded_conv_call
        else:
            continue
        if enabled:
            if isinstance(layer, PaddedConv2D):
                layer.conv2d.padding = "same"
            object.__setattr__(layer, "call", types.MethodType(fast, layer))
            count += 1
        elif "call" in layer.__dict__:
            if isinstance(layer, PaddedConv2D):
                layer.conv2d.padding = "valid"
            del layer.__dict__["call"]
            count += 1
    forget_compiled(keras_model)  # KerasCV's loop (predict_on_batch) retraces too
    return count


def uses_fast_layers(keras_model) -> bool:
    """Whether `use_fast_layers` switched any of the model's layers (nets built for it
    take the same forms)."""
    keras = import_keras()
    return any(isinstance(layer, keras.layers.GroupNormalization) and "call" in layer.__dict__
               for layer in keras_model._flatten_layers(include_self=False, recursive=True))


def attach_context_cache(unet) -> int:
    """Gives a KerasCV UNet a context model (`sdanim.context_cache`): every
    cross-attention's keys and values of the text context, made once per batch by the
    samplers instead of at every step. Returns the number of projections (32 for SD 1.x
    and 2.x: 16 transformer blocks x keys, values)."""
    _, _, BasicTransformerBlock, _ = _keras_cv_layers()
    layers = []
    for layer in unet._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, BasicTransformerBlock):
            layers += [layer.attn2.to_k, layer.attn2.to_v]
    if not layers:
        return 0
    return context_cache.attach(unet, layers, tuple(unet.inputs[2].shape[1:]))


def attach_attention_interp(unet) -> int:
    """Lets every attention layer of a KerasCV UNet (self- and cross-attention) take
    part in AID's attention interpolation (`sdanim.model.attention_interp`): outside an
    `attention_interp.active` block the layers compute what they did before (the graph
    traced is the same). Keeps the layer's current form (KerasCV's or fused). Returns
    the number of attention layers (32 for SD 1.x and 2.x)."""
    CrossAttention, _, _, _ = _keras_cv_layers()
    count = 0
    for layer in unet._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, CrossAttention):
            _install_cross_attention(layer, layer.__dict__.get("_sdanim_fused", False))
            count += 1
    if count:
        attention_interp.enable(unet)
    forget_compiled(unet)
    return count

