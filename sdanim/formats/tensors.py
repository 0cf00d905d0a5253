"""Weight files read without torch and without running them: a mapping from tensor names
to lazily read NumPy arrays. Every model family's loader (checkpoints, LoRAs, the frame
interpolator, the upscaler, the tiny decoder) reads its files here.

    *.safetensors           the safetensors package's NumPy API (bfloat16 read from the
                            file's header offsets, which the NumPy API cannot return)
    *.ckpt, *.pt, *.pth,    PyTorch's zip format, read by a restricted unpickler that only
    *.bin, *.pkl            rebuilds tensors; any other global the pickle names is refused
                            before anything is built (a file never runs code)

Errors name the parameter the file came in as ("Received: rife='flownet.pkl'").
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import struct
import zipfile
import zlib
from typing import Callable

import numpy as np

from sdanim.config.errors import SdanimError

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
    """A weights file (a checkpoint, a LoRA, a model family's weights) that cannot be read,
    or whose tensors do not fit the architecture."""


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


def _read_safetensors(path: str, where: str) -> dict:
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
            f"Received: {where}"
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
                f"file (truncated or not a checkpoint). Received: {where}"
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
    where: str  # "name='path'" for messages


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
                f"damaged. Received: {storage.where}"
            ) from None
        flat = np.frombuffer(raw, dtype=raw_dtype, count=len(raw) // raw_dtype.itemsize)
        if storage.dtype == "bfloat16":
            flat = _bfloat16_to_float32(flat)
        needed = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else 0
        if needed > flat.size:
            raise CheckpointError(
                f"a tensor reaches past its storage {storage.entry!r} (truncated or damaged). "
                f"Received: {storage.where}"
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

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, where: str):
        super().__init__(file)
        self._archive, self._prefix, self._where = archive, prefix, where

    def find_class(self, module, name):
        if module == "torch" and name in _TORCH_STORAGES:
            return ("storage", _TORCH_STORAGES[name])
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"refused to load: the checkpoint's pickle asks for {module}.{name}, and sdanim "
                "only rebuilds tensors (a pickle can run code). Use a .safetensors file. "
                f"Received: {self._where}"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise CheckpointError(f"unknown persistent id in the checkpoint's pickle. Received: {self._where}")
        kind, key = pid[1], str(pid[2])
        if not (isinstance(kind, tuple) and kind[0] == "storage"):
            raise CheckpointError(f"unknown storage type in the checkpoint's pickle. Received: {self._where}")
        entry = f"{self._prefix}data/{key}"
        try:
            self._archive.getinfo(entry)
        except KeyError:
            raise CheckpointError(
                f"storage {key!r} is missing from the checkpoint (truncated?). Received: {self._where}"
            ) from None
        return _Storage(self._archive, entry, kind[1], self._where)


def _flatten(tree, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, LazyTensor):
            out[name] = value
        elif isinstance(value, dict):
            out.update(_flatten(value, name + "."))
    return out


def _read_torch(path: str, where: str) -> dict:
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
            + f". Received: {where}"
        ) from None
    if len(pickles) != 1:
        raise CheckpointError(f"not a PyTorch checkpoint (no data.pkl inside). Received: {where}")
    prefix = pickles[0][: -len("data.pkl")]
    try:
        with archive.open(pickles[0]) as f:
            tree = _RestrictedUnpickler(f, archive, prefix, where).load()
    except CheckpointError:
        raise
    except Exception as error:  # malformed pickle data: report, never fall back
        raise CheckpointError(
            f"the checkpoint's pickle could not be read ({type(error).__name__}: {error}). "
            f"Received: {where}"
        ) from None
    if isinstance(tree, dict) and isinstance(tree.get("state_dict"), dict):
        tree = tree["state_dict"]
    if not isinstance(tree, dict):
        raise CheckpointError(f"the checkpoint holds no state dict. Received: {where}")
    return _flatten(tree)


DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                     "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")


def diffusers_weights(folder: str):
    """The weights file of a diffusers model folder (safetensors first), or None."""
    return next((os.path.join(folder, n) for n in DIFFUSERS_WEIGHTS if os.path.isfile(os.path.join(folder, n))), None)


def read_tensors(path: str, name: str = "checkpoint") -> dict:
    """{tensor name: LazyTensor} of one weights file (.safetensors, or PyTorch's zip
    format through the restricted unpickler). `name` is the parameter errors name."""
    where = f"{name}={path!r}"
    if not os.path.isfile(path):
        raise CheckpointError(f"the {name} file does not exist. Received: {where}")
    if path.endswith(".safetensors"):
        return _read_safetensors(path, where)
    return _read_torch(path, where)


