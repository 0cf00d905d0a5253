"""Reading Stable Diffusion 1.x/2.x checkpoints without torch, and without running them.

Three sources give one view: a mapping from tensor names to lazily read NumPy arrays.

    *.safetensors           the safetensors package's NumPy API (bfloat16 read from the
                            file's header offsets, which the NumPy API cannot return)
    *.ckpt, *.pt, *.bin     PyTorch's zip format, read by a restricted unpickler that only
                            rebuilds tensors; any other global the pickle names is refused
                            before anything is built (a checkpoint never runs code)
    a diffusers folder      unet/, vae/, text_encoder/ (safetensors or .bin), seen under
                            the names "unet.*", "vae.*", "text_encoder.*"

`inspect_checkpoint` recognises the layout and the architecture (SD 1.x: CLIP ViT-L
context 768; SD 2.x: OpenCLIP ViT-H context 1024, linear transformer projections) and
refuses by name what KerasCV's classes cannot hold: inpainting (9-channel) and
instruct-pix2pix (8-channel) UNets, SDXL, unCLIP, v-prediction models.

The name mapping onto KerasCV's layers is in `sdanim.weight_map`; `sdanim.models` builds
the Keras models and calls `load_part`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import struct
import zipfile
import zlib
from typing import Callable, Iterable, Optional

import numpy as np

from sdanim.errors import SdanimError

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bfloat16",
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
# PyTorch storage classes (as pickled by torch.save) -> NumPy dtype.
_TORCH_STORAGES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": "bfloat16",
    "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


def _bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: widen the bits, no rounding involved."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


class CheckpointError(SdanimError):
    """A checkpoint that cannot be read, or whose tensors do not fit the architecture."""


@dataclasses.dataclass
class LazyTensor:
    """A tensor's shape, read now; its values, read by `load()` (float32 for floats)."""

    shape: tuple
    _read: Callable[[], np.ndarray]

    def load(self) -> np.ndarray:
        array = self._read()
        if array.dtype.kind == "f" and array.dtype != np.float32:
            array = array.astype(np.float32)
        return array


# ----------------------------------------------------------------------------------------
# safetensors


def _read_safetensors(path: str) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(header_len))
        size = os.path.getsize(path)
        data_start = 8 + header_len
        handle = safe_open(path, framework="np")
    except (OSError, ValueError, struct.error, SafetensorError, UnicodeDecodeError) as error:
        raise CheckpointError(
            f"not a readable .safetensors file ({type(error).__name__}: {error}). "
            f"Received: checkpoint={path!r}"
        ) from None
    tensors = {}
    # safe_open has validated the header's structure.
    entries = [(name, info["dtype"], tuple(info["data_offsets"]), tuple(info["shape"]))
               for name, info in header.items() if name != "__metadata__"]
    for name, dtype_name, (start, end), shape in entries:
        dtype = _SAFETENSORS_DTYPES.get(dtype_name)
        if dtype is None or data_start + end > size:
            raise CheckpointError(
                f"tensor {name!r} is {'cut off' if dtype else 'of an unknown dtype'} in the "
                f"file (truncated or not a checkpoint). Received: checkpoint={path!r}"
            )
        if dtype == "bfloat16":
            def read(start=start, end=end, shape=shape):
                raw = np.fromfile(path, dtype="<u2", count=(end - start) // 2, offset=data_start + start)
                return _bfloat16_to_float32(raw).reshape(shape)
        else:
            def read(name=name):
                return handle.get_tensor(name)
        tensors[name] = LazyTensor(shape, read)
    return tensors


# ----------------------------------------------------------------------------------------
# PyTorch zip checkpoints through a restricted unpickler


class _Inert:
    """Stands in for harmless training-time objects (Lightning callbacks, NumPy scalars)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _StateDict(dict):
    """collections.OrderedDict as torch pickles it (state dicts carry a `_metadata` attribute)."""


@dataclasses.dataclass
class _Storage:
    archive: zipfile.ZipFile
    entry: str
    dtype: object
    path: str


def _is_index_tuple(values) -> bool:
    return isinstance(values, tuple) and all(isinstance(v, int) and v >= 0 for v in values)


def _rebuild_tensor(storage, offset, size, stride, *unused):
    """torch._utils._rebuild_tensor_v2 without torch: a strided view of the storage bytes.

    Offsets, sizes and strides are checked against the storage before the view is made,
    so a crafted pickle cannot make it read outside the storage's bytes.
    """
    size, stride = tuple(size), tuple(stride)
    if not (isinstance(storage, _Storage) and isinstance(offset, int) and offset >= 0
            and _is_index_tuple(size) and _is_index_tuple(stride) and len(size) == len(stride)):
        raise CheckpointError("the checkpoint's pickle rebuilds a tensor from something that is not a storage")

    def read():
        raw_dtype = np.dtype("<u2") if storage.dtype == "bfloat16" else np.dtype(storage.dtype).newbyteorder("<")
        try:
            raw = storage.archive.read(storage.entry)
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
            raise CheckpointError(
                f"storage {storage.entry!r} cannot be read ({type(error).__name__}: {error}); the file is "
                f"damaged. Received: checkpoint={storage.path!r}"
            ) from None
        flat = np.frombuffer(raw, dtype=raw_dtype, count=len(raw) // raw_dtype.itemsize)
        if storage.dtype == "bfloat16":
            flat = _bfloat16_to_float32(flat)
        needed = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else 0
        if needed > flat.size:
            raise CheckpointError(
                f"a tensor reaches past its storage {storage.entry!r} (truncated or damaged). "
                f"Received: checkpoint={storage.path!r}"
            )
        view = np.lib.stride_tricks.as_strided(
            flat[offset:], shape=size, strides=[s * flat.itemsize for s in stride]
        )
        return np.array(view)  # own the memory (and make it writable)

    return LazyTensor(size, read)


def _rebuild_parameter(data, *unused):
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds tensors and plain containers; refuses every other global by name."""

    _ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("collections", "OrderedDict"): _StateDict,
        # What Lightning checkpoints carry besides weights: built as inert placeholders.
        ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"): _Inert,
        ("pytorch_lightning.callbacks", "ModelCheckpoint"): _Inert,
        ("numpy.core.multiarray", "scalar"): _Inert,
        ("numpy._core.multiarray", "scalar"): _Inert,
        ("numpy", "dtype"): _Inert,
        ("_codecs", "encode"): _Inert,
    }

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(file)
        self._archive, self._prefix, self._path = archive, prefix, path

    def find_class(self, module, name):
        if module == "torch" and name in _TORCH_STORAGES:
            return ("storage", _TORCH_STORAGES[name])
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"refused to load: the checkpoint's pickle asks for {module}.{name}, and sdanim "
                "only rebuilds tensors (a pickle can run code). Use a .safetensors file. "
                f"Received: checkpoint={self._path!r}"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise CheckpointError(f"unknown persistent id in the checkpoint's pickle. Received: checkpoint={self._path!r}")
        kind, key = pid[1], str(pid[2])
        if not (isinstance(kind, tuple) and kind[0] == "storage"):
            raise CheckpointError(f"unknown storage type in the checkpoint's pickle. Received: checkpoint={self._path!r}")
        entry = f"{self._prefix}data/{key}"
        try:
            self._archive.getinfo(entry)
        except KeyError:
            raise CheckpointError(
                f"storage {key!r} is missing from the checkpoint (truncated?). Received: checkpoint={self._path!r}"
            ) from None
        return _Storage(self._archive, entry, kind[1], self._path)


def _flatten(tree, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, LazyTensor):
            out[name] = value
        elif isinstance(value, dict):
            out.update(_flatten(value, name + "."))
    return out


def _read_torch(path: str) -> dict:
    try:
        archive = zipfile.ZipFile(path)
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
    except (OSError, zipfile.BadZipFile) as error:
        try:
            with open(path, "rb") as f:
                legacy = f.read(1) == b"\x80"
        except OSError:
            legacy = False
        raise CheckpointError(
            (
                "this is PyTorch's legacy (pre-1.6) pickle format, which sdanim does not read "
                "(a pickle can run code); re-save it as .safetensors"
                if legacy
                else f"not a readable PyTorch checkpoint ({type(error).__name__}: {error}); "
                "it may be truncated"
            )
            + f". Received: checkpoint={path!r}"
        ) from None
    if len(pickles) != 1:
        raise CheckpointError(f"not a PyTorch checkpoint (no data.pkl inside). Received: checkpoint={path!r}")
    prefix = pickles[0][: -len("data.pkl")]
    try:
        with archive.open(pickles[0]) as f:
            tree = _RestrictedUnpickler(f, archive, prefix, path).load()
    except CheckpointError:
        raise
    except Exception as error:  # malformed pickle data: report, never fall back
        raise CheckpointError(
            f"the checkpoint's pickle could not be read ({type(error).__name__}: {error}). "
            f"Received: checkpoint={path!r}"
        ) from None
    if isinstance(tree, dict) and isinstance(tree.get("state_dict"), dict):
        tree = tree["state_dict"]
    if not isinstance(tree, dict):
        raise CheckpointError(f"the checkpoint holds no state dict. Received: checkpoint={path!r}")
    return _flatten(tree)


def read_tensors(path: str) -> dict:
    """{name: LazyTensor} of one checkpoint file (.safetensors, or PyTorch zip format)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"the checkpoint file does not exist. Received: checkpoint={path!r}")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    return _read_torch(path)


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


def _sidecar_parameterization(path: str) -> Optional[str]:
    """`parameterization` from a config .yaml beside a single-file checkpoint (A1111's convention)."""
    stem = os.path.splitext(path)[0]
    for yaml_path in (stem + ".yaml", stem + ".yml"):
        if os.path.isfile(yaml_path):
            import yaml

            try:
                with open(yaml_path, encoding="utf-8") as f:
                    config = yaml.safe_load(f)
                return str(config["model"]["params"].get("parameterization", "eps"))
            except Exception:
                return None
    return None


def inspect_checkpoint(path: str) -> Checkpoint:
    """Opens `path` (a checkpoint file or a diffusers folder) and recognises its architecture.

    Raises `CheckpointError` for unreadable files and for architectures KerasCV cannot
    hold (named in the message).
    """
    path = os.fspath(path)
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


def looks_like_v_prediction(diffusion_model) -> bool:
    """AUTOMATIC1111's test for SD 2.x files that do not say what they predict.

    On a flat 0.5 latent at t=999 with a flat 0.5 context, a v-prediction UNet (the 768-v
    models) returns values far below the input (mean of output - input < -1); a noise
    predictor does not. It needs trained weights to mean anything.
    """
    from keras import ops

    from sdanim.sampling import timestep_embedding

    shape = tuple(diffusion_model.inputs[0].shape[1:])
    context_shape = tuple(diffusion_model.inputs[2].shape[1:])
    latent = np.full((1,) + shape, 0.5, np.float32)
    context = np.full((1,) + context_shape, 0.5, np.float32)
    out = diffusion_model([latent, timestep_embedding(999)[None].astype(np.float32), context])
    return float(np.mean(ops.convert_to_numpy(out).astype(np.float32) - latent)) < -1.0


def refuse_v_prediction(checkpoint: Checkpoint, how: str) -> None:
    raise CheckpointError(
        f"this model predicts v ({how}; SD 2.x 768-v style), and sdanim's samplers expect noise "
        "predictions; use the 512 (epsilon) variant, or if this is wrong put a .yaml beside the "
        "file with model.params.parameterization: eps. Received: "
        f"checkpoint={checkpoint.path!r}"
    )
