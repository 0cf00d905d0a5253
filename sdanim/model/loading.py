"""Building and keeping live models: the only module (with `sdanim.model.layers` and the
model families beside it) that builds KerasCV's classes.

Weight sources:
    "keras-cv": KerasCV's own .h5 files, fetched by keras.utils.get_file into the Keras
        cache exactly as KerasCV does (downloaded once online; used from the cache
        offline).
    a directory: the same .h5 files, by their KerasCV file names (what `sdanim convert`
        writes).
    a checkpoint: any SD 1.x/2.x model as one .safetensors/.ckpt file (original CompVis
        layout) or a diffusers folder, mapped onto the KerasCV classes without torch
        (sdanim.formats.checkpoints, sdanim.formats.weight_map, sdanim.model.convert).
    "random": the exact architecture with seeded random weights (offline smoke runs and
        tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import weakref
from typing import Optional

from sdanim.config.choices import ATTENTIONS, PRECISIONS, VERSIONS
from sdanim.config.errors import SdanimError, check
from sdanim.config.settings import check_image_size
from sdanim.core.runtime import import_keras, import_keras_cv
from sdanim.formats.checkpoints import CHECKPOINT_SUFFIXES, is_diffusers_folder
from sdanim.formats.lora_files import check_lora_files
from sdanim.model.convert import bind_checkpoint, checked_checkpoint, write_keras_weights
from sdanim.model.device import choose_onednn, detect_device, device_defaults
from sdanim.model.layers import (
    BUILD_LOCK, attach_attention_interp, attach_context_cache, built_in_one_trace, keep_conv_kernels_in_torch_layout,
    use_fast_layers, use_fused_attention,
)
from sdanim.model.registry import (
    MAX_PROMPT_LENGTH, PART_ORDER, PinnedFileError, fetch, file_name, keras_cache_dir, keras_cv_file,
)
from sdanim.model.sd3 import is_sd3, load_sd3
from sdanim.model.stable_diffusion import StableDiffusionModel, as_loras


def _resolve_weight_files(version: str, weights: str, parts) -> dict:
    """Maps each part to a local .h5 path, or raises one error naming every missing file."""
    if weights == "keras-cv":
        # Checked by sdanim before Keras sees them: keras.utils.get_file deletes a cached
        # file whose hash differs and downloads it again (a file the user copied there).
        found, problems = {}, []
        for part in parts:
            try:
                found[part] = fetch(keras_cv_file(version, part), "weights")
            except PinnedFileError as error:
                problems.append(error.reason)
        if problems:
            raise SdanimError(
                f"Stable Diffusion {version} weights are not usable: {'; '.join(problems)} (cache: "
                f"{keras_cache_dir()}). Connect to the internet once so KerasCV's files can be downloaded, copy "
                "them into a folder and pass --weights DIR, or use --weights random for an offline smoke run. "
                f"Received: weights={weights!r}"
            )
        return found
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
_BUILD_LOCK = BUILD_LOCK


@contextlib.contextmanager
def _weights_loaded_later():
    """Builds layers without drawing their initial values: every weight starts as zeros.

    For parts whose weights are loaded right after the build (KerasCV files, a folder
    of .h5 files, a checkpoint): both loaders refuse a file that does not hold every
    weight, so no zero survives, and the frames are those of the loaded weights. The
    initializers' random draws were a third of the UNet's build time
    (benchmarks/build_time.py). Random weights (weights="random") never go through here.
    """
    import_keras()
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
    import_keras_cv()
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
    taesd: Optional[str] = None,
) -> StableDiffusionModel:
    """Builds KerasCV's Stable Diffusion sub-models for one image size.

    Args:
        version: str or None. "1.4" (KerasCV `StableDiffusion`, the SD 1.x
            architecture) or "2.1" (`StableDiffusionV2`, SD 2.x). None: what the
            checkpoint or folder holds, else "1.4". An SD3 model ("sd3-medium", ...)
            is built by `sdanim.model.sd3.load_sd3`. Defaults to None.
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
            formats; see `sdanim.formats.lora_files`). Change them later with `model.set_loras`,
            `model.add_lora`, `model.remove_loras` (no rebuild). Defaults to None.
        taesd: str or None. TAESD weights (a file or folder) for the tiny decoder, used
            by `RenderSettings(decoder="tiny")` and previews; None: the pinned download
            when first needed. Defaults to None.

    Returns:
        A `StableDiffusionModel`. While a model loaded with the same arguments is
        still held (a notebook variable, a UI), that model is returned instead of
        building another: re-running a notebook cell costs nothing.

    Example:
    ```python
    model = sdanim.load_model(weights="random", height=128, width=128)
    ```
    """
    if is_sd3(version):  # Stable Diffusion 3 / 3.5: KerasHub's pieces (`sdanim.model.sd3`)
        return load_sd3(version, weights=weights, height=height, width=width, precision=precision,
                        jit_compile=jit_compile, attention=attention, seed=seed, loras=as_loras(loras), taesd=taesd)
    # 1. Everything cheap is checked before a minute of building.
    _check_options(version, height, width, precision, attention)
    loras = check_lora_files(loras)  # a missing or malformed LoRA fails before the build
    source = _weight_source(str(weights), version)
    choose_onednn(precision)  # before TensorFlow's import, if this process has not made it yet
    choices = _device_choices(precision, jit_compile, attention)

    # 2. A model built with the same arguments that is still alive (re-running a
    #    notebook cell, a second notebook in the same kernel) is handed back as it is.
    key = (source.version, source.weights, _source_stamp(source.weights, source.kind), height, width,
           choices.precision, choices.jit_compile, choices.fused, seed)
    alive = _LIVE.get(key)
    if alive is not None:
        if alive.loras != loras:
            alive.set_loras(loras)
        if alive.taesd != taesd:
            alive.taesd, alive._tiny_decoder = taesd, None  # loaded again on first use
        return alive

    # 3. Build each part, load its weights; bind a checkpoint; merge the LoRAs.
    model = _build(source, choices, height, width, seed)
    model.taesd = taesd
    if source.checkpoint is not None:
        # A checkpoint's VAE encoder is bound and checked now, not at the first img2img.
        bind_checkpoint(model, source.checkpoint)
    if loras:
        model.set_loras(loras)
    _LIVE[key] = model
    return model


def _check_options(version, height, width, precision, attention) -> None:
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


@dataclasses.dataclass(frozen=True)
class _WeightSource:
    weights: str
    kind: str  # "keras-cv", "random", "h5-dir" or "checkpoint"
    version: str
    checkpoint: Optional[object] = None  # a checked `Checkpoint`
    files: Optional[dict] = None  # part -> .h5 path (keras-cv, h5-dir)


def _weight_source(weights: str, version: Optional[str]) -> _WeightSource:
    """Where the weights come from, checked (every tensor of a checkpoint accounted for,
    every .h5 file found) without building anything."""
    kind = weight_source_kind(weights)
    checkpoint = None
    if kind == "checkpoint":
        checkpoint = checked_checkpoint(weights, version)
        version = checkpoint.version
    elif version is None:
        version = _h5_dir_version(weights) if kind == "h5-dir" and os.path.isdir(weights) else "1.4"
    files = None if kind in ("random", "checkpoint") else _resolve_weight_files(version, weights, PART_ORDER[:3])
    return _WeightSource(weights, kind, version, checkpoint, files)


@dataclasses.dataclass(frozen=True)
class _DeviceChoices:
    precision: str
    jit_compile: bool
    fused: bool  # attention through keras.ops.dot_product_attention
    fast_layers: bool  # GroupNormalization and padded convolutions in their CPU forms


def _device_choices(precision: str, jit_compile: Optional[bool], attention: str) -> _DeviceChoices:
    """What "auto" means on this device and backend (`sdanim.model.device`)."""
    device = detect_device()
    backend = import_keras().backend.backend()
    default_precision, default_jit = device_defaults(device, backend=backend)
    return _DeviceChoices(
        precision=default_precision if precision == "auto" else precision,
        jit_compile=default_jit if jit_compile is None else bool(jit_compile),
        fused=device == "cuda" if attention == "auto" else attention == "fused",
        # Measured under TensorFlow on a CPU only (docs/benchmarks.md), so only there.
        fast_layers=device == "cpu" and backend == "tensorflow",
    )


def _build(source: _WeightSource, choices: _DeviceChoices, height: int, width: int, seed: int) -> StableDiffusionModel:
    """Builds the text encoder, UNet and decoder (the VAE encoder on first use), each
    with its weights loaded and its layers in the chosen forms."""
    _set_precision(choices.precision)
    keras = import_keras()
    builders = _builders(source.version, height, width)
    files = dict(source.files or {})

    def build(part: str):
        if source.kind == "random":
            # Seed per part so a part's random weights do not depend on build order.
            with _BUILD_LOCK, built_in_one_trace():
                keras.utils.set_random_seed(seed * 10 + PART_ORDER.index(part))
                model = builders[part]()
        else:
            with _weights_loaded_later(), built_in_one_trace():  # overwritten next: skip the random draws
                model = builders[part]()
        if source.files is not None:
            if part not in files:
                files.update(_resolve_weight_files(source.version, source.weights, [part]))
            model.load_weights(files[part])
        if choices.fused:
            use_fused_attention(model)
        if choices.fast_layers:
            use_fast_layers(model)
        keep_conv_kernels_in_torch_layout(model)  # torch backend only
        if part == "diffusion_model":
            attach_context_cache(model)  # the text's keys and values once per batch
            attach_attention_interp(model)  # AID's attention interpolation, when a walk asks
        return model

    text_encoder, diffusion_model, decoder = (build(part) for part in PART_ORDER[:3])
    return StableDiffusionModel(
        version=source.version,
        height=height,
        width=width,
        weights=source.weights,
        precision=choices.precision,
        jit_compile=choices.jit_compile,
        attention="fused" if choices.fused else "keras-cv",
        text_encoder=text_encoder,
        diffusion_model=diffusion_model,
        decoder=decoder,
        image_encoder_factory=lambda: build("image_encoder"),
    )


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
    bind_checkpoint(model, checked_checkpoint(str(checkpoint), model.version))
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
    checked_checkpoint(str(checkpoint), version)  # a file we cannot use creates no folder
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


