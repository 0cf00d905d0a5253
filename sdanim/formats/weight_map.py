"""Which checkpoint tensor goes into which KerasCV variable.

KerasCV's Stable Diffusion classes are built in a fixed order (see keras_cv's
diffusion_model.py, text_encoder.py, decoder.py, image_encoder.py). This module lists,
in that order, the leaf layers of each part twice:

    spec(part, version)   names in the diffusers layout ("unet.down_blocks.0...") and in
                          the original CompVis layout ("model.diffusion_model.input_blocks...")
    keras_leaves(model)   the Keras leaf layers (Dense, Conv2D, norms, Embedding)

and `bind` pairs them, checks every shape before anything is assigned, then copies the
tensors one at a time (peak memory: the model plus one tensor).

Layout conversions follow diffusers' single-file conversion (convert_ldm_unet_checkpoint,
convert_ldm_vae_checkpoint, convert_open_clip_checkpoint); tests/test_checkpoints.py
checks that diffusers' own code maps our original-layout names onto the same tensors.

Tensor conventions: torch Linear (out, in) -> Keras kernel (in, out); torch Conv2d
(out, in, kh, kw) -> Keras (kh, kw, in, out); 1x1 convolutions and linear layers are
interchangeable (the VAE attention is a 1x1 conv in KerasCV and a Linear in diffusers).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from sdanim.formats.checkpoints import Checkpoint
from sdanim.formats.tensors import CheckpointError

PARTS = ("text_encoder", "diffusion_model", "decoder", "image_encoder")


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one Keras leaf layer's tensors are, in one layout.

    bases: candidate base names (the first one present wins), e.g. "unet.conv_in".
    bias: whether the layer has a bias (".bias"; norms: beta).
    raw: the key is the base itself (OpenCLIP's `positional_embedding`).
    rows: index of a third of a fused q/k/v in-projection (OpenCLIP's in_proj_weight).
    """

    bases: tuple
    bias: bool = True
    raw: bool = False
    rows: Optional[int] = None

    def keys(self, base: str) -> list:
        if self.raw:
            return [base]
        if self.rows is not None:
            return [base + "_weight", base + "_bias"]
        return [base + ".weight"] + ([base + ".bias"] if self.bias else [])


Leaf = dict  # layout -> Source


def _leaf(diffusers, original, bias: bool = True) -> Leaf:
    d = (diffusers,) if isinstance(diffusers, str) else tuple(diffusers)
    o = (original,) if isinstance(original, str) else tuple(original)
    return {
        "diffusers": Source(d, bias=bias),
        "original": Source(o, bias=bias),
    }


def _prefixed(leaves: list, diffusers_prefix: str, original_prefix: str) -> list:
    out = []
    for leaf in leaves:
        d, o = leaf["diffusers"], leaf["original"]
        out.append({
            "diffusers": dataclasses.replace(d, bases=tuple(diffusers_prefix + b for b in d.bases)),
            "original": dataclasses.replace(o, bases=tuple(original_prefix + b for b in o.bases)),
        })
    return out


# ----------------------------------------------------------------------------------------
# names, in KerasCV's construction order


def _unet_resnet(d: str, o: str, shortcut: bool) -> list:
    names = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
             ("norm2", "out_layers.0"), ("conv2", "out_layers.3")]
    if shortcut:
        names.append(("conv_shortcut", "skip_connection"))
    return [_leaf(f"{d}.{a}", f"{o}.{b}") for a, b in names]


def _unet_transformer(d: str, o: str) -> list:
    block = "transformer_blocks.0"
    leaves = [_leaf(f"{d}.norm", f"{o}.norm"), _leaf(f"{d}.proj_in", f"{o}.proj_in")]
    for attn, norm in (("attn1", "norm1"), ("attn2", "norm2")):
        leaves.append(_leaf(f"{d}.{block}.{norm}", f"{o}.{block}.{norm}"))
        for p in ("to_q", "to_k", "to_v"):
            leaves.append(_leaf(f"{d}.{block}.{attn}.{p}", f"{o}.{block}.{attn}.{p}", bias=False))
        leaves.append(_leaf(f"{d}.{block}.{attn}.to_out.0", f"{o}.{block}.{attn}.to_out.0"))
    for name in ("norm3", "ff.net.0.proj", "ff.net.2"):
        leaves.append(_leaf(f"{d}.{block}.{name}", f"{o}.{block}.{name}"))
    leaves.append(_leaf(f"{d}.proj_out", f"{o}.proj_out"))
    return leaves


def _unet_down_and_mid() -> list:
    """The UNet's four down levels and mid block, in the order KerasCV builds them (the
    UNet's and a ControlNet's copy of its encoder)."""
    s = []
    for i in range(4):
        for j in range(2):
            n = 3 * i + j + 1
            s += _unet_resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0", j == 0 and i in (1, 2))
            if i < 3:
                s += _unet_transformer(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1")
        if i < 3:
            s.append(_leaf(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{3 * i + 3}.0.op"))
    s += _unet_resnet("mid_block.resnets.0", "middle_block.0", False)
    s += _unet_transformer("mid_block.attentions.0", "middle_block.1")
    s += _unet_resnet("mid_block.resnets.1", "middle_block.2", False)
    return s


def _unet_spec() -> list:
    s = [_leaf("time_embedding.linear_1", "time_embed.0"), _leaf("time_embedding.linear_2", "time_embed.2"),
         _leaf("conv_in", "input_blocks.0.0")]
    s += _unet_down_and_mid()
    for i in range(4):
        for j in range(3):
            n = 3 * i + j
            s += _unet_resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0", True)
            if i > 0:
                s += _unet_transformer(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1")
        if i < 3:
            s.append(_leaf(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.conv"))
    s += [_leaf("conv_norm_out", "out.0"), _leaf("conv_out", "out.2")]
    return _prefixed(s, "unet.", "model.diffusion_model.")


def _controlnet_spec() -> list:
    """A ControlNet (`sdanim.model.controlnet`), in the order it is built: the UNet's time
    embedding, conv_in, down blocks and mid block under their UNet names, the
    conditioning embedding (the hint's convolutions), and the 12 + 1 zero convolutions.
    Names without a prefix: diffusers' ControlNetModel, and the original layout with its
    `control_model.` taken off (lllyasviel's files; SD 2.1 nets have none)."""
    s = [_leaf("time_embedding.linear_1", "time_embed.0"), _leaf("time_embedding.linear_2", "time_embed.2"),
         _leaf("conv_in", "input_blocks.0.0"), _leaf("controlnet_cond_embedding.conv_in", "input_hint_block.0")]
    s += [_leaf(f"controlnet_cond_embedding.blocks.{k}", f"input_hint_block.{2 * k + 2}") for k in range(6)]
    s.append(_leaf("controlnet_cond_embedding.conv_out", "input_hint_block.14"))
    s += _unet_down_and_mid()
    s += [_leaf(f"controlnet_down_blocks.{k}", f"zero_convs.{k}.0") for k in range(12)]
    return s + [_leaf("controlnet_mid_block", "middle_block_out.0")]


def _vae_resnet(d: str, o: str, shortcut: bool) -> list:
    names = [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2")]
    if shortcut:
        names.append(("conv_shortcut", "nin_shortcut"))
    return [_leaf(f"{d}.{a}", f"{o}.{b}") for a, b in names]


def _vae_attention(d: str, o: str) -> list:
    # diffusers >= 0.14 names first, then the names older diffusers folders carry.
    names = [(("group_norm",), "norm"), (("to_q", "query"), "q"), (("to_k", "key"), "k"),
             (("to_v", "value"), "v"), (("to_out.0", "proj_attn"), "proj_out")]
    return [_leaf([f"{d}.{a}" for a in alts], f"{o}.{b}") for alts, b in names]


def _decoder_spec() -> list:
    s = [_leaf("post_quant_conv", "post_quant_conv"), _leaf("decoder.conv_in", "decoder.conv_in")]
    s += _vae_resnet("decoder.mid_block.resnets.0", "decoder.mid.block_1", False)
    s += _vae_attention("decoder.mid_block.attentions.0", "decoder.mid.attn_1")
    s += _vae_resnet("decoder.mid_block.resnets.1", "decoder.mid.block_2", False)
    for i in range(4):
        for j in range(3):
            s += _vae_resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{3 - i}.block.{j}", j == 0 and i in (2, 3))
        if i < 3:
            s.append(_leaf(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{3 - i}.upsample.conv"))
    s += [_leaf("decoder.conv_norm_out", "decoder.norm_out"), _leaf("decoder.conv_out", "decoder.conv_out")]
    return _prefixed(s, "vae.", "first_stage_model.")


def _encoder_spec() -> list:
    s = [_leaf("encoder.conv_in", "encoder.conv_in")]
    for i in range(4):
        for j in range(2):
            s += _vae_resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", j == 0 and i in (1, 2))
        if i < 3:
            s.append(_leaf(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"))
    s += _vae_resnet("encoder.mid_block.resnets.0", "encoder.mid.block_1", False)
    s += _vae_attention("encoder.mid_block.attentions.0", "encoder.mid.attn_1")
    s += _vae_resnet("encoder.mid_block.resnets.1", "encoder.mid.block_2", False)
    s += [_leaf("encoder.conv_norm_out", "encoder.norm_out"), _leaf("encoder.conv_out", "encoder.conv_out"),
          _leaf("quant_conv", "quant_conv")]
    return _prefixed(s, "vae.", "first_stage_model.")


def _text_spec(version: str) -> list:
    # transformers' CLIPTextModel names, with "text_model." (as published) or without it
    # (as transformers 5 keeps them in memory).
    d = "text_encoder.text_model."
    if version == "1.4":  # CLIP ViT-L/14: transformers' names under cond_stage_model.transformer
        o = ("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")

        def leaf(name, orig=None, bias=True):
            return _leaf([d + name, "text_encoder." + name], [p + (orig or name) for p in o], bias=bias)

        s = [leaf("embeddings.token_embedding", bias=False), leaf("embeddings.position_embedding", bias=False)]
        for i in range(12):
            e = f"encoder.layers.{i}."
            s += [leaf(e + n) for n in ("layer_norm1", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                         "self_attn.out_proj", "layer_norm2", "mlp.fc1", "mlp.fc2")]
        return s + [leaf("final_layer_norm")]
    # SD 2.x: OpenCLIP ViT-H/14, the penultimate of its 24 layers, then ln_final.
    o = "cond_stage_model.model."

    def dn(name):
        return (d + name, "text_encoder." + name)

    s = [_leaf(dn("embeddings.token_embedding"), o + "token_embedding", bias=False),
         {"diffusers": Source(dn("embeddings.position_embedding"), bias=False),
          "original": Source((o + "positional_embedding",), raw=True)}]
    for i in range(23):
        e, r = f"encoder.layers.{i}.", f"{o}transformer.resblocks.{i}."
        s.append(_leaf(dn(e + "layer_norm1"), r + "ln_1"))
        for k, p in enumerate(("q_proj", "k_proj", "v_proj")):
            s.append({"diffusers": Source(dn(e + "self_attn." + p)),
                      "original": Source((r + "attn.in_proj",), rows=k)})
        s += [_leaf(dn(e + "self_attn.out_proj"), r + "attn.out_proj"), _leaf(dn(e + "layer_norm2"), r + "ln_2"),
              _leaf(dn(e + "mlp.fc1"), r + "mlp.c_fc"), _leaf(dn(e + "mlp.fc2"), r + "mlp.c_proj")]
    return s + [_leaf(dn("final_layer_norm"), o + "ln_final")]


def spec(part: str, version: str) -> list:
    """The leaves of one part, in KerasCV's order: a list of {layout: Source}."""
    if part == "text_encoder":
        return _text_spec(version)
    if part == "diffusion_model":
        return _unet_spec()
    if part == "decoder":
        return _decoder_spec()
    if part == "image_encoder":
        return _encoder_spec()
    if part == "controlnet":
        return _controlnet_spec()
    raise ValueError(part)


# What a checkpoint may carry beside the model.
_IGNORED_PREFIXES = (
    "model_ema.",                 # EMA copy of the UNet in full training checkpoints
    "first_stage_model.loss.",    # the VAE's training loss (LPIPS, discriminator)
    "cond_stage_model.model.transformer.resblocks.23.",  # SD 2.x uses the penultimate layer
)
_IGNORED_KEYS = {
    "text_encoder.text_model.embeddings.position_ids", "text_encoder.embeddings.position_ids",
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "cond_stage_model.transformer.embeddings.position_ids",
    "cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale",
    "cond_stage_model.model.attn_mask",
    # The DDPM schedule buffers of the training code (sdanim computes its own).
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "model.logvar",
}


def _ignored(key: str) -> bool:
    return key in _IGNORED_KEYS or key.startswith(_IGNORED_PREFIXES)


def _choose(source: Source, tensors: dict) -> tuple:
    """(keys, missing) for a leaf: the first candidate base with all its keys present."""
    for base in source.bases:
        keys = source.keys(base)
        if all(k in tensors for k in keys):
            return keys, []
    keys = source.keys(source.bases[0])
    return keys, [k for k in keys if k not in tensors]


def _summary(items: list, what: str) -> str:
    head = ", ".join(items[:5])
    more = f" and {len(items) - 5} more" if len(items) > 5 else ""
    return f"{len(items)} {what} ({head}{more})"


def check_keys(checkpoint: Checkpoint) -> None:
    """Every tensor of all four parts present, and nothing unexplained left over."""
    used, missing = set(), []
    for part in PARTS:
        for leaf in spec(part, checkpoint.version):
            keys, lacking = _choose(leaf[checkpoint.layout], checkpoint.tensors)
            missing += lacking
            used.update(k for k in keys if k not in lacking)
    extra = sorted(k for k in checkpoint.keys() if k not in used and not _ignored(k))
    _raise_unfit(checkpoint, (missing, "missing tensors"), (extra, "unexpected tensors"))


def _raise_unfit(checkpoint: Checkpoint, *problems: tuple) -> None:
    """One error counting each kind of problem, (items, label), and naming the first few."""
    found = [_summary(items, label) for items, label in problems if items]
    if found:
        what, param = getattr(checkpoint, "describes", ("the checkpoint", "checkpoint"))
        raise CheckpointError(
            f"{what} does not fit Stable Diffusion {checkpoint.version[0]}.x: "
            f"{'; '.join(found)}. Received: {param}={checkpoint.path!r}"
        )


# ----------------------------------------------------------------------------------------
# the Keras side


def _conv(layer):
    return layer.conv2d  # KerasCV's PaddedConv2D wraps a Conv2D


def _leaves_of(layer) -> list:
    name = type(layer).__name__
    if name in ("Dense", "GroupNormalization", "LayerNormalization", "Embedding"):
        return [layer]
    if name == "PaddedConv2D":
        return [_conv(layer)]
    if name == "ResBlock":  # UNet
        out = [layer.entry_flow[0], _conv(layer.entry_flow[2]), layer.embedding_flow[1],
               layer.exit_flow[0], _conv(layer.exit_flow[2])]
        return out + ([_conv(layer.residual_projection)] if hasattr(layer.residual_projection, "conv2d") else [])
    if name == "ResnetBlock":  # VAE
        out = [layer.norm1, _conv(layer.conv1), layer.norm2, _conv(layer.conv2)]
        return out + ([_conv(layer.residual_projection)] if hasattr(layer.residual_projection, "conv2d") else [])
    if name == "AttentionBlock":
        return [layer.norm, _conv(layer.q), _conv(layer.k), _conv(layer.v), _conv(layer.proj_out)]
    if name == "SpatialTransformer":
        tb = layer.transformer_block
        out = [layer.norm] + _leaves_of(layer.proj1)
        for attn, norm in ((tb.attn1, tb.norm1), (tb.attn2, tb.norm2)):
            out += [norm, attn.to_q, attn.to_k, attn.to_v, attn.out_proj]
        return out + [tb.norm3, tb.geglu.dense, tb.dense] + _leaves_of(layer.proj2)
    if name == "Upsample":
        return [_conv(layer.conv)]
    if name == "CLIPEmbedding":
        return [layer.token_embedding, layer.position_embedding]
    if name == "CLIPEncoderLayer":
        a = layer.clip_attn
        return [layer.layer_norm1, a.q_proj, a.k_proj, a.v_proj, a.out_proj, layer.layer_norm2, layer.fc1, layer.fc2]
    return []  # no weights: activations, inputs, concatenations, upsampling, rescaling


def keras_leaves(model) -> list:
    """The weight-holding leaf layers of a KerasCV SD sub-model, in construction order (a
    ControlNet lists its blocks as it built them: `blocks_in_order`)."""
    if hasattr(model, "blocks_in_order"):
        return [leaf for block in model.blocks_in_order for leaf in _leaves_of(block)]
    if type(model).__name__.startswith("DiffusionModel"):
        # A functional model lists layers by graph depth; within each layer type that is
        # still construction order, so take the types apart and interleave them as built.
        by_type: dict = {}
        for layer in model.layers:
            by_type.setdefault(type(layer).__name__, []).append(layer)
        dense, convs = iter(by_type["Dense"]), iter(by_type["PaddedConv2D"])
        res, st, up = iter(by_type["ResBlock"]), iter(by_type["SpatialTransformer"]), iter(by_type["Upsample"])
        out = [next(dense), next(dense)] + _leaves_of(next(convs))
        for i in range(4):
            for _ in range(2):
                out += _leaves_of(next(res)) + (_leaves_of(next(st)) if i < 3 else [])
            if i < 3:
                out += _leaves_of(next(convs))
        out += _leaves_of(next(res)) + _leaves_of(next(st)) + _leaves_of(next(res))
        for i in range(4):
            for _ in range(3):
                out += _leaves_of(next(res)) + (_leaves_of(next(st)) if i > 0 else [])
            if i < 3:
                out += _leaves_of(next(up))
        return out + by_type["GroupNormalization"] + _leaves_of(next(convs))
    out = []
    for layer in model.layers:
        out += _leaves_of(layer)
    return out


def _variables(layer) -> list:
    """[(variable, transpose)] in checkpoint order: weight first, then bias."""
    name = type(layer).__name__
    if name in ("GroupNormalization", "LayerNormalization"):
        return [(layer.gamma, False), (layer.beta, False)]
    if name == "Embedding":
        return [(layer.embeddings, False)]
    return [(layer.kernel, True)] + ([(layer.bias, False)] if layer.use_bias else [])


def fit_shape(shape: tuple, target: tuple, transpose: bool) -> Optional[tuple]:
    """The ops that turn a torch tensor of `shape` into Keras's `target`, or None."""
    if transpose and len(shape) == 4:
        moved = (shape[2], shape[3], shape[1], shape[0])
        perm = (2, 3, 1, 0)
    elif transpose and len(shape) == 2:
        moved, perm = (shape[1], shape[0]), (1, 0)
    else:
        moved, perm = tuple(shape), None
    if moved == tuple(target):
        return (perm, None)
    squeeze = lambda s: tuple(d for d in s if d != 1)  # noqa: E731  (1x1 conv <-> linear)
    if squeeze(moved) == squeeze(target) and int(np.prod(moved)) == int(np.prod(target)):
        return (perm, tuple(target))
    return None


def bind(model, checkpoint: Checkpoint, part: str) -> None:
    """Copies the checkpoint's tensors for `part` into the KerasCV model `model`.

    Every shape is checked before the first assignment; a mismatch raises one error that
    lists them, and the model is left as it was.
    """
    leaves = keras_leaves(model)
    sources = spec(part, checkpoint.version)
    if len(leaves) != len(sources):  # the KerasCV classes changed under us
        raise CheckpointError(
            f"internal: KerasCV's {type(model).__name__} has {len(leaves)} weight layers, "
            f"sdanim's map {len(sources)}"
        )
    plan, missing, misfit = [], [], []
    for layer, leaf in zip(leaves, sources):
        source = leaf[checkpoint.layout]
        keys, lacking = _choose(source, checkpoint.tensors)
        missing += lacking
        if lacking:
            continue
        for key, (variable, transpose) in zip(keys, _variables(layer)):
            shape = checkpoint.tensors[key].shape
            if source.rows is not None:
                third = shape[0] // 3
                shape = (third,) + tuple(shape[1:])
            ops = fit_shape(shape, tuple(variable.shape), transpose)
            if ops is None:
                misfit.append(f"{key} {tuple(checkpoint.tensors[key].shape)} (expected {_torch_shape(variable.shape, transpose)})")
            else:
                plan.append((variable, key, source.rows, ops))
    _raise_unfit(checkpoint, (missing, "missing tensors"), (misfit, "tensors of the wrong shape"))
    for variable, key, rows, (perm, reshape) in plan:
        array = checkpoint.tensors[key].load()
        if rows is not None:
            third = array.shape[0] // 3
            array = array[rows * third:(rows + 1) * third]
        if perm is not None:
            array = np.transpose(array, perm)
        if reshape is not None:
            array = array.reshape(reshape)
        variable.assign(np.ascontiguousarray(array, dtype=variable.dtype))


def _torch_shape(keras_shape, transpose: bool) -> tuple:
    s = tuple(keras_shape)
    if transpose and len(s) == 4:
        return (s[3], s[2], s[0], s[1])
    if transpose and len(s) == 2:
        return (s[1], s[0])
    return s
