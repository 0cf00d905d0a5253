"""Stable Diffusion 1.x/2.x checkpoints: recognising the layout and the architecture.

Three sources give one view (tensors read by `sdanim.formats.tensors`):

    a single file           .safetensors/.ckpt in the original (CompVis) layout
    a diffusers folder      unet/, vae/, text_encoder/ (safetensors or .bin), seen under
                            the names "unet.*", "vae.*", "text_encoder.*"

`inspect_checkpoint` recognises the layout and the architecture (SD 1.x: CLIP ViT-L
context 768; SD 2.x: OpenCLIP ViT-H context 1024, linear transformer projections) and
refuses by name what KerasCV's classes cannot hold: inpainting (9-channel) and
instruct-pix2pix (8-channel) UNets, SDXL, unCLIP, v-prediction models.

The name mapping onto KerasCV's layers is in `sdanim.formats.weight_map`; the model
layer binds the tensors (`sdanim.model.convert`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Iterable, Optional

from sdanim.formats.tensors import CheckpointError, read_tensors

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


# ----------------------------------------------------------------------------------------
# diffusers folders

def is_diffusers_folder(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "model_index.json"))
        or os.path.isdir(os.path.join(path, "unet"))
    )


def _part_file(folder: str, part: str) -> Optional[str]:
    stems = ("model", "pytorch_model") if part == "text_encoder" else ("diffusion_pytorch_model",)
    for stem in stems:
        for variant in ("", ".fp16"):
            for suffix in (".safetensors", ".bin"):
                path = os.path.join(folder, part, stem + variant + suffix)
                if os.path.isfile(path):
                    return path
    return None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def _read_diffusers(folder: str) -> tuple[dict, dict]:
    tensors, missing = {}, []
    for part in ("text_encoder", "unet", "vae"):
        path = _part_file(folder, part)
        if path is None:
            missing.append(f"{part}/")
            continue
        for name, tensor in read_tensors(path).items():
            tensors[f"{part}.{name}"] = tensor
    if missing:
        raise CheckpointError(
            f"the diffusers folder lacks {', '.join(missing)} (each needs a .safetensors or "
            f".bin weight file). Received: checkpoint={folder!r}"
        )
    config = {
        "unet": _read_json(os.path.join(folder, "unet", "config.json")),
        "scheduler": _read_json(os.path.join(folder, "scheduler", "scheduler_config.json")),
    }
    return tensors, config


# ----------------------------------------------------------------------------------------
# recognising the architecture


@dataclasses.dataclass
class Checkpoint:
    """An opened checkpoint: its tensors, layout and the KerasCV architecture it fits.

    Attributes:
        path: str. The file or folder.
        layout: str. "original" (CompVis names) or "diffusers".
        version: str. The KerasCV architecture: "1.4" (SD 1.x) or "2.1" (SD 2.x).
        tensors: dict. {name: LazyTensor}.
    """

    path: str
    layout: str
    version: str
    tensors: dict
    prediction_known: bool = True  # False: an SD 2.x single file without a config beside it

    def keys(self) -> Iterable[str]:
        return self.tensors.keys()


def _refuse(what: str, path: str) -> None:
    raise CheckpointError(
        f"this checkpoint is {what}, which KerasCV's Stable Diffusion classes cannot hold; "
        f"sdanim loads SD 1.x and 2.x text-to-image models. Received: checkpoint={path!r}"
    )


def _refuse_sd3(path: str) -> None:
    raise CheckpointError(
        "this checkpoint is a Stable Diffusion 3 model (an MMDiT transformer, not a UNet): pass --model "
        "sd3-medium with it (or the SD3 version it is: sd3.5-medium, sd3.5-large, sd3.5-large-turbo). Received: "
        f"checkpoint={path!r}"
    )


def sidecar_yaml(path: str, unreadable: Callable[[str, str], Exception]):
    """The config .yaml (or .yml) beside a weights file: (its path, its parsed content), or
    None without one. One that cannot be read raises `unreadable(yaml_path, reason)`: it
    was put there to say something about the weights, and is never silently ignored."""
    import yaml

    stem = os.path.splitext(path)[0]
    for yaml_path in (stem + ".yaml", stem + ".yml"):
        if not os.path.isfile(yaml_path):
            continue
        try:
            with open(yaml_path, encoding="utf-8") as f:
                return yaml_path, yaml.safe_load(f)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise unreadable(yaml_path, " ".join(str(error).split())[:120] or type(error).__name__) from None
    return None


def _sidecar_parameterization(path: str) -> Optional[str]:
    """`parameterization` from a config .yaml beside a single-file checkpoint (A1111's
    convention; "eps" where the config names none), or None without one. A .yaml there
    that cannot be read, or is not such a config, is one line naming it: ignoring it could
    sample a v-model as eps."""
    found = sidecar_yaml(path, lambda yaml_path, reason: CheckpointError(
        f"the config beside the checkpoint cannot be read ({reason}); fix or remove {yaml_path}. "
        f"Received: checkpoint={path!r}"))
    if found is None:
        return None
    yaml_path, config = found
    params = config.get("model", {}).get("params") if isinstance(config, dict) and isinstance(
        config.get("model"), dict) else None
    if not isinstance(params, dict):
        raise CheckpointError(f"the .yaml beside the checkpoint is not a Stable Diffusion config (no "
                              f"model.params); fix or remove {yaml_path}. Received: checkpoint={path!r}")
    return str(params.get("parameterization", "eps"))


def inspect_checkpoint(path: str) -> Checkpoint:
    """Opens `path` (a checkpoint file or a diffusers folder) and recognises its architecture.

    Raises `CheckpointError` for unreadable files and for architectures KerasCV cannot
    hold (named in the message).
    """
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "transformer", "config.json")):
        _refuse_sd3(path)
    if os.path.isdir(path):
        if not is_diffusers_folder(path):
            raise CheckpointError(
                "the folder is neither a diffusers model (unet/, vae/, text_encoder/) nor KerasCV "
                f".h5 weights. Received: checkpoint={path!r}"
            )
        tensors, config = _read_diffusers(path)
        layout, declared = "diffusers", None
        prediction = config["scheduler"].get("prediction_type", "epsilon")
        if config["unet"].get("addition_embed_type") or "unet.add_embedding.linear_1.weight" in tensors:
            _refuse("SDXL (or another UNet with added embeddings)", path)
        conv_in, attn_k = "unet.conv_in.weight", "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
        proj_in = "unet.down_blocks.0.attentions.0.proj_in.weight"
    else:
        tensors = read_tensors(path)
        if any(k.startswith("model.diffusion_model.joint_blocks.") for k in tensors):
            _refuse_sd3(path)
        if any(k.startswith("conditioner.embedders.") for k in tensors):
            _refuse("SDXL", path)
        if not any(k.startswith("model.diffusion_model.") for k in tensors):
            raise CheckpointError(
                "no Stable Diffusion UNet in this file (no model.diffusion_model.* tensors); "
                "sdanim reads full SD 1.x/2.x checkpoints. Received: "
                f"checkpoint={path!r}"
            )
        layout = "original"
        declared = _sidecar_parameterization(path)
        prediction = "v_prediction" if declared == "v" else "epsilon"
        if "model.diffusion_model.label_emb.0.0.weight" in tensors:
            _refuse("SDXL or unCLIP (its UNet takes a class embedding)", path)
        conv_in = "model.diffusion_model.input_blocks.0.0.weight"
        attn_k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        proj_in = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    if conv_in not in tensors or attn_k not in tensors or proj_in not in tensors:
        raise CheckpointError(
            f"the UNet lacks {conv_in if conv_in not in tensors else attn_k if attn_k not in tensors else proj_in}; "
            f"not an SD 1.x/2.x checkpoint. Received: checkpoint={path!r}"
        )
    in_channels = tensors[conv_in].shape[1]
    if in_channels == 9:
        _refuse("an inpainting model (9-channel UNet input)", path)
    if in_channels == 8:
        _refuse("an instruct-pix2pix model (8-channel UNet input)", path)
    if in_channels != 4:
        _refuse(f"a UNet with {in_channels} input channels", path)
    context = tensors[attn_k].shape[1]
    linear_proj = len(tensors[proj_in].shape) == 2
    if context == 768 and not linear_proj:
        version = "1.4"
    elif context == 1024 and linear_proj:
        version = "2.1"
    else:
        _refuse(f"a UNet with context width {context} and {'linear' if linear_proj else 'convolutional'} projections", path)
    known = layout == "diffusers" or version == "1.4" or declared is not None
    checkpoint = Checkpoint(path=path, layout=layout, version=version, tensors=tensors, prediction_known=known)
    if prediction == "v_prediction":
        refuse_v_prediction(checkpoint, "declared by its " + ("scheduler config" if layout == "diffusers" else ".yaml"))
    return checkpoint


def refuse_v_prediction(checkpoint: Checkpoint, how: str) -> None:
    raise CheckpointError(
        f"this model predicts v ({how}; SD 2.x 768-v style), and sdanim's samplers expect noise "
        "predictions; use the 512 (epsilon) variant, or if this is wrong put a .yaml beside the "
        "file with model.params.parameterization: eps. Received: "
        f"checkpoint={checkpoint.path!r}"
    )
