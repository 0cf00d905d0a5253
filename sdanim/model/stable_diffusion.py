"""The loaded Stable Diffusion: its sub-models, and the state derived from their weights
and layers, declared in one place with one `invalidate()`.

Everything downstream talks to the sub-models through their call signatures (the
KerasCV protocol), so tests can swap in tiny Keras models:

    text_encoder([tokens (B, 77) int32, positions (B, 77) int32]) -> (B, 77, D)
    diffusion_model([latent (B, h, w, 4), t_emb (B, 320), context (B, 77, D)])
        -> noise prediction (B, h, w, 4)
    decoder(latent (B, h, w, 4)) -> image (B, 8h, 8w, 3) in [-1, 1]
    image_encoder(image (B, H, W, 3) in [-1, 1]) -> latent (B, H/8, W/8, 4)

What a model derives and who invalidates it:

    prompt_encoder   embeddings made with the text encoder's weights: dropped when any
                     weight changes (LoRAs, another checkpoint)
    lora_base        the base values of the weights merged LoRAs changed: dropped when a
                     checkpoint brings new base weights
    compiled         traced sampling functions (`sdanim.model.compiled`): dropped when a
                     part's layers change (`sdanim.model.layers`), and when any weight
                     changes in a process whose oneDNN kernels keep the weights they
                     saw first (`sdanim.model.device.keep_weights_in_kernels`)
    controlnets      ControlNets built for the UNet, by their files' SHA-256 (their own
                     weights: kept when the model's change)
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable, Optional

from sdanim.core.prompts import PromptEncoder
from sdanim.formats.lora_files import Lora, as_loras
from sdanim.model import lora
from sdanim.model.compiled import forget_compiled
from sdanim.model.device import weights_kept
from sdanim.model.registry import CONTEXT_DIM
from sdanim.model.taesd import check_taesd, load_part
from sdanim.model.tokenizer import load_tokenizer

PARTS = ("text_encoder", "diffusion_model", "decoder", "image_encoder")


@dataclasses.dataclass
class ModelState:
    """What a model derives from its weights and layers (see the module docstring)."""

    prompt_encoder: Optional[PromptEncoder] = None
    lora_base: dict = dataclasses.field(default_factory=dict)  # id(variable) -> (variable, base value)
    lora_targets: Optional[dict] = None  # LoRA module name -> (part, layer): the layers' names, never stale
    controlnets: dict = dataclasses.field(default_factory=dict)  # a net's SHA-256 -> its LoadedControlNet

    def invalidate(self, parts=(), *, base: bool = False, layers: bool = False) -> None:
        """Drops what a change made stale: always the prompt embeddings (weights changed);
        with base=True the LoRA base values (new base weights); the compiled functions of
        `parts` with layers=True (their layers' calls changed) or where the process's
        kernels keep the weights they were first called with (`weights_kept`)."""
        self.prompt_encoder = None
        if base:
            self.lora_base.clear()
        if layers or weights_kept():
            for part in parts:
                if part is not None:
                    forget_compiled(part)


# The state of models that do not declare one (tests' tiny models, custom models), by
# id, each dropped when its model is (models need not be hashable).
_STATES: dict = {}


def model_state(model) -> ModelState:
    """`model.state` where the model declares it, else one kept beside it (held weakly)."""
    state = getattr(model, "state", None)
    if isinstance(state, ModelState):
        return state
    entry = _STATES.get(id(model))
    if entry is None or entry[0]() is not model:
        ref = weakref.ref(model, lambda _, key=id(model): _STATES.pop(key, None))
        entry = _STATES[id(model)] = (ref, ModelState())
    return entry[1]


def prompt_encoder(model) -> PromptEncoder:
    """The model's prompt encoder, created once so prompts are encoded once per model."""
    state = model_state(model)
    if state.prompt_encoder is None:
        state.prompt_encoder = PromptEncoder(model.tokenizer, model.text_encoder)
    return state.prompt_encoder


def lora_text(records) -> dict:
    """{"loras": records} where there are any, else {} (PNG metadata, manifests)."""
    return {"loras": list(records)} if records else {}


@dataclasses.dataclass(eq=False)
class StableDiffusionModel:
    """The sub-models of one Stable Diffusion, built for one image size.

    Attributes:
        version: str. "1.4" or "2.1".
        height, width: int. Image size in pixels the UNet and decoder were built for.
        weights: str. The weight source: "keras-cv", "random", a directory of .h5
            files, or a checkpoint file or diffusers folder.
        precision: str. The Keras dtype policy the models were built under.
        jit_compile: bool. Whether sdanim compiles its sampling step with XLA.
        attention: str. "fused" or "keras-cv".
        tokenizer: KerasCV's CLIP BPE tokenizer, with `encode(text) -> list[int]`
            (built on first use).
        text_encoder, diffusion_model, decoder: Keras models (protocol above).
        loras: tuple of `sdanim.Lora`, merged into the weights in this order.
        lora_records: file, size, sha256 and scale of each LoRA (manifests).
        state: `ModelState`, what the model derives from its weights and layers.
        taesd: str or None. TAESD weights (file or folder) for the tiny decoder; None:
            the pinned download (`sdanim.model.taesd`).
    """

    version: str
    height: int
    width: int
    weights: str
    precision: str
    jit_compile: bool
    attention: str
    text_encoder: Any
    diffusion_model: Any
    decoder: Any
    image_encoder_factory: Optional[Callable[[], Any]] = None
    loras: tuple = ()
    lora_records: list = dataclasses.field(default_factory=list)
    state: ModelState = dataclasses.field(default_factory=ModelState)
    taesd: Optional[str] = None
    _image_encoder: Any = None
    _tokenizer: Any = None
    _tiny_decoder: Any = None

    def invalidate(self, *, base: bool = False, layers: bool = False) -> None:
        """Drops the derived state a change made stale (see `ModelState.invalidate`);
        every mutation of the model's weights or layers calls it."""
        parts = (self.text_encoder, self.diffusion_model, self.decoder, self._image_encoder)
        self.state.invalidate(parts, base=base, layers=layers)

    def set_loras(self, loras) -> "StableDiffusionModel":
        """Makes `loras` the model's LoRAs (files, "FILE:SCALE", (file, scale) pairs or
        `sdanim.Lora`), in place: the weights earlier LoRAs touched go back to their base
        values bit for bit, then these are merged in order. Every file is checked first;
        if one fails nothing changes. Returns the model."""
        lora.set_loras(self, loras)
        return self

    def add_lora(self, path: str, scale: float = 1.0) -> "StableDiffusionModel":
        """Merges one more LoRA on top of the current ones (see `set_loras`)."""
        return self.set_loras(self.loras + (Lora(path, scale),))

    def remove_loras(self) -> "StableDiffusionModel":
        """Restores the base weights exactly (no rebuild)."""
        return self.set_loras(())

    @property
    def tokenizer(self):
        """KerasCV's CLIP tokenizer, built on first use from the installed vocabulary."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer()
        return self._tokenizer

    @property
    def context_dim(self) -> int:
        return CONTEXT_DIM[self.version]

    @property
    def image_encoder(self):
        """The VAE encoder, built on first use (image-to-image needs it; morphs do not)."""
        if self._image_encoder is None and self.image_encoder_factory is not None:
            self._image_encoder = self.image_encoder_factory()
        return self._image_encoder

    @property
    def tiny_decoder(self):
        """TAESD's decoder (same call signature as `decoder`), loaded on first use from
        `taesd` (or the pinned download)."""
        if self._tiny_decoder is None:
            self._tiny_decoder = load_part(check_taesd(self.taesd), "decoder")
        return self._tiny_decoder

    def describe(self) -> dict:
        """What a manifest records about the model."""
        return {
            "version": self.version,
            "weights": self.weights,
            "height": self.height,
            "width": self.width,
            "precision": self.precision,
            "jit_compile": self.jit_compile,
            "attention": self.attention,
            **lora_text(self.lora_records),
        }


__all__ = ["StableDiffusionModel", "ModelState", "model_state", "prompt_encoder", "lora_text", "as_loras", "PARTS"]
