"""Prompts -> embeddings: tokenize (truncating with a warning), encode once, cache."""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from sdanim.config.errors import check
from sdanim.core.runtime import import_keras

END_TOKEN = 49407


class PromptEncoder:
    """Encodes prompts into (77, D) text embeddings, each prompt once.

    Args:
        tokenizer: object with `encode(text) -> list[int]` (CLIP BPE, with start and
            end tokens), as KerasCV's `SimpleTokenizer`.
        text_encoder: Keras model `[tokens (B, 77), positions (B, 77)] -> (B, 77, D)`.
        max_length: int. Context length. Defaults to 77.

    Example:
    ```python
    encoder = PromptEncoder(model.tokenizer, model.text_encoder)
    embeddings = encoder.encode(["a cat", "a dog"])  # (2, 77, 768)
    ```
    """

    def __init__(self, tokenizer, text_encoder, max_length: int = 77):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_length = max_length
        self._cache: dict[str, np.ndarray] = {}

    def tokenize(self, prompt: str) -> list[int]:
        """Token ids padded with the end token to `max_length`, as KerasCV pads them.

        A prompt longer than the context is truncated (KerasCV raises instead), with a
        warning that says how many tokens were dropped.
        """
        check(
            isinstance(prompt, str),
            f"prompt must be a string. Received: prompt={prompt!r}",
        )
        tokens = list(self.tokenizer.encode(prompt))
        if len(tokens) > self.max_length:
            dropped = len(tokens) - self.max_length
            warnings.warn(
                f"prompt is {len(tokens) - 2} tokens long, over CLIP's "
                f"{self.max_length - 2}; the last {dropped} tokens were dropped: "
                f"{prompt[:60]!r}...",
                stacklevel=3,
            )
            tokens = tokens[: self.max_length - 1] + [END_TOKEN]
        return tokens + [END_TOKEN] * (self.max_length - len(tokens))

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """Returns float32 embeddings (N, 77, D), encoding only prompts not seen before.

        The empty prompt "" gives KerasCV's unconditional context.
        """
        prompts = list(prompts)
        new = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if new:
            keras = import_keras()
            tokens = np.array([self.tokenize(p) for p in new], dtype="int32")  # (N, 77)
            positions = np.tile(np.arange(self.max_length, dtype="int32"), (len(new), 1))
            out = self.text_encoder([tokens, positions], training=False)  # (N, 77, D)
            out = keras.ops.convert_to_numpy(out).astype("float32")
            for prompt, embedding in zip(new, out):
                self._cache[prompt] = embedding
        return np.stack([self._cache[p] for p in prompts])

    def encode_one(self, prompt: str) -> np.ndarray:
        """(77, D) embedding of one prompt."""
        return self.encode([prompt])[0]
