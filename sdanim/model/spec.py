"""Which model to load, as a small picklable value: what `load_model` takes besides the
image size. The CLI, the UI and Ray workers load from it."""

from __future__ import annotations

import dataclasses
from typing import Optional

from sdanim.config.choices import ATTENTIONS, MODELS, PRECISIONS
from sdanim.config.errors import check
from sdanim.formats.lora_files import as_loras
from sdanim.model.convert import checked_checkpoint
from sdanim.model.loading import load_model, weight_source_kind
from sdanim.model import sd3
from sdanim.model.sd3 import is_sd3, load_sd3
from sdanim.model.tokenizer import clip_vocab_path


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which model to load: what `load_model` takes besides the image size (the size
    comes from `RenderSettings`). Small and picklable: Ray workers load from it.

    Args:
        version: str or None. "1.4" or "2.1"; None: what `weights` holds, else "1.4".
            Or an SD3-family model: "sd3-medium", "sd3.5-medium", "sd3.5-large",
            "sd3.5-large-turbo" (KerasHub's pieces, `sdanim.model.sd3`). Defaults to None.
        weights: str. "keras-cv", "random", a directory of KerasCV .h5 files or a
            checkpoint (.safetensors, .ckpt, diffusers folder). For SD3: "keras-cv"
            (the default) or "keras-hub" means KerasHub's preset; "random", or a
            diffusers folder. Defaults to "keras-cv".
        precision: str. "auto", "float32", "mixed_float16" or "mixed_bfloat16".
            Defaults to "auto" (see `load_model`).
        jit_compile: bool or None. XLA for the sampling step; None picks by device.
        attention: str. "auto", "fused" or "keras-cv". Defaults to "auto".
        seed: int. Seed of random weights. Defaults to 0.
        loras: LoRA files merged into the weights (see `load_model`). Defaults to ().
        taesd: str or None. TAESD weights for the tiny decoder (`RenderSettings(decoder="tiny")`,
            previews); None: the pinned download. Defaults to None.

    Example:
    ```python
    spec = sdanim.ModelSpec(weights="random")
    sdanim.morph(["a", "b"], model=spec, settings=sdanim.RenderSettings(height=128, width=128))
    ```
    """

    version: Optional[str] = None
    weights: str = "keras-cv"
    precision: str = "auto"
    jit_compile: Optional[bool] = None
    attention: str = "auto"
    seed: int = 0
    loras: tuple = ()
    taesd: Optional[str] = None

    def __post_init__(self):
        object.__setattr__(self, "loras", as_loras(self.loras))

        check(
            self.version is None or self.version in MODELS,
            f"model must be one of {', '.join(MODELS)}. Received: model={self.version!r}",
        )
        check(
            self.precision in PRECISIONS,
            f"precision must be one of {', '.join(PRECISIONS)}. Received: precision={self.precision!r}",
        )
        check(
            self.attention in ATTENTIONS,
            f"attention must be one of {', '.join(ATTENTIONS)}. Received: attention={self.attention!r}",
        )
        object.__setattr__(self, "weights", str(self.weights))

    @property
    def family(self) -> str:
        """"sd3" for the SD3-family models, else "sd" (SD 1.x/2.x)."""
        return "sd3" if is_sd3(self.version) else "sd"

    def check_weights(self) -> "ModelSpec":
        """One line if `weights` cannot be this model's (an SD3 file for "1.4", SD 1.x
        weights for "sd3-medium", an SD3 file of another size): read from headers and
        configs only, nothing built, downloaded or read in full. Returns the spec."""
        if is_sd3(self.version):
            sd3.check_weights(self.version, self.weights)
            return self
        check(self.weights != "keras-hub", "weights 'keras-hub' are KerasHub's SD3 presets: choose an SD3-family "
                                           f"model for them. Received: model={self.version or 'auto'!r}")
        held = sd3.version_of(self.weights)
        check(held is None, f"{self.weights} holds an SD3-family model ({held}), not Stable Diffusion 1.x/2.x: "
                            f"choose the model {held}. Received: model={self.version or 'auto'!r}")
        if weight_source_kind(self.weights) == "checkpoint":
            checked_checkpoint(self.weights, self.version)
        return self

    def load(self, height: int, width: int):
        """Builds (or hands back the still-alive) model for one image size."""
        clip_vocab_path()  # fail before a minute of model building if the vocab is missing
        if is_sd3(self.version):
            return load_sd3(self.version, weights=self.weights, height=height, width=width, precision=self.precision,
                            jit_compile=self.jit_compile, attention=self.attention, seed=self.seed, loras=self.loras,
                            taesd=self.taesd)
        return load_model(
            version=self.version, weights=self.weights, height=height, width=width,
            precision=self.precision, jit_compile=self.jit_compile, attention=self.attention, seed=self.seed,
            loras=self.loras, taesd=self.taesd,
        )
