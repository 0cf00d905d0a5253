"""CLIP's tokenizer for the text encoders, from the installed vocabulary (never the network)."""

from __future__ import annotations

import importlib.util
import os

from sdanim.config.errors import SdanimError
from sdanim.core.runtime import import_keras_cv


def clip_vocab_path() -> str:
    """Path of CLIP's BPE vocabulary, shipped in the `openai-clip` package.

    It is byte-identical to the file KerasCV downloads, so no network is needed. We
    locate it without importing `clip` (which imports torch).
    """
    spec = importlib.util.find_spec("clip")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = os.path.join(folder, "bpe_simple_vocab_16e6.txt.gz")
        if os.path.isfile(path):
            return path
    raise SdanimError(
        "the CLIP tokenizer vocabulary was not found; install it with "
        "`pip install openai-clip`. Received: clip package at "
        f"{locations or 'nowhere'}"
    )


def load_tokenizer():
    """KerasCV's CLIP tokenizer, built from the installed vocabulary (never the network)."""
    import_keras_cv()
    from keras_cv.src.models.stable_diffusion.clip_tokenizer import SimpleTokenizer

    return SimpleTokenizer(bpe_path=clip_vocab_path())
