"""ControlNet weight files: recognising the layout, the SD version and pooling, read
without executing code (`sdanim.formats.tensors`).

    a diffusers folder      config.json + diffusion_pytorch_model.safetensors (or .bin);
                            a diffusers-named .safetensors file alone
    lllyasviel's files      ControlNet-v1-1 .pth/.safetensors: `control_model.*`
                            (`input_hint_block`, `zero_convs.N.0`, `middle_block_out`)
    bare original keys      the same names without `control_model.` (the SD 2.1 nets)

The SD version comes from the tensors (convolutional attention projections: SD 1.x;
linear: SD 2.x); their context width (768, 1024) must be the model's. Pooling (the shuffle model's
`global_pool_conditions`) comes from diffusers' config.json or the .yaml beside an
original file (`global_average_pooling`), else from lllyasviel's release name
(`control_v11e_sd15_shuffle`). Anything else -- a LoRA, a full checkpoint, an SDXL or
SD3 ControlNet, a picture -- is one line naming what was found.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

from sdanim.formats.checkpoints import Checkpoint, sidecar_yaml
from sdanim.formats.tensors import CheckpointError, diffusers_weights, read_tensors
from sdanim.formats.weight_map import spec

_ORIGINAL_PREFIX = "control_model."
_DIFFUSERS_PROBE = "controlnet_cond_embedding.conv_in.weight"
_ORIGINAL_PROBE = "input_hint_block.0.weight"


@dataclasses.dataclass
class ControlNetFile(Checkpoint):
    """An opened ControlNet: its tensors (names without `control_model.`), layout
    ("diffusers" or "original"), the SD version it fits, the width of the text context
    it takes, and whether its residuals are pooled over the image
    (global_pool_conditions: the shuffle model)."""

    pooled: bool = False
    context_dim: int = 0
    describes = ("the ControlNet", "controlnet")  # how weight_map's errors name it


def _error(message: str, path: str) -> CheckpointError:
    return CheckpointError(f"{message}. Received: controlnet={path!r}")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as error:
        raise _error(f"the ControlNet's config.json cannot be read ({error})", path) from None
    return value if isinstance(value, dict) else {}


def _sidecar_pooling(path: str) -> Optional[bool]:
    """`global_average_pooling` from the .yaml beside an original file (lllyasviel's
    release ships one per net), or None without one."""
    def not_a_config(yaml_path: str, reason: str) -> CheckpointError:
        return _error(f"the .yaml beside the ControlNet is not a ControlNet config ({reason}); fix or remove "
                      f"{yaml_path}", path)

    found = sidecar_yaml(path, not_a_config)
    if found is None:
        return None
    yaml_path, config = found
    try:
        params = config["model"]["params"]["control_stage_config"]["params"]
        return bool(params.get("global_average_pooling", False))
    except (KeyError, TypeError, AttributeError):
        raise not_a_config(yaml_path, "no model.params.control_stage_config.params") from None


def _what_else(keys: set) -> str:
    """A word on what a file holds instead, for the refusal."""
    if any(k.startswith(("lora_unet_", "lora_te_")) or ".lora_" in k or "lora_A" in k for k in keys):
        return "a LoRA"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "a Stable Diffusion checkpoint"
    if any(k.startswith(("controlnet_x_embedder", "transformer_blocks.")) for k in keys):
        return "an SD3/FLUX ControlNet (a transformer)"
    if any("add_embedding" in k for k in keys):
        return "an SDXL ControlNet"
    return f"{len(keys)} tensors of another kind (e.g. {sorted(keys)[0]})" if keys else "no tensors"


def inspect_controlnet(path: str) -> ControlNetFile:
    """Opens a ControlNet file or folder and recognises it (see the module docstring);
    raises `CheckpointError` with one line for anything else."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise _error("the ControlNet weights do not exist", path)
    config: dict = {}
    if os.path.isdir(path):
        weights = diffusers_weights(path)
        if weights is None:
            raise _error("the folder is not a diffusers ControlNet (no diffusion_pytorch_model.safetensors or .bin)",
                         path)
        if os.path.isfile(os.path.join(path, "config.json")):
            config = _read_json(os.path.join(path, "config.json"))
        tensors = read_tensors(weights, name="controlnet")
    else:
        tensors = read_tensors(path, name="controlnet")
    keys = set(tensors)
    if any(k.startswith(_ORIGINAL_PREFIX) for k in keys):
        tensors = {k[len(_ORIGINAL_PREFIX):]: v for k, v in tensors.items() if k.startswith(_ORIGINAL_PREFIX)}
    if _DIFFUSERS_PROBE in tensors:
        layout = "diffusers"
        k_name, proj_name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight", \
            "down_blocks.0.attentions.0.proj_in.weight"
    elif _ORIGINAL_PROBE in tensors:
        layout = "original"
        k_name, proj_name = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "input_blocks.1.1.proj_in.weight"
    else:
        raise _error(f"not a ControlNet for SD 1.x/2.x (no controlnet_cond_embedding / input_hint_block tensors: "
                     f"{_what_else(keys)})", path)
    if "add_embedding.linear_1.weight" in tensors or "label_emb.0.0.weight" in tensors:
        raise _error("an SDXL ControlNet; sdanim's ControlNets are for SD 1.x and 2.x", path)
    if k_name not in tensors or proj_name not in tensors:
        raise _error(f"the ControlNet lacks {k_name if k_name not in tensors else proj_name}", path)
    # SD 1.x projects into attention with 1x1 convolutions, SD 2.x with linear layers;
    # the context width (768 / 1024) is checked against the model's UNet at load.
    version = "2.1" if len(tensors[proj_name].shape) == 2 else "1.4"
    if config:
        pooled = bool(config.get("global_pool_conditions", False))
    else:
        sidecar = _sidecar_pooling(path) if os.path.isfile(path) else None
        pooled = sidecar if sidecar is not None else "e_sd15_shuffle" in os.path.basename(path).lower()
    controlnet = ControlNetFile(path=path, layout=layout, version=version, tensors=tensors, pooled=pooled,
                                context_dim=int(tensors[k_name].shape[1]))
    check_controlnet_keys(controlnet)
    return controlnet


def check_controlnet_keys(controlnet: ControlNetFile) -> None:
    """Every tensor of the ControlNet present, and none left over."""
    used, missing = set(), []
    for leaf in spec("controlnet", controlnet.version):
        source = leaf[controlnet.layout]
        keys = source.keys(source.bases[0])
        missing += [k for k in keys if k not in controlnet.tensors]
        used.update(keys)
    extra = sorted(k for k in controlnet.tensors if k not in used)
    problems = [f"{len(items)} {label} ({', '.join(items[:5])}{' and more' if len(items) > 5 else ''})"
                for items, label in ((missing, "missing tensors"), (extra, "unexpected tensors")) if items]
    if problems:
        raise _error(f"the ControlNet does not fit Stable Diffusion {controlnet.version[0]}.x: {'; '.join(problems)}",
                     controlnet.path)


__all__ = ["ControlNetFile", "inspect_controlnet", "check_controlnet_keys"]
