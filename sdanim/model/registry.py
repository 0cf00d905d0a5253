"""Where weights come from: KerasCV's Stable Diffusion files, and the pinned downloads
of the other model families (frame interpolator, upscalers, tiny decoder).

Every download goes through `keras.utils.get_file` into the Keras cache
($KERAS_HOME/datasets, default ~/.keras/datasets), from a fixed URL, and is checked
against the hash its publisher's own records give before it is used. Offline, a file
already in the cache is used as it is (after the same check); without it, one line says
which file is needed and where to get it. A file in the cache under a pinned name with
other content is refused with one line and never deleted (a user may have put it there).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from sdanim.config.errors import SdanimError
from sdanim.core.runtime import import_keras, keras_home
from sdanim.formats.digest import file_sha256, git_blob_sha1

MAX_PROMPT_LENGTH = 77
CONTEXT_DIM = {"1.4": 768, "2.1": 1024}
PART_ORDER = ("text_encoder", "diffusion_model", "decoder", "image_encoder")

_HF_SD1 = "https://huggingface.co/fchollet/stable-diffusion/resolve/main/"
_HF_SD2 = "https://huggingface.co/ianstenbit/keras-sd2.1/resolve/main/"

# (origin, sha256) of every weight file, as KerasCV 0.9 fetches them.
WEIGHT_FILES = {
    "1.4": {
        "text_encoder": (
            _HF_SD1 + "kcv_encoder.h5",
            "4789e63e07c0e54d6a34a29b45ce81ece27060c499a709d556c7755b42bb0dc4",
        ),
        "diffusion_model": (
            _HF_SD1 + "kcv_diffusion_model.h5",
            "8799ff9763de13d7f30a683d653018e114ed24a6a819667da4f5ee10f9e805fe",
        ),
    },
    "2.1": {
        "text_encoder": (
            _HF_SD2 + "text_encoder_v2_1.h5",
            "985002e68704e1c5c3549de332218e99c5b9b745db7171d5f31fcd9a6089f25b",
        ),
        "diffusion_model": (
            _HF_SD2 + "diffusion_model_v2_1.h5",
            "c31730e91111f98fe0e2dbde4475d381b5287ebb9672b1821796146a25c5132d",
        ),
    },
}
_VAE_FILES = {
    "decoder": (
        _HF_SD1 + "kcv_decoder.h5",
        "ad350a65cc8bc4a80c8103367e039a3329b4231c2469a1093869a345f55b1962",
    ),
    "image_encoder": (
        _HF_SD1 + "vae_encoder.h5",
        "c60fb220a40d090e0f86a6ab4c312d113e115c87c40ff75d11ffcf380aab7ebb",
    ),
}
for _files in WEIGHT_FILES.values():
    _files.update(_VAE_FILES)


def file_name(version: str, part: str) -> str:
    """The KerasCV file name of one part's weights, e.g. "kcv_decoder.h5"."""
    return WEIGHT_FILES[version][part][0].rsplit("/", 1)[-1]


def keras_cv_file(version: str, part: str) -> "PinnedFile":
    """One of KerasCV's weight files as a pinned download (its URL and SHA-256)."""
    origin, sha256 = WEIGHT_FILES[version][part]
    return PinnedFile(file_name(version, part), origin, sha256=sha256,
                      what=f"KerasCV Stable Diffusion {version} {part.replace('_', ' ')}",
                      flag="--weights DIR (a folder of KerasCV's .h5 files)")


def keras_cache_dir() -> str:
    return os.path.join(keras_home(), "datasets")


@dataclasses.dataclass(frozen=True)
class PinnedFile:
    """A weights file fetched on first use from a fixed URL and checked by its hash.

    Args:
        name: str. The file name in the cache.
        url: str. Where it is downloaded from (a release asset or a commit-pinned file).
        sha256: str or None. Its SHA-256, as published (see the note at each entry).
        git_blob: str or None. Its git blob id (SHA-1 of "blob <size>\\0" + content),
            where the publisher's repository is the only record of its content.
        what: str. What it is, for messages ("RIFE v4.26 heavy").
        flag: str. The option that takes a local file instead ("--rife FILE").
    """

    name: str
    url: str
    sha256: Optional[str] = None
    git_blob: Optional[str] = None
    what: str = ""
    flag: str = ""

    @property
    def path(self) -> str:
        """Where the file lives in the Keras cache."""
        return os.path.join(keras_cache_dir(), self.name)

    def digest(self, path: str) -> str:
        """The file's hash of the kind this entry is pinned by."""
        return file_sha256(path) if self.sha256 is not None else git_blob_sha1(path)

    def matches(self, path: str) -> bool:
        """Whether the file at `path` has the pinned content."""
        return self.digest(path) == (self.sha256 if self.sha256 is not None else self.git_blob)

    def cached(self, param: str = "weights") -> Optional[str]:
        """The checked file in the cache, or None when it is not there. A file there with
        other content (one a user copied in, say) is refused with one line naming both
        hashes, and left where it is: sdanim never deletes a file it did not write."""
        path = self.path
        if not os.path.isfile(path):
            return None
        found = self.digest(path)
        expected = self.sha256 if self.sha256 is not None else self.git_blob
        if found != expected:
            kind = "SHA-256" if self.sha256 is not None else "git blob id"
            raise PinnedFileError(
                f"{path} is not the published {self.what} file: its {kind} is {found}, the pinned one's {expected} "
                f"({self.url}); move it out of the way (sdanim leaves it as it is), or pass it with {self.flag}. "
                f"Received: {param}=None", reason=f"{self.name} in the cache has another {kind} ({found[:12]}..., "
                f"pinned {expected[:12]}...)")
        return path


@dataclasses.dataclass(frozen=True)
class CheckedFile:
    """A weights file that was read and recognised: its path and SHA-256 (what a manifest
    records, so a resume can refuse outputs another file made)."""

    path: str
    sha256: str

    def record(self) -> dict:
        return {"file": os.path.basename(self.path), "sha256": self.sha256}


class PinnedFileError(SdanimError):
    """A pinned file that cannot be used: `reason` says why in a few words (for an error
    that names several files)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def fetch(pinned: PinnedFile, param: str) -> str:
    """The local path of a pinned file: from the cache, else downloaded once and checked.

    Raises a one-line `PinnedFileError` naming the file, where to get it and the option
    that takes a local copy, when it is neither cached nor downloadable (the download's
    own error said in a few words), when the cache holds other content under its name,
    or when the download does not match its hash (that download, sdanim's own, is
    removed).
    """
    path = pinned.cached(param)
    if path is not None:
        return path
    keras = import_keras()
    try:
        path = keras.utils.get_file(fname=pinned.name, origin=pinned.url)
    except Exception as error:  # Keras raises a bare Exception on URL failures
        text = " ".join(str(error).split())
        reason = (text.rsplit(" -- ", 1)[-1] if " -- " in text else text)[:120] or type(error).__name__
        raise PinnedFileError(
            f"the {pinned.what} weights ({pinned.name}) are not in {keras_cache_dir()} and could not be "
            f"downloaded from {pinned.url} ({reason}); download them there once, or pass {pinned.flag}. "
            f"Received: {param}=None", reason=f"{pinned.name} could not be downloaded ({reason})") from None
    if not pinned.matches(path):
        os.remove(path)  # the download just made, never a file that was there before
        raise PinnedFileError(
            f"the downloaded {pinned.name} does not match its published hash (the download was removed); try "
            f"again, or pass {pinned.flag}. Received: {param}=None",
            reason=f"the download of {pinned.name} does not match its published hash")
    return path
