"""The run set-up every front-end shares: the CLI, the notebooks, the browser UI and
the Ray driver all call these, none of them another front-end's helpers.

    ModelSpec -> model;  walk + RenderSettings -> FrameJob -> FramePlan (prompts encoded
    once per model) -> a frame source renders frame indices (this process: LocalFrames;
    Ray workers: sdanim.distributed.RayFrames) -> run folder (frames + manifest) -> export
    (ExportSettings)

A `FrameJob` is small and picklable (walk, settings, negative prompt, frame positions):
whoever holds a model can turn it into the same `FramePlan`, so frame i is the same
image wherever it is rendered.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from typing import Callable, Iterable, Optional

import numpy as np

from sdanim.errors import SdanimError, check
from sdanim.export import check_fps, check_quality, output_format
from sdanim.frames import FrameStore, ensure_folder, manifest_differences
from sdanim.keyframes import Walk, mix_embeddings, normalize_prompt
from sdanim.noise import seeded_noise
from sdanim.plan import FramePlan
from sdanim.prompts import PromptEncoder
from sdanim.sampling import Renderer, render_frames
from sdanim.settings import RenderSettings

AUDIO_MODES = ("loudness", "onsets")

# Manifest keys that must match for frames on disk to be reused.
RUN_KEYS = ("walk", "timing", "negative_prompt", "render", "model")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which model to load: what `load_model` takes besides the image size (the size
    comes from `RenderSettings`). Small and picklable: Ray workers load from it.

    Args:
        version: str or None. "1.4" or "2.1"; None: what `weights` holds, else "1.4".
            Defaults to None.
        weights: str. "keras-cv", "random", a directory of KerasCV .h5 files or a
            checkpoint (.safetensors, .ckpt, diffusers folder). Defaults to "keras-cv".
        precision: str. "auto", "float32", "mixed_float16" or "mixed_bfloat16".
            Defaults to "auto" (see `load_model`).
        jit_compile: bool or None. XLA for the sampling step; None picks by device.
        attention: str. "auto", "fused" or "keras-cv". Defaults to "auto".
        seed: int. Seed of random weights. Defaults to 0.
        loras: LoRA files merged into the weights (see `load_model`). Defaults to ().

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

    def __post_init__(self):
        from sdanim.lora import as_loras
        from sdanim.models import ATTENTIONS, PRECISIONS, VERSIONS

        object.__setattr__(self, "loras", as_loras(self.loras))

        check(
            self.version is None or self.version in VERSIONS,
            f"model must be one of {', '.join(VERSIONS)}. Received: model={self.version!r}",
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

    def load(self, height: int, width: int):
        """Builds (or hands back the still-alive) model for one image size."""
        from sdanim.models import clip_vocab_path, load_model

        clip_vocab_path()  # fail before a minute of model building if the vocab is missing
        return load_model(
            version=self.version, weights=self.weights, height=height, width=width,
            precision=self.precision, jit_compile=self.jit_compile, attention=self.attention, seed=self.seed,
            loras=self.loras,
        )


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    """How rendered frames become a video.

    Args:
        fps: float. Frames per second. Defaults to 12.
        ping_pong: bool. Play forward then back. Defaults to False.
        double: bool. Double the frame count by blending neighbours (played at
            2 x fps for the same duration). Defaults to False.
        quality: float. MP4/WebM quality, 0-10. Defaults to 8.
        sheet: bool. Also write a contact sheet `<out stem>_sheet.png`. Defaults to False.
        audio: str or None. A PCM WAV whose loudness or onsets (`audio_mode`) set how
            fast the walk moves; muxed into an MP4/WebM. Defaults to None.
        audio_mode: str. "loudness" or "onsets". Defaults to "loudness".
    """

    fps: float = 12.0
    ping_pong: bool = False
    double: bool = False
    quality: float = 8.0
    sheet: bool = False
    audio: Optional[str] = None
    audio_mode: str = "loudness"

    def __post_init__(self):
        object.__setattr__(self, "fps", check_fps(self.fps))
        object.__setattr__(self, "quality", check_quality(self.quality))
        check(
            self.audio_mode in AUDIO_MODES,
            f"audio_mode must be one of {', '.join(AUDIO_MODES)}. Received: audio_mode={self.audio_mode!r}",
        )

    def check_output(self, out: str) -> None:
        """Checks `out` against these settings (format, audio) and creates its folder."""
        ext = output_format(out)
        if self.audio is not None:
            from sdanim.audio import read_wav

            check(ext != ".gif", f"a GIF cannot carry audio; write .mp4 or .webm. Received: out={out!r}")
            read_wav(self.audio)
        ensure_folder(os.path.dirname(os.path.abspath(out)), "out")


def get_model(model, settings: RenderSettings):
    """The model to render `settings` with: `model` itself if it is a loaded model
    (checked against the size), loaded from it if it is a `ModelSpec`, or the default
    `ModelSpec()` (KerasCV's weights) if None; a function is called to build one."""
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


def prompt_encoder(model) -> PromptEncoder:
    """The model's prompt encoder, created once so prompts are encoded once per model."""
    encoder = getattr(model, "_sdanim_prompt_encoder", None)
    if encoder is None:
        encoder = PromptEncoder(model.tokenizer, model.text_encoder)
        model._sdanim_prompt_encoder = encoder
    return encoder


def embed_prompt(model, prompt) -> np.ndarray:
    """(77, D) embedding of a prompt or a weighted mix (see `sdanim.keyframes`)."""
    return mix_embeddings(normalize_prompt(prompt), prompt_encoder(model).encode)


def prompt_record(prompt):
    """A prompt or mix as JSON-friendly data (manifests, PNG metadata)."""
    prompt = normalize_prompt(prompt)
    return prompt if isinstance(prompt, str) else [list(p) for p in prompt]


def model_text(model) -> dict:
    """What PNG metadata records about the model: its LoRAs, where it has any."""
    return lora_text(getattr(model, "lora_records", None))


def lora_text(records) -> dict:
    """{"loras": records} where there are any, else {} (PNG metadata, manifests)."""
    return {"loras": list(records)} if records else {}


def make_renderer(model, settings: RenderSettings, negative_prompt: Optional[str] = None, strength: float = 1.0) -> Renderer:
    """A `Renderer` over the model's UNet and decoder, the negative prompt encoded once."""
    uncond = prompt_encoder(model).encode_one(negative_prompt or "")  # (77, D)
    return Renderer(
        model.diffusion_model, model.decoder, settings, uncond,
        jit_compile=bool(getattr(model, "jit_compile", False)), strength=strength,
    )


def model_record(model) -> dict:
    """What a manifest records about the model (what changes the frames)."""
    describe = getattr(model, "describe", None)
    record = describe() if describe else {"height": model.height, "width": model.width}
    record.pop("jit_compile", None)  # does not change the frames
    return record


def render_record(settings: RenderSettings) -> dict:
    record = dataclasses.asdict(settings)
    record.pop("batch_size")  # frames are batch-invariant
    return record


@dataclasses.dataclass(frozen=True)
class FrameJob:
    """The frames of one walk: everything but the model that decides them.

    Args:
        walk: `Walk`. Keyframes, loop, interpolation, noise.
        settings: `RenderSettings`.
        negative_prompt: str or None.
        positions: tuple of float or None. Each frame's position along the keyframe
            path (uniform spacing and audio timing place them); None: the walk's own.
    """

    walk: Walk
    settings: RenderSettings
    negative_prompt: Optional[str] = None
    positions: Optional[tuple] = None

    def frame_positions(self) -> np.ndarray:
        if self.positions is not None:
            return np.asarray(self.positions, dtype=np.float64)
        return self.walk.positions()

    def __len__(self) -> int:
        return len(self.frame_positions())

    @property
    def key(self) -> str:
        """A digest of what decides the frames (batch size aside)."""
        record = {
            "walk": self.walk.record(), "render": render_record(self.settings),
            "negative_prompt": self.negative_prompt,
            "positions": None if self.positions is None else [float(u) for u in self.positions],
        }
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()

    def plan(self, model) -> FramePlan:
        """Prompts -> embeddings; keyframes + noise -> the frame plan."""
        encoder = prompt_encoder(model)
        embeddings = np.stack([mix_embeddings(k.prompt, encoder.encode) for k in self.walk.stops])  # (K, 77, D)
        seeds = self.walk.noise_seeds()
        noises = np.stack([seeded_noise(s, self.settings.latent_shape) for s in seeds])  # (K or 2, h, w, 4)
        if self.walk.noise == "circle":
            noise_mode = "circle"
        else:
            noise_mode = "fixed" if len(set(seeds)) == 1 else "slerp"
        return FramePlan(embeddings, noises, seeds, self.frame_positions(), self.walk.interpolation, noise_mode)

    def renderer(self, model) -> Renderer:
        return make_renderer(model, self.settings, self.negative_prompt)

    def frame_text(self, index: int) -> dict:
        """PNG metadata of one frame: enough to reproduce it."""
        u = float(self.frame_positions()[index])
        return {"frame": index, "position": u, "walk": self.walk.record(), "render": dataclasses.asdict(self.settings)}


class LocalFrames:
    """Renders frame jobs with a model in this process (the default frame source).

    A frame source has `describe()` (the model's manifest record) and
    `render(job, indices, store=None, progress=True) -> {index: image}`; with a store,
    each batch is written to it as soon as it exists.
    """

    def __init__(self, model):
        self.model = model
        self._prepared: Optional[tuple] = None  # (job key, plan, renderer)

    def describe(self) -> dict:
        return model_record(self.model)

    def prepare(self, job: FrameJob):
        """(plan, renderer) of `job`, kept for the next call with the same job."""
        if self._prepared is None or self._prepared[0] != job.key:
            self._prepared = (job.key, job.plan(self.model), job.renderer(self.model))
        return self._prepared[1:]

    def render(self, job: FrameJob, indices: Iterable[int], store: Optional[FrameStore] = None,
               progress: bool = True, on_batch: Optional[Callable] = None) -> dict:
        plan, renderer = self.prepare(job)

        def save(batch, images):
            if store is not None:
                for index, image in zip(batch, images):
                    store.write(index, image, {"sdanim": {**job.frame_text(index), **model_text(self.model)}})
            if on_batch is not None:
                on_batch(batch, images)

        return render_frames(renderer, plan, indices, job.settings.batch_size, on_batch=save, progress=progress)

    def close(self) -> None:
        """Nothing to release: the model belongs to the caller."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def frame_source(model, settings: RenderSettings, workers=None):
    """Where a run's frames are rendered: in this process (`workers` None) with
    `get_model(model, settings)`, or on Ray workers (`workers`: a count or a
    `sdanim.distributed.Workers`), each loading its own model from `model` (a
    `ModelSpec`, None for the default, or a function that builds a model)."""
    if workers is None:
        return LocalFrames(get_model(model, settings))
    from sdanim.distributed import RayFrames, Workers

    return RayFrames(model, settings, workers if isinstance(workers, Workers) else Workers(count=workers))


def open_run_folder(folder: str, manifest: dict, overwrite: bool):
    """Opens a run's frames folder, refusing to mix frames of a different run.

    Returns the store and the stored manifest of the same run (None if new)."""
    store = FrameStore(ensure_folder(folder, "out"))
    for stale in glob.glob(os.path.join(folder, ".frame_*.partial*")):
        os.remove(stale)  # a write cut short by a kill (the frame itself was never renamed in)
    stored = store.read_manifest()
    has_frames = bool(glob.glob(os.path.join(folder, "frame_*.png")))
    if overwrite:
        for path in glob.glob(os.path.join(folder, "frame_*.png")):
            os.remove(path)
    elif stored is not None:
        diffs = manifest_differences(stored, manifest, RUN_KEYS)
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
    import importlib.metadata as md

    found = {}
    for name in ("keras", "keras-cv", "tensorflow-cpu", "tensorflow", "jax", "torch", "numpy"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    try:
        import keras

        found["keras_backend"] = keras.backend.backend()
    except ImportError:  # pragma: no cover
        pass
    return found


__all__ = [
    "ModelSpec", "ExportSettings", "FrameJob", "LocalFrames", "frame_source", "get_model", "prompt_encoder", "embed_prompt",
    "prompt_record", "make_renderer", "model_record", "render_record", "open_run_folder", "versions",
]
