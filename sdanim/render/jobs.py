"""Jobs: the frames of a run, everything but the model that decides them.

A job is small and picklable, so Ray workers get it as it is: whoever holds a model
turns it into the same frame plan and renderer, so frame i is the same image wherever it
is rendered. Every job implements `Job`; every frame source renders any `Job`.

    FrameJob       a walk through keyframes (morphs, walk files, circles)
    ImageMorphJob  a morph between two images (latents interpolated, redrawn at a strength)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from sdanim.config.errors import check
from sdanim.config.settings import RenderSettings
from sdanim.core.keyframes import Walk, mix_embeddings, normalize_prompt
from sdanim.core.noise import seeded_noise
from sdanim.core.plan import FramePlan, ImagePlan
from sdanim.core.runtime import keras_ops
from sdanim.model.controlnet import controlnets_for
from sdanim.model.sd3 import check_sampler, timestep_input
from sdanim.model.stable_diffusion import lora_text, prompt_encoder
from sdanim.render.control import control_record
from sdanim.render.sampling import Renderer


@runtime_checkable
class Job(Protocol):
    """What a frame source needs of a job (`LocalFrames`, `RayFrames` render any Job)."""

    settings: RenderSettings

    def __len__(self) -> int: ...

    @property
    def key(self) -> str:
        """A digest of what decides the frames (batch size aside)."""

    def plan(self, model):
        """The frame plan: frame i is a pure function of (plan, i)."""

    def renderer(self, model) -> Renderer:
        """The renderer for the plan's frames."""

    def frame_text(self, index: int) -> dict:
        """PNG metadata of frame `index`: enough to reproduce it."""


def embed_prompt(model, prompt) -> np.ndarray:
    """(77, D) embedding of a prompt or a weighted mix (see `sdanim.core.keyframes`)."""
    return mix_embeddings(normalize_prompt(prompt), prompt_encoder(model).encode)


def prompt_record(prompt):
    """A prompt or mix as JSON-friendly data (manifests, PNG metadata)."""
    prompt = normalize_prompt(prompt)
    return prompt if isinstance(prompt, str) else [list(p) for p in prompt]


def render_record(settings: RenderSettings) -> dict:
    """What a manifest records about the sampling (batch size aside: frames do not depend on it)."""
    record = settings.record()
    record.pop("batch_size")
    return record


def model_record(model) -> dict:
    """What a manifest records about the model (what changes the frames)."""
    describe = getattr(model, "describe", None)
    record = describe() if describe else {"height": model.height, "width": model.width}
    record.pop("jit_compile", None)  # does not change the frames
    return record


def model_text(model) -> dict:
    """What PNG metadata records about a loaded model: its LoRAs, where it has any."""
    return lora_text(getattr(model, "lora_records", None))


def frame_metadata(job: Job, index: int, model: dict) -> dict:
    """The PNG text of frame `index`, the same from every frame source: the job's record
    of the frame and the model's LoRAs (`model` is the model's manifest record)."""
    return {"sdanim": {**job.frame_text(index), **lora_text(model.get("loras"))}}


def make_renderer(model, settings: RenderSettings, negative_prompt: Optional[str] = None, strength: float = 1.0,
                  controls: Sequence = ()) -> Renderer:
    """A `Renderer` over the model's UNet and decoder (TAESD's where settings.decoder is
    "tiny"), the negative prompt encoded once; with `controls` (`ControlInput`s), their
    ControlNets built for the model (once per model)."""
    check_sampler(getattr(model, "version", None), settings.scheduler)
    uncond = prompt_encoder(model).encode_one(negative_prompt or "")  # (77, D)
    decoder = model.tiny_decoder if settings.decoder == "tiny" else model.decoder
    units = controlnets_for(model, [c.spec for c in controls]) if controls else ()
    return Renderer(
        model.diffusion_model, decoder, settings, uncond,
        jit_compile=bool(getattr(model, "jit_compile", False)), strength=strength, controls=units,
        **({"timestep_input": timestep_input} if getattr(model, "family", None) == "sd3" else {}),
    )


def latent_shape(model, settings: RenderSettings) -> tuple:
    """(H/8, W/8, C) of one frame's latent: C = 4 for SD 1.x/2.x, 16 for SD3."""
    h, w, _ = settings.latent_shape
    return (h, w, int(getattr(model, "latent_channels", 4)))


def encode_images(model, images: np.ndarray, batch_size: int = 1) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, H/8, W/8, 4) float32 latents with the model's VAE
    encoder (KerasCV's `ImageEncoder`: the posterior mean, scaled by 0.18215)."""
    ops = keras_ops()
    encoder = model.image_encoder
    check(encoder is not None, "this model has no image encoder, which image-to-image and inpainting need")
    x = np.asarray(images, np.float32) / 127.5 - 1.0  # uint8 -> [-1, 1]
    out = []
    for i in range(0, len(x), batch_size):
        chunk = x[i : i + batch_size]
        out.append(ops.convert_to_numpy(ops.cast(encoder.predict_on_batch(chunk), "float32")))
    return np.concatenate(out)


@dataclasses.dataclass(frozen=True)
class FrameJob:
    """The frames of one walk: everything but the model that decides them.

    Args:
        walk: `Walk`. Keyframes, loop, interpolation, noise.
        settings: `RenderSettings`.
        negative_prompt: str or None.
        positions: tuple of float or None. Each frame's position along the keyframe
            path (uniform spacing and audio timing place them); None: the walk's own.
        controls: tuple of `sdanim.render.control.ControlInput`: ControlNets and their
            hints over the frames. Defaults to none.
    """

    walk: Walk
    settings: RenderSettings
    negative_prompt: Optional[str] = None
    positions: Optional[tuple] = None
    controls: tuple = ()

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
            **control_record(self.controls),
        }
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()

    def plan(self, model) -> FramePlan:
        """Prompts -> embeddings; keyframes + noise -> the frame plan."""
        encoder = prompt_encoder(model)
        embeddings = np.stack([mix_embeddings(k.prompt, encoder.encode) for k in self.walk.stops])  # (K, 77, D)
        seeds = self.walk.noise_seeds()
        noises = np.stack([seeded_noise(s, latent_shape(model, self.settings)) for s in seeds])  # (K or 2, h, w, C)
        if self.walk.noise == "circle":
            noise_mode = "circle"
        else:
            noise_mode = "fixed" if len(set(seeds)) == 1 else "slerp"
        guides = None
        transitions = self.walk.stops[:-1]
        if any(k.guide is not None for k in transitions):  # PAID: a guide prompt per transition, NaN: none
            guides = np.stack([mix_embeddings(k.guide, encoder.encode) if k.guide is not None
                               else np.full_like(embeddings[0], np.nan) for k in transitions])  # (K - 1, 77, D)
        negatives = None
        if any(k.negative is not None for k in self.walk.stops):  # per-keyframe negative prompts
            negatives = np.stack([mix_embeddings(k.negative if k.negative is not None else (self.negative_prompt or ""),
                                                 encoder.encode) for k in self.walk.stops])  # (K, 77, D)
        return FramePlan(embeddings, noises, seeds, self.frame_positions(), self.walk.interpolation, noise_mode,
                         guides, self.walk.attention, self.walk.attention_warmup, tuple(c.hints for c in self.controls),
                         negatives)

    def renderer(self, model) -> Renderer:
        return make_renderer(model, self.settings, self.negative_prompt, controls=self.controls)

    def frame_text(self, index: int) -> dict:
        """PNG metadata of one frame: enough to reproduce it."""
        u = float(self.frame_positions()[index])
        return {"frame": index, "position": u, "walk": self.walk.record(), "render": self.settings.record(),
                **control_record(self.controls)}


@dataclasses.dataclass(frozen=True, eq=False)
class ImageMorphJob:
    """An image morph's frames, everything but the model: small enough to send to Ray
    workers, each of which turns it into the same `ImagePlan`.

    Args:
        pixels: (2, H, W, 3) uint8, the two images fitted to the settings' size.
        prompt: str or mix guiding the redraw.
        seed: int. The one noise seed of every frame.
        positions: F floats in [0, 1], frame i's place between the images.
        strength: float in (0, 1].
        interpolation: "slerp" or "linear", between the latents.
        settings: `RenderSettings`.
        negative_prompt: str or None.
        controls: tuple of `ControlInput`, as `FrameJob`'s.
    """

    pixels: np.ndarray
    prompt: object
    seed: int
    positions: tuple
    strength: float
    interpolation: str
    settings: RenderSettings
    negative_prompt: Optional[str] = None
    controls: tuple = ()

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def key(self) -> str:
        digest = hashlib.sha256(np.ascontiguousarray(self.pixels).tobytes())
        digest.update(json.dumps([prompt_record(self.prompt), self.seed, list(self.positions), self.strength,
                                  self.interpolation, self.settings.record(), self.negative_prompt,
                                  control_record(self.controls)], sort_keys=True).encode())
        return digest.hexdigest()

    def plan(self, model) -> ImagePlan:
        latents = encode_images(model, self.pixels)  # (2, h, w, 4)
        return ImagePlan(embed_prompt(model, self.prompt), latents, tuple([self.seed] * len(self)),
                         np.asarray(self.positions, dtype=np.float64), interpolation=self.interpolation,
                         controls=tuple(c.hints for c in self.controls))

    def renderer(self, model) -> Renderer:
        return make_renderer(model, self.settings, self.negative_prompt, strength=self.strength,
                             controls=self.controls)

    def frame_text(self, index: int) -> dict:
        return {"tool": "image_morph", "frame": index, "position": float(self.positions[index]),
                **control_record(self.controls)}
