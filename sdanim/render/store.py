"""Frames on disk: atomic writes, the frame store, the run folder and its manifest.

A run folder holds frame_00000.png, frame_00001.png, ... and manifest.json (prompts,
seeds, settings, model, versions). Every file is written to a temporary name and
renamed, so an interrupted run never leaves a half-written file that looks complete.
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Iterable, Optional

import numpy as np

from sdanim.config.errors import SdanimError

MANIFEST = "manifest.json"
# A motion render's sampling state (render/motion.py): the run's own file, in its frames folder.
STATE_FILE = "motion_state.npz"
_PNG_START = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every complete PNG ends with
def _new_file(folder: str, stem: str, ext: str) -> str:
    """Creates an empty temporary file beside its final name, with the mode a new file
    gets (0666 less the process's umask *now*, applied by the OS: nothing reads or sets
    the umask here, which another thread could be changing). mkstemp would make it 0600."""
    for _ in range(100):
        tmp = os.path.join(folder, f".{stem}.{secrets.token_hex(4)}.partial{ext}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {os.path.join(folder, stem + ext)}")


def atomic_write(path: str, write) -> None:
    """Calls write(tmp_path) for a temporary file beside `path`, then renames it."""
    folder = os.path.dirname(os.path.abspath(path))
    stem, ext = os.path.splitext(os.path.basename(path))
    tmp = _new_file(folder, stem, ext)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def ensure_folder(path: str, name: str = "out") -> str:
    """Creates `path` (and parents) or raises a one-line error naming it."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise SdanimError(
            f"cannot create the output folder ({error.strerror}). Received: {name}={path!r}"
        ) from None
    if not os.access(path, os.W_OK):
        raise SdanimError(f"the output folder is not writable. Received: {name}={path!r}")
    return path


def write_png(path: str, image: np.ndarray, text: Optional[dict] = None) -> None:
    """Writes an (H, W, 3) uint8 image as PNG, atomically, with optional text chunks."""
    from PIL import Image, PngImagePlugin

    info = None
    if text:
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(str(key), value if isinstance(value, str) else json.dumps(value))
    atomic_write(path, lambda tmp: Image.fromarray(np.asarray(image)).save(tmp, format="PNG", pnginfo=info))


def read_png(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


class PngSequence:
    """Frames on disk as a sequence, each read when it is asked for (a long video is
    written without holding every frame in memory)."""

    def __init__(self, paths):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return PngSequence(self.paths[index])
        return read_png(self.paths[index])

    def __iter__(self):
        return (read_png(path) for path in self.paths)


class FrameStore:
    """The PNG frames of one run, in one folder."""

    def __init__(self, folder: str):
        self.folder = folder

    def path(self, index: int) -> str:
        return os.path.join(self.folder, f"frame_{index:05d}.png")

    def has(self, index: int) -> bool:
        """Whether frame `index` is on disk as a complete PNG (a file cut short, say by
        a full disk or a partial copy, counts as missing and is rendered again)."""
        return self.complete(self.path(index))

    @staticmethod
    def complete(path: str) -> bool:
        """Whether `path` holds a whole PNG (its signature first and its IEND chunk last)."""
        try:
            with open(path, "rb") as f:
                start = f.read(8)
                f.seek(0, os.SEEK_END)
                if f.tell() < 8 + len(_PNG_END):
                    return False
                f.seek(-len(_PNG_END), os.SEEK_END)
                return start == _PNG_START and f.read() == _PNG_END
        except OSError:
            return False

    def missing(self, indices: Iterable[int]) -> list[int]:
        return [i for i in indices if not self.has(i)]

    def write(self, index: int, image: np.ndarray, text: Optional[dict] = None) -> None:
        write_png(self.path(index), image, text)

    def read(self, index: int) -> np.ndarray:
        return read_png(self.path(index))

    # Manifest ---------------------------------------------------------------------

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.folder, MANIFEST)

    def read_manifest(self) -> Optional[dict]:
        """The stored manifest, or None. Parsed as JSON data only, never executed."""
        if not os.path.isfile(self.manifest_path):
            return None
        try:
            with open(self.manifest_path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as error:
            raise SdanimError(
                f"the run manifest cannot be read ({error}). Received: {self.manifest_path!r}"
            ) from None
        if not isinstance(data, dict):
            raise SdanimError(f"the run manifest is not a JSON object. Received: {self.manifest_path!r}")
        return data

    def write_manifest(self, manifest: dict) -> None:
        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=2, sort_keys=True)

        atomic_write(self.manifest_path, write)


def _flatten(value, prefix: str = ""):
    if isinstance(value, dict):
        for key in sorted(value):
            yield from _flatten(value[key], f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _flatten(item, f"{prefix}[{i}]")
        if not value:
            yield prefix, []
    else:
        yield prefix, value


def manifest_differences(stored: dict, wanted: dict, keys: Iterable[str]) -> list[str]:
    """What differs between two manifests on `keys`, as "path: old on disk, new now"."""
    diffs = []
    for key in keys:
        old = dict(_flatten(stored.get(key), key))
        new = dict(_flatten(wanted.get(key), key))
        for path in sorted(set(old) | set(new)):
            if old.get(path) != new.get(path):
                diffs.append(f"{path}: {old.get(path)!r} on disk, {new.get(path)!r} now")
    return diffs
