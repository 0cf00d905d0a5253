"""LoRA files read without torch and without running code, and grouped by module.

Formats read (.ckpt/.pt/.bin only through the restricted unpickler of
`sdanim.formats.tensors`, so a file never runs code):

- kohya / AUTOMATIC1111: `lora_unet_<module>` and `lora_te_<module>` with `.lora_down.weight`,
  `.lora_up.weight`, `.alpha`; the module is diffusers' name with "." -> "_". LoCon (conv
  layers): 4-D down (rank, in, kh, kw) and up (out, rank, 1, 1).
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` (also `.lora.down` /
  `.lora.up`, `.lora_linear_layer.down/up`, and PEFT's `base_model.model.` prefix), and
  `text_encoder.<module>...`; `.alpha` where the file has it, else alpha = rank (scale 1),
  as diffusers does.

LyCORIS variants sdanim does not read (LoHa `hada_`, LoKr `lokr_`, DoRA `dora_scale`,
Tucker `lora_mid`) are refused by name. Merging into a model: `sdanim.model.lora`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Optional

import numpy as np

from sdanim.config.errors import SdanimError
from sdanim.formats.digest import file_sha256
from sdanim.formats.tensors import CheckpointError, read_tensors

LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_KINDS = (
    # (suffix, role) of the diffusers/PEFT spellings
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".alpha", "alpha"),
)
_UNSUPPORTED = (  # (pattern in a tensor name, what the file is)
    (r"\.hada_", "LoHa (LyCORIS)"), (r"\.lokr_", "LoKr (LyCORIS)"), (r"dora_scale$", "DoRA"),
    (r"\.lora_mid\.", "LoCon with Tucker decomposition (lora_mid)"), (r"^lora_.*\.diff(_b)?$", "full-weight diff (LyCORIS)"),
    (r"\.oft_", "OFT"), (r"\.boft_", "BOFT"), (r"\.ia3_|\.on_input$", "IA3"),
)
_UNET_ROOTS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out", "time_embedding.", "conv_norm_out")


class LoraError(SdanimError):
    """A LoRA file that cannot be read or does not fit the model."""


@dataclasses.dataclass(frozen=True)
class Lora:
    """A LoRA file and its scale, as `load_model(loras=...)` and `--lora` take them.

    Args:
        path: str. A .safetensors file (or .ckpt/.pt/.bin, read without running code).
        scale: float. Multiplies the LoRA's change. Defaults to 1.0.
    """

    path: str
    scale: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "path", str(self.path))
        scale = self.scale
        if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale)):
            raise LoraError(f"a LoRA scale (of {self.path}) must be a finite number. Received: scale={scale!r}")
        object.__setattr__(self, "scale", float(scale))


def parse_lora_arg(text: str) -> Lora:
    """"FILE" or "FILE:SCALE" (the CLI's --lora). A Windows drive letter is not a scale."""
    text = str(text)
    head, sep, tail = text.rpartition(":")
    if sep and head and not os.path.exists(text) and not any(c in tail for c in "/\\"):
        try:
            scale = float(tail)
        except ValueError:
            raise LoraError(f"lora must be FILE or FILE:SCALE with a number for SCALE. Received: lora={text!r}") from None
        return Lora(head, scale)
    return Lora(text)


def as_loras(loras) -> tuple:
    """A tuple of `Lora` from Lora objects, paths, "FILE:SCALE" strings or (path, scale) pairs."""
    if loras is None:
        return ()
    if isinstance(loras, (str, os.PathLike, Lora)):
        loras = [loras]
    out = []
    for item in loras:
        if isinstance(item, Lora):
            out.append(item)
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            out.append(Lora(item[0], item[1]))
        elif isinstance(item, (str, os.PathLike)):
            out.append(parse_lora_arg(os.fspath(item)))
        else:
            raise LoraError(f"loras must be files, 'FILE:SCALE' strings or (file, scale) pairs. Received: {item!r}")
    return tuple(out)



@dataclasses.dataclass
class LoraModule:
    """One adapted layer: delta = (alpha / rank) * up @ down."""

    module: str  # canonical: "unet.<diffusers module>" or "text_encoder.<diffusers module>"
    down: object  # LazyTensor (rank, in[, kh, kw])
    up: object  # LazyTensor (out, rank[, 1, 1])
    alpha: Optional[object]  # LazyTensor () or None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> np.ndarray:
        """The weight change in torch layout, (out, in) or (out, in, kh, kw), float32."""
        down = np.asarray(self.down.load(), dtype=np.float32)
        up = np.asarray(self.up.load(), dtype=np.float32)
        rank = down.shape[0]
        alpha = rank if self.alpha is None else float(np.asarray(self.alpha.load(), dtype=np.float32).reshape(-1)[0])
        if down.ndim == 4:  # LoCon: (rank, in, kh, kw), (out, rank, 1, 1)
            delta = (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(up.shape[0], *down.shape[1:])
        else:
            delta = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
        return delta * np.float32(alpha / rank)


@dataclasses.dataclass
class LoraFile:
    """A read LoRA file: its modules by canonical name, and what could not be read."""

    path: str
    format: str  # "kohya" or "diffusers"
    modules: dict  # canonical module -> LoraModule
    unknown: list  # keys that name no module sdanim knows (counted in the refusal)
    size: int
    sha256: str

    def record(self, scale: float) -> dict:
        return {"file": os.path.basename(self.path), "size": self.size, "sha256": self.sha256, "scale": scale}


def lora_error(message: str, path: str) -> LoraError:
    return LoraError(f"{message}. Received: lora={path!r}")


def _diffusers_module(base: str) -> str:
    """A diffusers/PEFT module path -> the canonical "unet."/"text_encoder." name."""
    for prefix in ("base_model.model.",):
        if base.startswith(prefix):
            base = base[len(prefix):]
    # diffusers' pre-PEFT attention-processor names
    base = re.sub(r"\.processor\.(to_[qkv])_lora$", r".\1", base)
    base = re.sub(r"\.processor\.to_out_lora$", ".to_out.0", base)
    if base.startswith(_UNET_ROOTS):
        base = "unet." + base
    elif base.startswith("text_model."):
        base = "text_encoder." + base
    if base.startswith("text_encoder.") and not base.startswith("text_encoder.text_model."):
        base = "text_encoder.text_model." + base[len("text_encoder."):]
    return base


def read_lora(path: str) -> LoraFile:
    """Reads a LoRA file's tensors (lazily) and groups them by module. Raises `LoraError`
    for a missing, unreadable, truncated or non-LoRA file and for LyCORIS variants."""
    path = str(path)
    if not os.path.isfile(path):
        raise lora_error("the LoRA file does not exist", path)
    if not path.lower().endswith(LORA_SUFFIXES):
        raise lora_error(f"a LoRA file must end in {', '.join(LORA_SUFFIXES)}", path)
    try:
        tensors = read_tensors(path, name="lora")
    except CheckpointError as error:
        raise LoraError(str(error)) from None
    for pattern, what in _UNSUPPORTED:
        hits = [k for k in tensors if re.search(pattern, k)]
        if hits:
            raise lora_error(f"this is a {what} file, which sdanim does not read ({len(hits)} such tensors, "
                         f"e.g. {hits[0]}); only LoRA/LoCon (lora_down/lora_up, lora_A/lora_B) is supported", path)
    parts: dict = {}
    unknown = []
    kohya = sum(k.startswith(("lora_unet_", "lora_te", "lora_te1_", "lora_te2_")) for k in tensors)
    fmt = "kohya" if kohya >= len(tensors) / 2 else "diffusers"
    for key in tensors:
        for suffix, role in _KINDS:
            if key.endswith(suffix):
                base = key[: -len(suffix)]
                # A kohya name ("lora_unet_down_blocks_0_...") stays as it is: the layer table
                # resolves it (SDXL's "lora_te1_", "lora_unet_input_blocks_" resolve to nothing).
                module = base if fmt == "kohya" else _diffusers_module(base)
                parts.setdefault(module, {})[role] = tensors[key]
                break
        else:
            unknown.append(key)
    modules = {}
    for module, roles in parts.items():
        if "down" not in roles or "up" not in roles:
            unknown += [f"{module} ({role} only)" for role in roles]
            continue
        down, up = roles["down"], roles["up"]
        if len(down.shape) not in (2, 4) or len(up.shape) != len(down.shape) or up.shape[1] != down.shape[0]:
            raise lora_error(f"{module}: lora down {tuple(down.shape)} and up {tuple(up.shape)} do not make a "
                         "low-rank pair", path)
        modules[module] = LoraModule(module, down, up, roles.get("alpha"))
    if not modules:
        raise lora_error(f"no LoRA tensors found ({len(tensors)} tensors, none a lora_down/lora_up or lora_A/lora_B "
                     "pair); is this a checkpoint rather than a LoRA?", path)
    return LoraFile(path, fmt, modules, unknown, os.path.getsize(path), file_sha256(path))


def check_lora_files(loras) -> tuple:
    """Reads every LoRA file (cheap: headers only) so a bad one fails before a model build."""
    loras = as_loras(loras)
    for lora in loras:
        read_lora(lora.path)
    return loras


__all__ = ["Lora", "LoraError", "LoraFile", "LoraModule", "read_lora", "parse_lora_arg", "as_loras", "check_lora_files"]
