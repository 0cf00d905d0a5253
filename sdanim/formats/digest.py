"""Digests: what identifies a file's content or a piece of data in manifests, cache
folder names and pinned downloads. Files are read in 1 MiB blocks, never whole (a
video or a checkpoint can be gigabytes).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable

_BLOCK = 1 << 20


def _update(digest, path: str):
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest


def file_sha256(path: str) -> str:
    """The SHA-256 of a file's bytes, hex."""
    return _update(hashlib.sha256(), os.fspath(path)).hexdigest()


def git_blob_sha1(path: str) -> str:
    """A file's git blob id: SHA-1 of "blob <size>\\0" + its bytes (what a repository
    records for a file at a commit)."""
    path = os.fspath(path)
    digest = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
    return _update(digest, path).hexdigest()


def files_sha256(paths: Iterable[str]) -> str:
    """One SHA-256 for files in order: of the files' own SHA-256s (so renaming a file or
    reordering them changes it, as does any byte)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(bytes.fromhex(file_sha256(path)))
    return digest.hexdigest()


_WEIGHTS: dict = {}  # (path, sizes and times of its files) -> SHA-256


def weights_sha256(path: str) -> str:
    """What identifies a network's weights (ControlNets, motion modules): the SHA-256 of its
    file, or of a diffusers folder's config.json and diffusion_pytorch_model* files. Hashed
    once while the files stay as they are (a file can be gigabytes; a run asks several
    times: the manifest, the state key, the model cache)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        files = [os.path.join(path, n) for n in sorted(os.listdir(path))
                 if n == "config.json" or n.startswith("diffusion_pytorch_model")]
    else:
        files = [path]
    stats = [os.stat(f) for f in files]
    key = (path, tuple((f, st.st_size, st.st_mtime_ns) for f, st in zip(files, stats)))
    if key not in _WEIGHTS:
        _WEIGHTS[key] = files_sha256(files) if os.path.isdir(path) else file_sha256(path)
    return _WEIGHTS[key]


def data_key(*parts, length: int = 12) -> str:
    """A short SHA-256 of JSON-able data (dict keys sorted; anything else by `str`):
    names folders by what decides their content."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


__all__ = ["file_sha256", "git_blob_sha1", "files_sha256", "data_key", "weights_sha256"]
