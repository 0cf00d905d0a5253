"""SD3-family weights in diffusers' layout, named as KerasHub's layers name theirs.

diffusers' `SD3Transformer2DModel` keeps q, k and v (and the context's add_q/k/v) as
separate linears; KerasHub's MMDiT fuses each triple into one `attention_qkv` dense. The
modulations of `norm_out` and of the last block's context norm (`AdaLayerNormContinuous`)
are (scale, shift) in diffusers and (shift, scale) in KerasHub and in Stability's own
files, so their halves are swapped back (diffusers' single-file conversion swaps them
the other way). The position grid is a buffer in diffusers (fixed sin-cos) and a weight
in KerasHub. Every tensor is accounted for: anything left over, or anything missing, is
one line naming it.

Pure NumPy: torch linears (out, in) become Keras kernels (in, out), convolutions
(out, in, kh, kw) become (kh, kw, in, out).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from sdanim.config.errors import SdanimError


def _dense(state, name: str, out: dict, target: str, bias: bool = True) -> None:
    out[f"{target}/kernel"] = state.pop(f"{name}.weight").T
    if bias:
        out[f"{target}/bias"] = state.pop(f"{name}.bias")


def _fused(state, names: tuple, out: dict, target: str) -> None:
    out[f"{target}/kernel"] = np.concatenate([state.pop(f"{n}.weight") for n in names], axis=0).T
    out[f"{target}/bias"] = np.concatenate([state.pop(f"{n}.bias") for n in names], axis=0)


def _swap_halves(array: np.ndarray) -> np.ndarray:
    first, second = np.split(array, 2, axis=0)
    return np.concatenate([second, first], axis=0)


def _adaln_swapped(state, name: str, out: dict, target: str) -> None:
    out[f"{target}/kernel"] = _swap_halves(state.pop(f"{name}.weight")).T
    out[f"{target}/bias"] = _swap_halves(state.pop(f"{name}.bias"))


def transformer_layers(config: Mapping) -> tuple:
    """(num_layers, dual attention blocks, qk_norm) read off a diffusers transformer
    config.json."""
    return (int(config["num_layers"]), tuple(config.get("dual_attention_layers") or ()),
            config.get("qk_norm"))


def mmdit_weights(state: Mapping[str, np.ndarray], num_layers: int, dual: tuple = (), qk_norm=None,
                  what: str = "the SD3 transformer") -> dict:
    """diffusers `SD3Transformer2DModel` tensors -> {KerasHub MMDiT weight path: array}.

    Raises a one-line `SdanimError` naming any tensor left over (another architecture).
    """
    state = {k: np.asarray(v, np.float32) for k, v in state.items()}
    try:
        out = _mmdit(state, num_layers, dual, qk_norm)
    except KeyError as missing:
        raise SdanimError(f"{what} lacks {missing.args[0]!r}: not an SD3 transformer of this shape (layers="
                          f"{num_layers}, dual attention={list(dual)}, qk_norm={qk_norm}). "
                          f"Received: {missing.args[0]}=None") from None
    if state:
        names = sorted(state)
        raise SdanimError(f"{what} has {len(names)} tensor(s) sdanim does not map, e.g. {names[0]!r}: not an SD3 "
                          f"transformer of this shape (layers={num_layers}, dual attention={list(dual)}, "
                          f"qk_norm={qk_norm}). Received: {len(names)} extra tensor(s)")
    return out


def _mmdit(state: dict, num_layers: int, dual: tuple, qk_norm) -> dict:
    """Pops every tensor it maps from `state`."""
    out: dict = {}
    conv = state.pop("pos_embed.proj.weight")
    out["patch_embedding/patch_embedding/kernel"] = conv.transpose(2, 3, 1, 0)
    out["patch_embedding/patch_embedding/bias"] = state.pop("pos_embed.proj.bias")
    out["position_embedding/embeddings"] = state.pop("pos_embed.pos_embed")[0]
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
            out[f"{x}/q_norm/scale"] = state.pop(f"{src}.attn.norm_q.weight")
            out[f"{x}/k_norm/scale"] = state.pop(f"{src}.attn.norm_k.weight")
            out[f"{c}/q_norm/scale"] = state.pop(f"{src}.attn.norm_added_q.weight")
            out[f"{c}/k_norm/scale"] = state.pop(f"{src}.attn.norm_added_k.weight")
        if i in dual:
            _fused(state, tuple(f"{src}.attn2.to_{p}" for p in "qkv"), out, f"{x}/attention_qkv2")
            _dense(state, f"{src}.attn2.to_out.0", out, f"{x}/attention_proj2")
            if qk_norm:
                out[f"{x}/q_norm2/scale"] = state.pop(f"{src}.attn2.norm_q.weight")
                out[f"{x}/k_norm2/scale"] = state.pop(f"{src}.attn2.norm_k.weight")
    _adaln_swapped(state, "norm_out.linear", out, "output_ada_layer_norm/dense")
    _dense(state, "proj_out", out, "output_dense")
    return out
