"""SD3-family weights in diffusers' layout and in Stability's single files, named as
KerasHub's layers name theirs.

diffusers' `SD3Transformer2DModel` keeps q, k and v (and the context's add_q/k/v) as
separate linears; KerasHub's MMDiT fuses each triple into one `attention_qkv` dense. The
modulations of `norm_out` and of the last block's context norm (`AdaLayerNormContinuous`)
are (scale, shift) in diffusers and (shift, scale) in KerasHub and in Stability's own
files, so their halves are swapped back (diffusers' single-file conversion swaps them
the other way). The position grid is a buffer in diffusers (fixed sin-cos) and a weight
in KerasHub. Every tensor is accounted for: anything left over, or anything missing, is
one line naming it.

Stability's single `.safetensors` (`sd3_medium_incl_clips.safetensors` and the like) keeps
the MMDiT under `model.diffusion_model.` in the original layout (fused qkv, (shift, scale)
modulations: KerasHub's own), CLIP-L and CLIP-G under `text_encoders.clip_{l,g}.transformer.`
in transformers' names, T5 under `text_encoders.t5xxl.` (not used: left unread) and the
VAE under `first_stage_model.` in the original latent-diffusion names.

Pure NumPy: torch linears (out, in) become Keras kernels (in, out), convolutions
(out, in, kh, kw) become (kh, kw, in, out).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Callable, Mapping, Optional

import numpy as np

from sdanim.config.errors import SdanimError
from sdanim.formats.tensors import read_tensors

SD3_PARTS = ("transformer", "text_encoder", "text_encoder_2", "vae")


@dataclasses.dataclass(frozen=True)
class SD3Folder:
    """A diffusers SD3 folder, opened: each part's {name: LazyTensor} (nothing read yet)
    and the transformer's config. text_encoder_3 (T5) is not opened."""

    transformer: dict
    text_encoder: dict
    text_encoder_2: dict
    vae: dict
    transformer_config: dict
    layout: str = "diffusers"  # or "stability": a single file's MMDiT and VAE names


def read_sd3_folder(folder: str) -> SD3Folder:
    """Opens a diffusers SD3 folder's safetensors (sharded files too); one line naming
    every part that has none."""
    parts, missing = {}, []
    for part in SD3_PARTS:
        files = sorted(glob.glob(os.path.join(folder, part, "*.safetensors")))
        if part == "vae" or part == "transformer":
            files = [f for f in files if os.path.basename(f).startswith("diffusion_pytorch_model")]
        else:
            files = [f for f in files if os.path.basename(f).startswith("model")]
        if not files:
            missing.append(f"{part}/")
            continue
        variants = [f for f in files if ".fp16." not in f] or files  # one variant: full precision first
        tensors: dict = {}
        for path in variants:
            tensors.update(read_tensors(path, "weights"))
        parts[part] = tensors
    if missing:
        raise SdanimError(f"the diffusers SD3 folder lacks {', '.join(missing)} (each needs .safetensors weights). "
                          f"Received: weights={folder!r}")
    try:
        with open(os.path.join(folder, "transformer", "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        transformer_layers(config)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SdanimError(f"{folder}/transformer/config.json is not a diffusers SD3 transformer config "
                          f"({type(error).__name__}). Received: weights={folder!r}") from None
    return SD3Folder(transformer_config=config, **parts)


# A single file's prefixes -> the part they hold (T5's prefix: left unread).
STABILITY_PREFIXES = {"model.diffusion_model.": "transformer", "text_encoders.clip_l.transformer.": "text_encoder",
                      "text_encoders.clip_g.transformer.": "text_encoder_2", "first_stage_model.": "vae"}
T5_PREFIX = "text_encoders.t5xxl."
_PART_NAMES = {"transformer": "the MMDiT (model.diffusion_model.*)", "text_encoder": "CLIP-L (text_encoders.clip_l.*)",
               "text_encoder_2": "CLIP-G (text_encoders.clip_g.*)", "vae": "the VAE (first_stage_model.*)"}


def is_stability_file(names) -> bool:
    """Whether tensor names are a Stability SD3 single file's."""
    return any(n.startswith("model.diffusion_model.joint_blocks.") for n in names)


def read_sd3_file(path: str) -> SD3Folder:
    """Opens a Stability SD3 single file (nothing read yet): its parts by prefix and the
    transformer's shape read off its tensor names; one line for a part it lacks (the 3.5
    files without text encoders) or a tensor under no known prefix."""
    tensors = read_tensors(path, "weights")
    parts: dict = {part: {} for part in SD3_PARTS}
    for name, tensor in tensors.items():
        prefix = next((p for p in STABILITY_PREFIXES if name.startswith(p)), None)
        if prefix is not None:
            parts[STABILITY_PREFIXES[prefix]][name[len(prefix):]] = tensor
        elif not name.startswith(T5_PREFIX):
            raise SdanimError(f"{path} has a tensor outside an SD3 checkpoint's parts, {name!r}: not a Stability SD3 "
                              f"file. Received: weights={path!r}")
    missing = [_PART_NAMES[part] for part in SD3_PARTS if not parts[part]]
    if missing:
        raise SdanimError(f"{path} lacks {', '.join(missing)}: sdanim reads single files that hold the MMDiT, CLIP-L, "
                          "CLIP-G and the VAE (as sd3_medium_incl_clips.safetensors does); for the others use the "
                          f"model's diffusers folder. Received: weights={path!r}")
    names = parts["transformer"]
    blocks = {int(n.split(".")[1]) for n in names if n.startswith("joint_blocks.")}
    config = {"num_layers": max(blocks) + 1,
              "dual_attention_layers": sorted({int(n.split(".")[1]) for n in names if ".x_block.attn2." in n}),
              "qk_norm": "rms_norm" if any(".attn.ln_q." in n for n in names) else None}
    return SD3Folder(transformer_config=config, layout="stability", **parts)


def _value(tensor) -> np.ndarray:
    """A tensor's values as float32: a `LazyTensor` read now, or an array."""
    return tensor.load() if hasattr(tensor, "load") else np.asarray(tensor, np.float32)


def _take(state: dict, name: str) -> Callable[[], np.ndarray]:
    """Pops `name` from `state` (a missing one raises KeyError) and reads it when called:
    the mapping is made without reading any values, and each is read when assigned."""
    tensor = state.pop(name)
    return lambda: _value(tensor)


class _Layout(dict):
    """A mapping's `out` that also records where each source module's weight goes:
    {module: (target layer, part, parts, swapped)} (LoRA files name the modules)."""

    def __init__(self):
        super().__init__()
        self.modules: dict = {}


class _EveryTensor(dict):
    """A state that holds every tensor a mapping asks for (to map names, not values)."""

    def pop(self, name, *default):
        return None


def _record(out: dict, name: str, target: str, part: int = 0, parts: int = 1, swapped: bool = False) -> None:
    if isinstance(out, _Layout):
        out.modules[name] = (target, part, parts, swapped)


def _dense(state, name: str, out: dict, target: str, bias: bool = True) -> None:
    _record(out, name, target)
    weight = _take(state, f"{name}.weight")
    out[f"{target}/kernel"] = lambda: weight().T
    if bias:
        out[f"{target}/bias"] = _take(state, f"{name}.bias")


def _conv(state, name: str, out: dict, target: str) -> None:
    weight = _take(state, f"{name}.weight")
    out[f"{target}/kernel"] = lambda: weight().transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)
    out[f"{target}/bias"] = _take(state, f"{name}.bias")


def _norm(state, name: str, out: dict, target: str, scale: str = "gamma", center: str = "beta") -> None:
    out[f"{target}/{scale}"] = _take(state, f"{name}.weight")
    out[f"{target}/{center}"] = _take(state, f"{name}.bias")


def _fused(state, names: tuple, out: dict, target: str) -> None:
    for part, name in enumerate(names):
        _record(out, name, target, part, len(names))
    weights = [_take(state, f"{n}.weight") for n in names]
    biases = [_take(state, f"{n}.bias") for n in names]
    out[f"{target}/kernel"] = lambda: np.concatenate([w() for w in weights], axis=0).T
    out[f"{target}/bias"] = lambda: np.concatenate([b() for b in biases], axis=0)


def _swap_halves(array: np.ndarray) -> np.ndarray:
    first, second = np.split(array, 2, axis=0)
    return np.concatenate([second, first], axis=0)


def _adaln_swapped(state, name: str, out: dict, target: str) -> None:
    _record(out, name, target, swapped=True)
    weight, bias = _take(state, f"{name}.weight"), _take(state, f"{name}.bias")
    out[f"{target}/kernel"] = lambda: _swap_halves(weight()).T
    out[f"{target}/bias"] = lambda: _swap_halves(bias())


def _mapped(build: Callable, state: Mapping, what: str, shape: str) -> dict:
    """Runs one mapping over a copy of `state`; one line for a missing or left-over tensor."""
    state = dict(state)
    try:
        out = build(state)
    except KeyError as missing:
        raise SdanimError(f"{what} lacks {missing.args[0]!r}: not {shape}. Received: {missing.args[0]}=None") from None
    if state:
        names = sorted(state)
        raise SdanimError(f"{what} has {len(names)} tensor(s) sdanim does not map, e.g. {names[0]!r}: not {shape}. "
                          f"Received: {len(names)} extra tensor(s)")
    return out


def transformer_layers(config: Mapping) -> tuple:
    """(num_layers, dual attention blocks, qk_norm) read off a diffusers transformer
    config.json."""
    return (int(config["num_layers"]), tuple(config.get("dual_attention_layers") or ()),
            config.get("qk_norm"))


def mmdit_weights(state: Mapping, num_layers: int, dual: tuple = (), qk_norm=None,
                  what: str = "the SD3 transformer") -> dict:
    """diffusers `SD3Transformer2DModel` tensors -> {KerasHub MMDiT weight path: a
    function that reads its value}. One line for a tensor missing or left over."""
    shape = (f"an SD3 transformer of this shape (layers={num_layers}, dual attention={list(dual)}, "
             f"qk_norm={qk_norm})")
    return _mapped(lambda state: _mmdit(state, num_layers, tuple(dual), qk_norm), state, what, shape)


def _mmdit(state: dict, num_layers: int, dual: tuple, qk_norm, out: Optional[dict] = None) -> dict:
    """Pops every tensor it maps from `state`."""
    out = {} if out is None else out
    _conv(state, "pos_embed.proj", out, "patch_embedding/patch_embedding")
    grid = _take(state, "pos_embed.pos_embed")
    out["position_embedding/embeddings"] = lambda: grid()[0]
    _dense(state, "context_embedder", out, "context_embedding")
    _dense(state, "time_text_embed.text_embedder.linear_1", out, "vector_embedding/dense1")
    _dense(state, "time_text_embed.text_embedder.linear_2", out, "vector_embedding/dense2")
    _dense(state, "time_text_embed.timestep_embedder.linear_1", out, "timestep_embedding/mlp/dense1")
    _dense(state, "time_text_embed.timestep_embedder.linear_2", out, "timestep_embedding/mlp/dense2")
    for i in range(num_layers):
        src, dst = f"transformer_blocks.{i}", f"joint_block_{i}"
        last = i == num_layers - 1
        x, c = f"{dst}/x_block", f"{dst}/context_block"
        _dense(state, f"{src}.norm1.linear", out, f"{x}/ada_layer_norm/dense")
        _fused(state, tuple(f"{src}.attn.to_{p}" for p in "qkv"), out, f"{x}/attention_qkv")
        _dense(state, f"{src}.attn.to_out.0", out, f"{x}/attention_proj")
        _dense(state, f"{src}.ff.net.0.proj", out, f"{x}/mlp/dense1")
        _dense(state, f"{src}.ff.net.2", out, f"{x}/mlp/dense2")
        if last:  # the context's last norm is AdaLayerNormContinuous: (scale, shift)
            _adaln_swapped(state, f"{src}.norm1_context.linear", out, f"{c}/ada_layer_norm/dense")
        else:
            _dense(state, f"{src}.norm1_context.linear", out, f"{c}/ada_layer_norm/dense")
            _dense(state, f"{src}.attn.to_add_out", out, f"{c}/attention_proj")
            _dense(state, f"{src}.ff_context.net.0.proj", out, f"{c}/mlp/dense1")
            _dense(state, f"{src}.ff_context.net.2", out, f"{c}/mlp/dense2")
        _fused(state, tuple(f"{src}.attn.add_{p}_proj" for p in "qkv"), out, f"{c}/attention_qkv")
        if qk_norm:
            out[f"{x}/q_norm/scale"] = _take(state, f"{src}.attn.norm_q.weight")
            out[f"{x}/k_norm/scale"] = _take(state, f"{src}.attn.norm_k.weight")
            out[f"{c}/q_norm/scale"] = _take(state, f"{src}.attn.norm_added_q.weight")
            out[f"{c}/k_norm/scale"] = _take(state, f"{src}.attn.norm_added_k.weight")
        if i in dual:
            _fused(state, tuple(f"{src}.attn2.to_{p}" for p in "qkv"), out, f"{x}/attention_qkv2")
            _dense(state, f"{src}.attn2.to_out.0", out, f"{x}/attention_proj2")
            if qk_norm:
                out[f"{x}/q_norm2/scale"] = _take(state, f"{src}.attn2.norm_q.weight")
                out[f"{x}/k_norm2/scale"] = _take(state, f"{src}.attn2.norm_k.weight")
    _adaln_swapped(state, "norm_out.linear", out, "output_ada_layer_norm/dense")
    _dense(state, "proj_out", out, "output_dense")
    return out


def stability_mmdit_weights(state: Mapping, num_layers: int, dual: tuple = (), qk_norm=None,
                            what: str = "the SD3 file's MMDiT") -> dict:
    """A Stability single file's MMDiT tensors (its `model.diffusion_model.` prefix
    removed) -> {KerasHub MMDiT weight path: reader}. The original layout is KerasHub's:
    fused qkv, (shift, scale) modulations; nothing is split or swapped."""
    shape = (f"an SD3 MMDiT of this shape (layers={num_layers}, dual attention={list(dual)}, "
             f"qk_norm={qk_norm})")
    return _mapped(lambda state: _stability_mmdit(state, num_layers, tuple(dual), qk_norm), state, what, shape)


def _stability_mmdit(state: dict, num_layers: int, dual: tuple, qk_norm, out: Optional[dict] = None) -> dict:
    """Pops every tensor it maps from `state`."""
    out = {} if out is None else out
    _conv(state, "x_embedder.proj", out, "patch_embedding/patch_embedding")
    grid = _take(state, "pos_embed")
    out["position_embedding/embeddings"] = lambda: grid()[0]
    _dense(state, "context_embedder", out, "context_embedding")
    _dense(state, "y_embedder.mlp.0", out, "vector_embedding/dense1")
    _dense(state, "y_embedder.mlp.2", out, "vector_embedding/dense2")
    _dense(state, "t_embedder.mlp.0", out, "timestep_embedding/mlp/dense1")
    _dense(state, "t_embedder.mlp.2", out, "timestep_embedding/mlp/dense2")
    for i in range(num_layers):
        dst = f"joint_block_{i}"
        for block, target in (("x_block", f"{dst}/x_block"), ("context_block", f"{dst}/context_block")):
            src = f"joint_blocks.{i}.{block}"
            _dense(state, f"{src}.adaLN_modulation.1", out, f"{target}/ada_layer_norm/dense")
            _dense(state, f"{src}.attn.qkv", out, f"{target}/attention_qkv")
            if block == "x_block" or i < num_layers - 1:  # the last context block stops after its qkv
                _dense(state, f"{src}.attn.proj", out, f"{target}/attention_proj")
                _dense(state, f"{src}.mlp.fc1", out, f"{target}/mlp/dense1")
                _dense(state, f"{src}.mlp.fc2", out, f"{target}/mlp/dense2")
            if qk_norm:
                out[f"{target}/q_norm/scale"] = _take(state, f"{src}.attn.ln_q.weight")
                out[f"{target}/k_norm/scale"] = _take(state, f"{src}.attn.ln_k.weight")
        if i in dual:
            src, target = f"joint_blocks.{i}.x_block.attn2", f"{dst}/x_block"
            _dense(state, f"{src}.qkv", out, f"{target}/attention_qkv2")
            _dense(state, f"{src}.proj", out, f"{target}/attention_proj2")
            if qk_norm:
                out[f"{target}/q_norm2/scale"] = _take(state, f"{src}.ln_q.weight")
                out[f"{target}/k_norm2/scale"] = _take(state, f"{src}.ln_k.weight")
    _dense(state, "final_layer.adaLN_modulation.1", out, "output_ada_layer_norm/dense")
    _dense(state, "final_layer.linear", out, "output_dense")
    return out


def mmdit_lora_layout(num_layers: int, dual: tuple = (), qk_norm=None) -> dict:
    """{LoRA module name: (MMDiT dense layer path, part, parts, swapped)} for every linear
    layer of an SD3 MMDiT of this shape, under the names LoRA files use: diffusers/PEFT's
    `transformer.<diffusers module>`, kohya's spelling of Stability's modules
    (`lora_unet_joint_blocks_0_x_block_attn_qkv`: the fused qkv as one) and of diffusers'
    (`lora_transformer_transformer_blocks_0_attn_to_q`). A diffusers q, k or v is `part`
    of `parts` output columns of KerasHub's fused qkv; `swapped`: the modulation's two
    halves are in the other order (diffusers' AdaLayerNormContinuous)."""
    diffusers, stability = _Layout(), _Layout()
    _mmdit(_EveryTensor(), num_layers, tuple(dual), qk_norm, out=diffusers)
    _stability_mmdit(_EveryTensor(), num_layers, tuple(dual), qk_norm, out=stability)
    layout = {}
    for name, where in diffusers.modules.items():
        layout[f"transformer.{name}"] = where
        layout["lora_transformer_" + name.replace(".", "_")] = where
    for name, where in stability.modules.items():
        layout["lora_unet_" + name.replace(".", "_")] = where
    return layout


def clip_weights(state: Mapping, num_layers: int, prefix: str, what: str = "the CLIP text encoder") -> tuple:
    """transformers `CLIPTextModelWithProjection` tensors -> ({KerasHub CLIPTextEncoder
    weight path: reader}, {its projection's path: reader}). `prefix` is the encoder's
    name ("clip_l" or "clip_g"), which KerasHub puts in front of its layers' names."""
    return _mapped(lambda state: _clip(state, num_layers, prefix), state, what,
                   f"a CLIP text encoder with a projection and {num_layers} layers")


def _clip(state: dict, num_layers: int, prefix: str, out: Optional[dict] = None) -> tuple:
    """Pops every tensor it maps from `state`."""
    out = {} if out is None else out
    projection: dict = {}
    text = "text_model"
    out[f"{prefix}_embedding/token_embedding/embeddings"] = _take(state, f"{text}.embeddings.token_embedding.weight")
    out[f"{prefix}_embedding/position_embedding/embeddings"] = _take(
        state, f"{text}.embeddings.position_embedding.weight")
    state.pop(f"{text}.embeddings.position_ids", None)  # a buffer some files keep
    for i in range(num_layers):
        src, dst = f"{text}.encoder.layers.{i}", f"{prefix}_encoder_block_{i}"
        _norm(state, f"{src}.layer_norm1", out, f"{dst}/layer_norm_1")
        _norm(state, f"{src}.layer_norm2", out, f"{dst}/layer_norm_2")
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            _record(out, f"{src}.self_attn.{theirs}", f"{dst}/attention/{ours}")
            weight, bias = _take(state, f"{src}.self_attn.{theirs}.weight"), _take(state, f"{src}.self_attn.{theirs}.bias")
            # (out, in) -> (in, out); `fit_shape` splits out into KerasHub's (heads, head_dim)
            out[f"{dst}/attention/{ours}/kernel"] = (lambda w=weight: w().T)
            out[f"{dst}/attention/{ours}/bias"] = bias
        _record(out, f"{src}.self_attn.out_proj", f"{dst}/attention/attention_output")
        weight = _take(state, f"{src}.self_attn.out_proj.weight")
        out[f"{dst}/attention/attention_output/kernel"] = (lambda w=weight: w().T)  # -> (heads, head_dim, out)
        out[f"{dst}/attention/attention_output/bias"] = _take(state, f"{src}.self_attn.out_proj.bias")
        _dense(state, f"{src}.mlp.fc1", out, f"{dst}/dense_1")
        _dense(state, f"{src}.mlp.fc2", out, f"{dst}/dense_2")
    _norm(state, f"{text}.final_layer_norm", out, f"{prefix}_layer_norm")
    _dense(state, "text_projection", projection, "dense", bias=False)
    return out, projection


def clip_lora_layout(num_layers: int, prefix: str) -> dict:
    """{transformers module name: (KerasHub layer path, 0, 1, False)} for a CLIP text
    encoder's attention and MLP layers (`prefix`: "clip_l" or "clip_g"). Its attention
    kernels keep (in, heads, head_dim) and (heads, head_dim, out): a LoRA's (out, in)
    change goes in transposed and reshaped (`fit_shape`)."""
    layout = _Layout()
    _clip(_EveryTensor(), num_layers, prefix, out=layout)
    return layout.modules



def fit_shape(value: np.ndarray, shape: tuple) -> np.ndarray:
    """`value` in the shape of the variable it goes into where only the grouping of
    axes differs (KerasHub's CLIP attention keeps (in, heads, head_dim) kernels, (heads,
    head_dim) biases and (heads, head_dim, out) output kernels: the heads are consecutive
    slices of torch's features, so a C-order reshape splits them); otherwise unchanged."""
    if tuple(value.shape) != tuple(shape) and value.size == int(np.prod(shape)):
        return value.reshape(shape)
    return value


@dataclasses.dataclass(frozen=True)
class _VaeNames:
    """One layout's names for the pieces of the SD3 VAE (`down(i, j)`: the encoder's
    resnet j of level i; `up(i, j)`: the decoder's resnet j of KerasHub's block i)."""

    down: Callable
    downsample: Callable
    up: Callable
    upsample: Callable
    mid: tuple  # its two resnets
    attention: str
    attention_parts: tuple  # group norm, then query, key, value, output
    shortcut: str
    norm_out: str


_DIFFUSERS_VAE = _VaeNames(
    down=lambda levels, i, j: f"down_blocks.{i}.resnets.{j}",
    downsample=lambda levels, i: f"down_blocks.{i}.downsamplers.0.conv",
    up=lambda levels, i, j: f"up_blocks.{i}.resnets.{j}",  # diffusers' up blocks run widest first, as KerasHub's
    upsample=lambda levels, i: f"up_blocks.{i}.upsamplers.0.conv",
    mid=("mid_block.resnets.0", "mid_block.resnets.1"), attention="mid_block.attentions.0",
    attention_parts=("group_norm", "to_q", "to_k", "to_v", "to_out.0"), shortcut="conv_shortcut",
    norm_out="conv_norm_out")

# Latent diffusion numbers the decoder's levels as the encoder's (`up.0` at full
# resolution); KerasHub's decoder blocks go in the order they run: block i is up.{levels-1-i}.
_LDM_VAE = _VaeNames(
    down=lambda levels, i, j: f"down.{i}.block.{j}",
    downsample=lambda levels, i: f"down.{i}.downsample.conv",
    up=lambda levels, i, j: f"up.{levels - 1 - i}.block.{j}",
    upsample=lambda levels, i: f"up.{levels - 1 - i}.upsample.conv",
    mid=("mid.block_1", "mid.block_2"), attention="mid.attn_1",
    attention_parts=("norm", "q", "k", "v", "proj_out"), shortcut="nin_shortcut", norm_out="norm_out")


def _attention_1x1(state, name: str, out: dict, target: str) -> None:
    """A mid-block attention projection as KerasHub's 1x1 convolution: diffusers saves a
    linear (C, C), latent diffusion a 1x1 convolution (C, C, 1, 1)."""
    weight = _take(state, f"{name}.weight")

    def kernel():
        w = weight()
        return w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T[None, None]

    out[f"{target}/kernel"] = kernel
    out[f"{target}/bias"] = _take(state, f"{name}.bias")


def _vae(state: Mapping, levels: int, blocks: int, names: _VaeNames, what: str) -> dict:
    """The SD3 VAE's tensors named by `names` -> {KerasHub VAEBackbone weight path:
    reader}. The decoder has `blocks + 1` resnets per level."""

    def resnet(state, src, dst, out):
        _norm(state, f"{src}.norm1", out, f"{dst}/norm1")
        _conv(state, f"{src}.conv1", out, f"{dst}/conv1")
        _norm(state, f"{src}.norm2", out, f"{dst}/norm2")
        _conv(state, f"{src}.conv2", out, f"{dst}/conv2")
        if f"{src}.{names.shortcut}.weight" in state:
            _conv(state, f"{src}.{names.shortcut}", out, f"{dst}/residual_projection")

    def mid(state, part, out):
        resnet(state, f"{part}.{names.mid[0]}", f"{part}/mid_block_0", out)
        resnet(state, f"{part}.{names.mid[1]}", f"{part}/mid_block_1", out)
        src, dst = f"{part}.{names.attention}", f"{part}/mid_attention"
        norm, *projections = names.attention_parts
        _norm(state, f"{src}.{norm}", out, f"{dst}/group_norm")
        for ours, theirs in zip(("query", "key", "value", "output"), projections):
            _attention_1x1(state, f"{src}.{theirs}", out, f"{dst}/{ours}_conv2d")

    def build(state):
        out: dict = {}
        _conv(state, "encoder.conv_in", out, "encoder/input_projection")
        for i in range(levels):
            for j in range(blocks):
                resnet(state, f"encoder.{names.down(levels, i, j)}", f"encoder/block_{i}_{j}", out)
            if i < levels - 1:
                _conv(state, f"encoder.{names.downsample(levels, i)}", out, f"encoder/downsample_{i}_conv")
        mid(state, "encoder", out)
        _norm(state, f"encoder.{names.norm_out}", out, "encoder/output_norm")
        _conv(state, "encoder.conv_out", out, "encoder/output_projection")
        _conv(state, "decoder.conv_in", out, "decoder/input_projection")
        mid(state, "decoder", out)
        for i in range(levels):
            for j in range(blocks + 1):
                resnet(state, f"decoder.{names.up(levels, i, j)}", f"decoder/block_{i}_{j}", out)
            if i < levels - 1:
                _conv(state, f"decoder.{names.upsample(levels, i)}", out, f"decoder/upsample_{i}_conv")
        _norm(state, f"decoder.{names.norm_out}", out, "decoder/output_norm")
        _conv(state, "decoder.conv_out", out, "decoder/output_projection")
        return out

    return _mapped(build, state, what, f"an SD3 VAE with {levels} levels of {blocks} blocks")


def vae_weights(state: Mapping, levels: int, blocks: int, what: str = "the SD3 VAE") -> dict:
    """diffusers `AutoencoderKL` (16 latent channels, no quant convs) tensors ->
    {KerasHub VAEBackbone weight path: reader}."""
    return _vae(state, levels, blocks, _DIFFUSERS_VAE, what)


def ldm_vae_weights(state: Mapping, levels: int, blocks: int, what: str = "the SD3 file's VAE") -> dict:
    """A Stability single file's VAE in latent-diffusion's names (its `first_stage_model.`
    prefix removed) -> {KerasHub VAEBackbone weight path: reader}."""
    return _vae(state, levels, blocks, _LDM_VAE, what)
