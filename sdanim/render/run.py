"""The run set-up every front-end shares: the CLI, the notebooks, the browser UI and the
Ray driver all call these (through the task functions), none of them another
front-end's helpers.

    ModelSpec or model -> `get_model`; the frame source (`frame_source`: this process or
    Ray workers); the run folder with its manifest (`open_run_folder`), refusing another
    run's frames
"""

from __future__ import annotations

import glob
import importlib.metadata as md
import os
import shutil

from sdanim.config.errors import SdanimError, check
from sdanim.config.settings import RenderSettings
from sdanim.core.runtime import import_keras
from sdanim.model.sd3 import check_sampler, is_sd3
from sdanim.model.spec import ModelSpec
from sdanim.model.taesd import LATENT_CHANNELS, PINNED, SD3_LATENT_CHANNELS, check_taesd
from sdanim.render.local import LocalFrames
from sdanim.render.post import POST_FOLDERS
from sdanim.render.ray import RayFrames, Workers
from sdanim.render.store import STATE_FILE, FrameStore, ensure_folder, manifest_differences

# Manifest keys that must match for frames on disk to be reused.
RUN_KEYS = ("walk", "timing", "negative_prompt", "render", "model", "controlnets", "motion")


def check_decoder(model, settings: RenderSettings) -> None:
    """Checks what the settings need of the model before it is built: the sampler the
    model family takes (`check_sampler`), and the tiny decoder's weights (`model`'s
    `taesd`, else the pinned download) where `settings` ask for it."""
    version = known_version(model)
    if model is None or isinstance(model, ModelSpec) or version is not None:  # a function's model: checked when built
        check_sampler(version, settings.scheduler)
    if settings.decoder == "tiny":
        check_taesd(getattr(model, "taesd", None), channels=SD3_LATENT_CHANNELS if is_sd3(version) else LATENT_CHANNELS)


def tiny_decoder_available(model) -> bool:
    """Whether TAESD weights are at hand without a download: given to the model (or its
    spec), or already in the cache. Previews use the tiny decoder then."""
    if getattr(model, "taesd", None) is not None:
        return True
    return not is_sd3(known_version(model)) and PINNED["decoder"].cached("taesd") is not None


def get_model(model, settings: RenderSettings):
    """The model to render `settings` with: `model` itself if it is a loaded model
    (checked against the size), loaded from it if it is a `ModelSpec`, or the default
    `ModelSpec()` (KerasCV's weights) if None; a function is called to build one. The
    tiny decoder's weights are checked first where `settings` ask for it."""
    check_decoder(model, settings)
    if model is None or isinstance(model, ModelSpec):
        return (model or ModelSpec()).load(settings.height, settings.width)
    if callable(model) and not hasattr(model, "diffusion_model"):
        model = model()
    check(
        (model.height, model.width) == (settings.height, settings.width),
        f"the model was built for {model.width}x{model.height}; load one for the requested "
        f"size. Received: size={settings.width}x{settings.height}",
    )
    return model


def known_version(model):
    """The SD version of `model` before it is built, where it is known: a loaded model's,
    or a ModelSpec's when it names one (else None: checked when the model is built)."""
    return getattr(model, "version", None)


def frame_source(model, settings: RenderSettings, workers=None):
    """Where a run's frames are rendered: in this process (`workers` None) with
    `get_model(model, settings)`, or on Ray workers (`workers`: a count or a `Workers`),
    each loading its own model from `model` (a `ModelSpec`, None for the default, or a
    function that builds a model). Ray is imported only for workers."""
    if workers is None:
        return LocalFrames(get_model(model, settings))
    check_decoder(model, settings)
    return RayFrames(model, settings, workers if isinstance(workers, Workers) else Workers(count=workers))


def open_run_folder(folder: str, manifest: dict, overwrite: bool, keys=RUN_KEYS):
    """Opens a run's frames folder, refusing to mix frames of a different run: one whose
    manifest differs on `keys` (what decides the frames), or frames without a manifest.
    overwrite=True removes the frames and their in-betweens and upscaled copies instead.

    Returns the store and the stored manifest of the same run (None if new)."""
    store = FrameStore(ensure_folder(folder, "out"))
    partial = [".frame_*.partial*", STATE_FILE + ".*.part"]
    for stale in [path for pattern in partial for path in glob.glob(os.path.join(folder, pattern))]:
        os.remove(stale)  # a write cut short by a kill (the file itself was never renamed in)
    stored = store.read_manifest()
    has_frames = bool(glob.glob(os.path.join(folder, "frame_*.png")))
    if overwrite:
        for path in glob.glob(os.path.join(folder, "frame_*.png")):
            os.remove(path)
        for pattern in POST_FOLDERS:  # in-betweens and upscaled copies of the frames just removed
            for path in glob.glob(os.path.join(folder, pattern)):
                shutil.rmtree(path, ignore_errors=True)
        if os.path.isfile(os.path.join(folder, STATE_FILE)):  # the removed run's sampling state
            os.remove(os.path.join(folder, STATE_FILE))
    elif stored is not None:
        diffs = manifest_differences(stored, manifest, keys)
        if diffs:
            raise SdanimError(
                f"the frames folder {folder} belongs to another run ({'; '.join(diffs[:3])}); "
                "pass --overwrite (overwrite=True) or choose another --out. "
                f"Received: out folder={folder!r}"
            )
    elif has_frames:
        raise SdanimError(
            f"the frames folder {folder} holds frames but no manifest; pass --overwrite "
            f"(overwrite=True) or choose another --out. Received: out folder={folder!r}"
        )
    store.write_manifest({**(stored or {}), **manifest} if stored and not overwrite else manifest)
    return store, (None if overwrite else stored)


def versions() -> dict:
    """Installed versions of the packages that decide the frames."""
    found = {}
    for name in ("keras", "keras-cv", "tensorflow-cpu", "tensorflow", "jax", "torch", "numpy"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    found["keras_backend"] = import_keras().backend.backend()
    return found
