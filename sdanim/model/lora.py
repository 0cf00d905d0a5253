"""LoRA files merged into a loaded model's weights, and taken out again bit-identically.

    LoRA file (sdanim.formats.lora_files) -> module names mapped onto KerasCV's layers
    through the checkpoint name tables (sdanim.formats.weight_map) -> every shape checked
    -> W + scale * (alpha / rank) * up @ down, in place

Refused, before any weight changes, with how many tensors did not fit: LoRAs for
another architecture (an SD 2.x LoRA on SD 1.x: shapes; SDXL's `lora_te1_`/`lora_te2_`,
`input_blocks`: names).

Only the variables a LoRA touches are copied (their base values, kept in the model's
state), so removing or changing LoRAs restores the base weights exactly without a
second copy of the UNet.
"""

from __future__ import annotations

import numpy as np

from sdanim.formats.lora_files import LoraFile, LoraModule, as_loras, lora_error, read_lora
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
        plan.append((variable, module, ops))
    if unmatched or misfit:
        total = len(lora.modules) + len(lora.unknown)
        found = []
        if unmatched:
            found.append(f"{len(unmatched)} with no matching layer ({', '.join(unmatched[:3])}"
                         f"{' ...' if len(unmatched) > 3 else ''})")
        if misfit:
            found.append(f"{len(misfit)} of the wrong shape ({', '.join(misfit[:3])}{' ...' if len(misfit) > 3 else ''})")
        raise lora_error(
            f"the LoRA does not fit this Stable Diffusion {model.version[0]}.x model: of its {total} modules, "
            f"{'; '.join(found)} (a LoRA for another architecture, e.g. SD {'2' if model.version[0] == '1' else '1'}.x or SDXL?)",
            lora.path,
        )
    return [(variable, module, ops, scale) for variable, module, ops in plan]


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
    plans = [_plan(model, f, lora.scale) for f, lora in zip(files, loras)]
    originals = model.state.lora_base  # id(variable) -> (variable, base value)
    # 1. Restore the base weights (exact copies of what merging touched).
    for variable, base in originals.values():
        variable.assign(base)
    originals.clear()
    # 2. Merge each LoRA; keep the base value of each variable at its first touch.
    for plan in plans:
        for variable, module, ops, scale in plan:
            if id(variable) not in originals:
                originals[id(variable)] = (variable, np.array(variable.numpy(), copy=True))
            current = np.asarray(variable.numpy(), dtype=np.float32)
            variable.assign((current + _keras_delta(module, ops, scale)).astype(variable.dtype))
    model.loras = tuple(loras)
    model.lora_records = [f.record(lora.scale) for f, lora in zip(files, loras)]
    model.invalidate()  # embeddings of the old text encoder weights


__all__ = ["set_loras"]
