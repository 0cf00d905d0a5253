"""LoRA files merged into a loaded model's weights, and taken out again bit-identically.

    LoRA file (sdanim.formats.lora_files) -> module names mapped onto KerasCV's layers
    through the checkpoint name tables (sdanim.formats.weight_map) -> every shape checked
    -> W + scale * (alpha / rank) * up @ down, in place

Refused, before any weight changes, with how many tensors did not fit: LoRAs for
another architecture (an SD 2.x LoRA on SD 1.x: shapes; SDXL's `lora_te1_`/`lora_te2_`,
`input_blocks`: names).

SD3-family models (`sdanim.model.sd3`): the MMDiT's linear layers, under diffusers/PEFT's
names and kohya's spellings (`sdanim.formats.sd3_files.mmdit_lora_layout`); a diffusers
q, k or v goes into its third of KerasHub's fused qkv, and the modulations diffusers
orders (scale, shift) have their halves swapped. CLIP-L's and CLIP-G's attention and MLP
layers (`text_encoder.` / `text_encoder_2.`, kohya's `lora_te1_` / `lora_te2_`): the
attention kernels take the change reshaped to KerasHub's (in, heads, head_dim).

Only the variables a LoRA touches are copied (their base values, kept in the model's
state), so removing or changing LoRAs restores the base weights exactly without a
second copy of the UNet.
"""

from __future__ import annotations

import numpy as np

from sdanim.formats.lora_files import LoraFile, LoraModule, as_loras, lora_error, read_lora
from sdanim.formats.sd3_files import clip_lora_layout, mmdit_lora_layout
from sdanim.formats.weight_map import fit_shape, keras_leaves, spec


def _targets(model) -> dict:
    """{name: (part, keras leaf)} for every adaptable layer, under the canonical diffusers
    name and its kohya spelling. Kept in the model's state (the layers never change)."""
    if model.state.lora_targets is not None:
        return model.state.lora_targets
    targets = {}
    for part, kohya_prefix in (("text_encoder", "lora_te_"), ("diffusion_model", "lora_unet_")):
        for layer, leaf in zip(keras_leaves(getattr(model, part)), spec(part, model.version)):
            if type(layer).__name__ not in ("Dense", "Conv2D"):
                continue  # norms and embeddings take no LoRA
            name = leaf["diffusers"].bases[0]  # "unet.down_blocks..." / "text_encoder.text_model...."
            short = name.split(".", 1)[1]
            targets[name] = (part, layer)
            targets[kohya_prefix + short.replace(".", "_")] = (part, layer)
    model.state.lora_targets = targets
    return targets


def _plan(model, lora: LoraFile, scale: float) -> list:
    """[(variable, delta in Keras layout)] for one LoRA, every name and shape checked
    first: a LoRA that does not fit raises before anything is assigned."""
    targets = _targets(model)
    plan, misfit = [], []
    unmatched = list(lora.unknown)
    for name, module in lora.modules.items():
        target = targets.get(name)
        if target is None:
            unmatched.append(name)
            continue
        _, layer = target
        variable = layer.kernel
        torch_shape = (module.up.shape[0],) + tuple(module.down.shape[1:])
        ops = fit_shape(torch_shape, tuple(variable.shape), transpose=True)
        if ops is None:
            misfit.append(f"{name} {torch_shape}")
            continue
        plan.append((variable, lambda module=module, ops=ops: _keras_delta(module, ops, scale)))
    _refuse_misfits(lora, unmatched, misfit, f"Stable Diffusion {model.version[0]}.x",
                    f"a LoRA for another architecture, e.g. SD {'2' if model.version[0] == '1' else '1'}.x or SDXL?")
    return plan


def _refuse_misfits(lora: LoraFile, unmatched: list, misfit: list, model: str, hint: str) -> None:
    """One line counting a LoRA's modules with no matching layer and of the wrong shape
    (nothing if there are none), before any weight changes."""
    if not (unmatched or misfit):
        return
    total = len(lora.modules) + len(lora.unknown)
    found = []
    if unmatched:
        found.append(f"{len(unmatched)} with no matching layer ({', '.join(unmatched[:3])}"
                     f"{' ...' if len(unmatched) > 3 else ''})")
    if misfit:
        found.append(f"{len(misfit)} of the wrong shape ({', '.join(misfit[:3])}{' ...' if len(misfit) > 3 else ''})")
    raise lora_error(f"the LoRA does not fit this {model} model: of its {total} modules, {'; '.join(found)} ({hint})",
                     lora.path)


def _kernels(layer) -> dict:
    """{layer path: kernel variable} inside `layer` (paths as `sdanim.model.sd3.assign` reads them)."""
    prefix = layer.name + "/"
    paths = {(v.path[len(prefix):] if v.path.startswith(prefix) else v.path): v for v in layer.weights}
    return {path[:-len("/kernel")]: v for path, v in paths.items() if path.endswith("/kernel")}


def _sd3_targets(model) -> dict:
    """{LoRA module name: (kernel variable, part, parts, swapped)} for an SD3 model's MMDiT
    and its two CLIP text encoders."""
    if model.state.lora_targets is None:
        backbone = model.backbone
        layout = mmdit_lora_layout(backbone.mmdit_num_layers, tuple(backbone.mmdit_dual_attention_indices or ()),
                                   backbone.mmdit_qk_norm)
        kernels = _kernels(backbone.diffuser)
        targets = {name: (kernels[target], *rest) for name, (target, *rest) in layout.items()}
        for clip, diffusers_name, kohya_name in ((backbone.clip_l, "text_encoder", "lora_te1_"),
                                                 (backbone.clip_g, "text_encoder_2", "lora_te2_")):
            kernels = _kernels(clip)
            for name, (target, *rest) in clip_lora_layout(clip.num_layers, clip.name).items():
                targets[f"{diffusers_name}.{name}"] = targets[kohya_name + name.replace(".", "_")] = (
                    kernels[target], *rest)
        model.state.lora_targets = targets
    return model.state.lora_targets


def _torch_shape(kernel, parts: int) -> tuple:
    """The (out, in) shape of the torch linear layer whose weight is `kernel`'s (or its
    `parts`-th): a Dense's (in, out); KerasHub CLIP's (in, heads, head_dim) query, key and
    value kernels and its (heads, head_dim, out) output kernel."""
    shape = tuple(kernel.shape)
    if len(shape) == 2:
        return shape[1] // parts, shape[0]
    if kernel.path.endswith("attention_output/kernel"):
        return shape[2], shape[0] * shape[1]
    return shape[1] * shape[2], shape[0]


def _sd3_delta(module: LoraModule, kernel_shape: tuple, part: int, parts: int, swapped: bool, scale: float):
    """The module's change as the kernel's: its `part` of `parts` output columns."""
    delta = module.delta() * np.float32(scale)  # (out / parts, in)
    if swapped:
        first, second = np.split(delta, 2, axis=0)
        delta = np.concatenate([second, first], axis=0)
    if len(kernel_shape) != 2:  # a CLIP attention kernel: (in, out) in its grouping of axes
        return delta.T.reshape(kernel_shape)
    width = kernel_shape[1] // parts
    full = np.zeros(kernel_shape, np.float32)
    full[:, part * width:(part + 1) * width] = delta.T
    return full


def _plan_sd3(model, lora: LoraFile, scale: float) -> list:
    """As `_plan`, for an SD3 model's MMDiT and CLIPs (`_sd3_targets`)."""
    targets = _sd3_targets(model)
    plan, unmatched, misfit = [], list(lora.unknown), []
    for name, module in lora.modules.items():
        target = targets.get(name)
        if target is None or len(module.down.shape) != 2:  # (a LoCon's conv: no conv takes one here)
            unmatched.append(name)
            continue
        variable, part, parts, swapped = target
        shape = tuple(variable.shape)
        if (module.up.shape[0], module.down.shape[1]) != _torch_shape(variable, parts):
            misfit.append(f"{name} {(module.up.shape[0], module.down.shape[1])}")
            continue
        plan.append((variable, lambda m=module, s=shape, p=part, n=parts, w=swapped: _sd3_delta(m, s, p, n, w, scale)))
    _refuse_misfits(lora, unmatched, misfit, model.version,
                    "a LoRA for another model, e.g. SD 1.x/2.x, SDXL or another SD3 size?")
    return plan


def _keras_delta(module: LoraModule, ops, scale: float) -> np.ndarray:
    perm, reshape = ops
    delta = module.delta() * np.float32(scale)
    if perm is not None:
        delta = np.transpose(delta, perm)
    if reshape is not None:
        delta = delta.reshape(reshape)
    return delta


def set_loras(model, loras) -> None:
    """Makes `loras` (see `as_loras`) the model's LoRAs, in place: every file is read and
    checked against the model first (nothing changes if one fails), then the weights any
    earlier LoRA touched are restored to their base values and the new ones are merged in
    order, W + scale * (alpha / rank) * up @ down."""
    loras = as_loras(loras)
    files = [read_lora(lora.path) for lora in loras]
    make_plan = _plan_sd3 if getattr(model, "family", None) == "sd3" else _plan
    plans = [make_plan(model, f, lora.scale) for f, lora in zip(files, loras)]
    originals = model.state.lora_base  # id(variable) -> (variable, base value)
    # 1. Restore the base weights (exact copies of what merging touched).
    for variable, base in originals.values():
        variable.assign(base)
    originals.clear()
    # 2. Merge each LoRA; keep the base value of each variable at its first touch.
    for plan in plans:
        for variable, delta in plan:
            if id(variable) not in originals:
                originals[id(variable)] = (variable, np.array(variable.numpy(), copy=True))
            current = np.asarray(variable.numpy(), dtype=np.float32)
            variable.assign((current + delta()).astype(variable.dtype))
    model.loras = tuple(loras)
    model.lora_records = [f.record(lora.scale) for f, lora in zip(files, loras)]
    model.invalidate()  # embeddings of the old text encoder weights


__all__ = ["set_loras"]
