"""AnimateDiff motion module files: the layout, the version and the names, read without
executing code (`sdanim.formats.tensors`).

    original layout   guoyww's `.ckpt`/`.safetensors`: `down_blocks.I.motion_modules.J.
                      temporal_transformer.{norm, proj_in, proj_out, transformer_blocks.0.
                      {attention_blocks.K.{to_q,to_k,to_v,to_out.0,pos_encoder.pe}, norms.K,
                      ff.net.0.proj, ff.net.2, ff_norm}}`, `up_blocks.I...`, `mid_block...`
    diffusers layout  a `MotionAdapter` folder (config.json + diffusion_pytorch_model.
                      safetensors) or file: `.temporal_transformer` dropped,
                      `attention_blocks.K` -> `attnK+1`, `norms.K` -> `normK+1`,
                      `ff_norm` -> `norm3`, `pos_encoder` -> `pos_embed`

Every name is turned into diffusers' (the one the model floor binds). The version comes
from the tensors: the sinusoid's length (`pe`, 24 positions: v1; 32: v2 with a mid-block
module, v3 without), none (AnimateLCM, whose files carry no `pe`: 32 positions, as it was
trained). Anything else -- a LoRA, a checkpoint, a motion LoRA, an SDXL module -- is one line
naming what was found.
"""

from __future__ import annotations

import dataclasses
import os
import re

from sdanim.formats.tensors import CheckpointError, diffusers_weights, read_tensors

# SD 1.x's UNet: two motion modules per down level (after each resnet/attention pair),
# three per up level, and v2's one in the mid block.
DOWN_MODULES, UP_MODULES, LEVELS = 2, 3, 4
_MODULE = re.compile(r"^((?:down_blocks|up_blocks)\.\d+|mid_block)\.motion_modules\.(\d+)\.(.*)$")
_ORIGINAL_RENAMES = ((re.compile(r"^temporal_transformer\."), ""),
                     (re.compile(r"attention_blocks\.(\d)\."), lambda m: f"attn{int(m.group(1)) + 1}."),
                     (re.compile(r"\.norms\.(\d)\."), lambda m: f".norm{int(m.group(1)) + 1}."),
                     (re.compile(r"\.ff_norm\."), ".norm3."))
# The names of one module's tensors in diffusers' layout (positions separately).
MODULE_TENSORS = tuple(
    [f"{n}.{p}" for n in ("norm", "proj_in", "proj_out") for p in ("weight", "bias")]
    + [f"transformer_blocks.0.attn{k}.{n}.weight" for k in (1, 2) for n in ("to_q", "to_k", "to_v")]
    + [f"transformer_blocks.0.attn{k}.to_out.0.{p}" for k in (1, 2) for p in ("weight", "bias")]
    + [f"transformer_blocks.0.norm{k}.{p}" for k in (1, 2, 3) for p in ("weight", "bias")]
    + [f"transformer_blocks.0.ff.net.{n}.{p}" for n in ("0.proj", "2") for p in ("weight", "bias")])


def module_names(mid: bool) -> list:
    """The motion modules' prefixes in the order the UNet runs them: down levels, the mid
    block (v2), up levels."""
    down = [f"down_blocks.{i}.motion_modules.{j}" for i in range(LEVELS) for j in range(DOWN_MODULES)]
    up = [f"up_blocks.{i}.motion_modules.{j}" for i in range(LEVELS) for j in range(UP_MODULES)]
    return down + (["mid_block.motion_modules.0"] if mid else []) + up


@dataclasses.dataclass
class MotionFile:
    """An opened motion module file: its tensors by diffusers' names (positions, where the
    file has them, under `<module>.pe.K`), its layout, version and shape."""

    path: str
    layout: str  # "original" or "diffusers"
    version: str  # "v1", "v2", "v3", "animatelcm"
    positions: int  # the longest window its sinusoid covers (frames)
    mid: bool  # a module in the mid block
    tensors: dict

    def describe(self) -> str:
        return (f"AnimateDiff motion module {self.version} ({self.layout} layout, {self.positions} positions, "
                f"{'with' if self.mid else 'no'} mid-block module)")


def _error(message: str, path: str) -> CheckpointError:
    return CheckpointError(f"{message}. Received: motion_module={path!r}")


def _diffusers_name(rest: str, layout: str) -> str:
    if layout == "original":
        for pattern, replacement in _ORIGINAL_RENAMES:
            rest = pattern.sub(replacement, rest)
    return rest


def _what_else(keys: set) -> str:
    if any(".lora" in k or "lora_" in k for k in keys):
        return "a LoRA"
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in keys):
        return "a full checkpoint"
    if any("temporal" in k and "motion_modules" not in k for k in keys):
        return "temporal layers of another model"
    return f"{len(keys)} tensors such as {sorted(keys)[0]!r}" if keys else "no tensors"


def inspect_motion_module(path: str) -> MotionFile:
    """Opens a motion module file or MotionAdapter folder and recognises it (see the module
    docstring); raises `CheckpointError` with one line for anything else."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise _error("the motion module does not exist", path)
    if os.path.isdir(path):
        weights = diffusers_weights(path)
        if weights is None:
            raise _error("the folder is not a diffusers MotionAdapter (no diffusion_pytorch_model.safetensors)", path)
        tensors = read_tensors(weights, name="motion_module")
    else:
        tensors = read_tensors(path, name="motion_module")
    modules: dict = {}
    layout = None
    for key, tensor in tensors.items():
        match = _MODULE.match(key)
        if match is None:
            raise _error(f"not an AnimateDiff motion module ({_what_else(set(tensors))})", path)
        block, index, rest = match.groups()
        this = "original" if rest.startswith("temporal_transformer.") else "diffusers"
        if layout not in (None, this):
            raise _error("the file mixes the original and diffusers layouts", path)
        layout = this
        modules.setdefault(f"{block}.motion_modules.{index}", {})[_diffusers_name(rest, this)] = tensor
    if not modules:
        raise _error("the file holds no tensors", path)
    mid = "mid_block.motion_modules.0" in modules
    expected = module_names(mid)
    missing = [m for m in expected if m not in modules]
    extra = sorted(m for m in modules if m not in expected)
    if missing or extra:
        raise _error(f"the motion modules do not fit SD 1.x's UNet: "
                     f"{f'{len(missing)} modules missing ({missing[0]})' if missing else ''}"
                     f"{'; ' if missing and extra else ''}{f'unexpected {extra[0]}' if extra else ''}", path)
    out, lengths = {}, set()
    for name in expected:
        found = modules[name]
        positions = [k for k in found if k.endswith(".pe")]
        for k in positions:
            lengths.add(int(found[k].shape[1]))
        lacking = [k for k in MODULE_TENSORS if k not in found]
        left = sorted(k for k in found if k not in MODULE_TENSORS and k not in positions)
        if lacking or left:
            raise _error(f"{name} is not a temporal transformer ("
                         f"{f'lacks {lacking[0]}' if lacking else f'has {left[0]}'}); motion LoRAs and "
                         "SDXL modules are not supported", path)
        for k in MODULE_TENSORS:
            out[f"{name}.{k}"] = found[k]
        for k in sorted(positions):
            out[f"{name}.pe.{len([p for p in out if p.startswith(name + '.pe.')])}"] = found[k]
    if len(lengths) > 1:
        raise _error(f"the position encodings disagree in length ({sorted(lengths)})", path)
    if not lengths:
        version, positions = "animatelcm", 32
    else:
        positions = lengths.pop()
        version = "v1" if positions == 24 else ("v2" if mid else "v3")
    return MotionFile(path=path, layout=layout, version=version, positions=positions, mid=mid, tensors=out)


__all__ = ["MotionFile", "MODULE_TENSORS", "inspect_motion_module", "module_names"]
