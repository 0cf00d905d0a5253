"""Sampling a clip with motion modules: a window at a step is the unit of work
(docs/architecture.md, "Motion modules").

At step i every frame's latent is known; each window's frames go through the motion UNet
together (classifier-free guidance: the window's negative rows and its conditional rows,
two clips of one call), and its prediction is added, weighted, to a per-frame sum, in
window order. When every window has run, each frame's prediction is its weighted mean and
the sampler steps all frames at once. A unit's result is a pure function of (the clip,
the step's latents, the window), so

- a run's state (step, next window, latents, the sampler's previous prediction and the
  partial sums) saved after any unit and loaded again gives the same frames bit for bit
  as a run never stopped (`ClipState`, written to a temporary name and renamed);
- memory is one window's UNet call plus every frame's latent, whatever the length.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Optional

import numpy as np
from tqdm.auto import tqdm

from sdanim.config.errors import SdanimError, check
from sdanim.config.motion import MotionSpec
from sdanim.core.noise import step_noise
from sdanim.core.runtime import keras_ops
from sdanim.core.schedulers import Scheduler, make_scheduler, timestep_embedding
from sdanim.core.windows import context_windows, coverage, free_noise, fusion_weights, window_weights
from sdanim.formats.digest import data_key, weights_sha256
from sdanim.formats.motion_files import inspect_motion_module
from sdanim.model.compiled import compiled
from sdanim.model.motion import motion_modules_for, motion_unet
from sdanim.render.jobs import FrameJob, frame_metadata, model_record
from sdanim.render.sampling import control_residuals
from sdanim.render.store import STATE_FILE, FrameStore

STATE_VERSION = 1


@dataclasses.dataclass
class Clip:
    """What sampling a clip needs besides the model.

    contexts: (F, 77, D) each frame's conditional text context (prompt travel).
    negatives: (F, 77, D) each frame's negative context.
    noise: (F, h, w, 4) the initial noise (`sdanim.core.windows.free_noise`).
    windows: list of int arrays, the context windows (`context_windows`), all one length.
    weighting: "pyramid" or "flat".
    guidance: classifier-free guidance scale (1: the conditional rows alone).
    seed: the clip's seed, for samplers that draw noise at every step.
    key: a digest of everything above and the model (a saved state of another clip is
        never resumed).
    attention_windows, attention_weights: where the windows are blended inside the motion
        modules' attention (MotionSpec.blend "attention"): those windows and their
        `fusion_weights`, `windows` then being one of all the frames; None where the
        UNet's predictions are blended.
    """

    contexts: np.ndarray
    negatives: np.ndarray
    noise: np.ndarray
    windows: list
    weighting: str
    guidance: float
    seed: int
    key: str
    attention_windows: Optional[list] = None
    attention_weights: Optional[list] = None

    def __post_init__(self):
        frames = len(self.noise)
        check(len(self.contexts) == frames and len(self.negatives) == frames,
              f"a clip needs one context and one negative context per frame. Received: {len(self.contexts)} and "
              f"{len(self.negatives)} for {frames} frames")
        lengths = {len(w) for w in self.windows}
        check(len(lengths) == 1, f"a clip's windows are all one length. Received: lengths {sorted(lengths)}")
        check(bool(np.all(coverage(frames, self.windows, self.weighting) > 0)),
              "every frame of a clip must be in a window")

    @property
    def window_length(self) -> int:
        return len(self.windows[0])


@dataclasses.dataclass
class ClipState:
    """Where a clip's sampling stands: before window `window` of step `step`."""

    step: int
    window: int
    latents: np.ndarray
    sums: np.ndarray
    previous: Optional[np.ndarray] = None  # the sampler's previous denoised prediction

    def save(self, path: str, key: str) -> None:
        """Writes the state atomically (a temporary name, then a rename)."""
        part = f"{path}.{os.getpid()}.part"
        arrays = {"latents": self.latents, "sums": self.sums,
                  "meta": np.array([STATE_VERSION, self.step, self.window], np.int64),
                  "key": np.frombuffer(key.encode(), np.uint8)}
        if self.previous is not None:
            arrays["previous"] = self.previous
        with open(part, "wb") as f:
            np.savez(f, **arrays)
        os.replace(part, path)

    @classmethod
    def load(cls, path: str, key: str) -> Optional["ClipState"]:
        """The state saved for this clip, or None where there is none (another clip's
        state, or an unreadable file, is refused: never silently reused)."""
        if not os.path.exists(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                saved_key = bytes(data["key"]).decode()
                version, step, window = (int(v) for v in data["meta"])
                state = cls(step, window, data["latents"].copy(), data["sums"].copy(),
                            data["previous"].copy() if "previous" in data.files else None)
        except (OSError, ValueError, KeyError) as error:
            raise SdanimError(f"the saved motion state cannot be read ({error}); remove it to start the clip again. "
                              f"Received: {path}") from None
        if saved_key != key or version != STATE_VERSION:
            raise SdanimError(f"the saved motion state is another clip's (other prompts, settings or weights); "
                              f"pass overwrite to start again. Received: {path}")
        return state


def window_eps(eps_fn: Callable, clip: Clip, i: int, t: float, w: int, latents: np.ndarray) -> np.ndarray:
    """A unit of work: window `w`'s noise prediction at step i (timestep t) from its frames'
    scaled latents, with classifier-free guidance."""
    window = clip.windows[w]
    n = len(window)
    t_emb = timestep_embedding(t).astype(np.float32)
    if clip.guidance == 1.0:  # the conditional rows alone (as the renderer: any other scale guides)
        return eps_fn(latents, np.repeat(t_emb[None], n, axis=0), clip.contexts[window], window=window, step=i)
    rows = np.concatenate([latents, latents])
    contexts = np.concatenate([clip.negatives[window], clip.contexts[window]])
    eps = eps_fn(rows, np.repeat(t_emb[None], 2 * n, axis=0), contexts, window=window, step=i)
    unconditional, conditional = eps[:n], eps[n:]
    return unconditional + clip.guidance * (conditional - unconditional)


def sample_clip(eps_fn: Optional[Callable], clip: Clip, scheduler: Scheduler, state_path: Optional[str] = None,
                save_every: float = 30.0, on_unit: Optional[Callable] = None,
                step_windows: Optional[Callable] = None) -> np.ndarray:
    """The clip's final latents (F, h, w, 4).

    eps_fn: (latents (2n or n, h, w, 4), t_emb, contexts, window=, step=) -> eps, the
        motion UNet on one window's rows (clip-major: the negative clip, then the
        conditional one); `window` (the frames' indices) and `step` for what varies with
        them (ControlNet hints and schedules).
    state_path: where the state is saved (after every step, and after a unit when
        `save_every` seconds have passed since the last save) and resumed from.
    on_unit: callable (step, window) after each unit (progress; an exception it raises
        stops the run, and the state saved last resumes it).
    step_windows: callable (step, t, window numbers, the step's scaled latents) -> each
        of those windows' guided predictions (`window_eps`), in order: where a step's
        windows are computed elsewhere and at once (Ray workers). None: here, one after
        another, with `eps_fn`. The sums are added in window order either way, so the
        frames do not depend on where the windows ran.
    """
    frames = len(clip.noise)
    weights = window_weights(clip.window_length, clip.weighting)
    total = coverage(frames, clip.windows, clip.weighting)[:, None, None, None]
    state = ClipState.load(state_path, clip.key) if state_path else None
    if state is None:
        state = ClipState(0, 0, (clip.noise * scheduler.init_noise_sigma).astype(np.float32),
                          np.zeros_like(clip.noise, dtype=np.float32))
    saved = time.monotonic()
    noises = None
    if scheduler.needs_noise:  # each frame's per-step noise, from the clip's seed and the frame
        seeds = [int(np.random.SeedSequence([clip.seed, f]).generate_state(1, np.uint64)[0] >> 1) for f in range(frames)]
        noises = np.stack([step_noise(s, scheduler.num_steps, clip.noise.shape[1:]) for s in seeds], axis=1)
    if step_windows is None:
        def step_windows(i, t, numbers, scaled):
            return (window_eps(eps_fn, clip, i, t, w, scaled[clip.windows[w]]) for w in numbers)  # lazily, in turn
    while state.step < scheduler.num_steps:
        i = state.step
        scaled = state.latents * scheduler.input_scale(i)
        numbers = range(state.window, len(clip.windows))
        for w, eps in zip(numbers, step_windows(i, float(scheduler.timesteps[i]), numbers, scaled)):
            np.add.at(state.sums, clip.windows[w], weights[:, None, None, None] * np.asarray(eps, np.float32))
            state.window = w + 1
            if state_path and time.monotonic() - saved >= save_every:
                state.save(state_path, clip.key)
                saved = time.monotonic()
            if on_unit is not None:
                on_unit(i, state.window - 1)
        eps = state.sums / total
        x_next, denoised = scheduler.step(i, state.latents, eps, state.previous,
                                          None if noises is None else noises[i])
        state = ClipState(i + 1, 0, np.asarray(x_next, np.float32), np.zeros_like(state.sums),
                          np.asarray(denoised, np.float32))
        if state_path:
            state.save(state_path, clip.key)
            saved = time.monotonic()
    return state.latents


def check_motion(spec: MotionSpec, frames: int, version) -> None:
    """What can be checked before a model is built: the SD version where it is known, the
    file (read, not loaded: one line for anything but motion modules) and the window
    against its position encoding."""
    check(version is None or str(version).startswith("1"),
          f"motion modules are for SD 1.x (AnimateDiff's; none exist for SD 2.x or SD3). Received: model version {version}")
    if spec.file == "random":
        return
    file = inspect_motion_module(spec.file)
    window = min(spec.context, frames)
    check(window <= file.positions, f"context must be at most {file.positions} frames for these motion modules "
                                    f"({file.describe()}). Received: context={spec.context}")


def motion_record(spec: MotionSpec) -> dict:
    """What a run's manifest keeps of its motion modules (the file by its SHA-256)."""
    sha = None if spec.file == "random" else weights_sha256(spec.file)
    return {"file": spec.file, "sha256": sha, "context": spec.context, "stride": spec.stride,
            "weighting": spec.weighting, "norm": spec.norm, "blend": spec.blend, "betas": spec.betas}


def clip_for(model, job: FrameJob, spec: MotionSpec, renderer, plan=None) -> Clip:
    """The clip of a walk: each frame's context from the frame plan (prompt travel), its
    negative context (interpolated between keyframes' negative prompts where the walk has
    any, else the run's negative prompt), FreeNoise's noise from the first keyframe's
    seed, and the windows (closed when the walk loops)."""
    plan = job.plan(model) if plan is None else plan
    frames = len(job)
    inputs = [plan.frame(i) for i in range(frames)]
    contexts = np.stack([f.context for f in inputs]).astype(np.float32)
    if inputs[0].negative is not None:
        negatives = np.stack([f.negative for f in inputs]).astype(np.float32)
    else:
        negatives = np.repeat(renderer.unconditional_context[None], frames, axis=0)
    seed = int(job.walk.noise_seeds()[0])
    context = min(spec.context, frames)
    noise = free_noise(seed, frames, context, spec.stride, job.settings.latent_shape)
    windows = context_windows(frames, context, spec.stride, closed=job.walk.loop and frames > context)
    attention = fusion = None
    if spec.blend == "attention" and len(windows) > 1:
        windows, attention = [np.arange(frames)], windows
        fusion = fusion_weights(frames, attention, spec.stride, spec.weighting)
    key = data_key(job.key, motion_record(spec), model_record(model), length=32)
    return Clip(contexts, negatives, noise, windows, spec.weighting, float(job.settings.guidance_scale), seed, key,
                attention, fusion)


def _motion_eps(calls, latents, t_emb, contexts):
    """One window's rows through the motion UNet (compiled by `compiled`)."""
    return calls[0]([latents, t_emb, contexts])


def _motion_control_eps(units: tuple, guided: bool) -> Callable:
    """One window's rows through the motion UNet with the ControlNets' residuals
    (`sampling.control_residuals`: guess mode, pooled nets, several nets summed), as the
    renderer's controlled step makes them. Under guidance the rows are (negative clip,
    conditional clip), the nets seeing the frame's hint on both halves."""

    def eps(calls, latents, t_emb, contexts, uncond, hints, scales):
        ops = keras_ops()
        m = {f"net{k}": call for k, call in enumerate(calls[1:])}
        residuals = control_residuals(m, units, latents, t_emb, contexts, uncond if guided else None,
                                       (hints, scales, [None] * len(units)))
        if guided:
            latents, t_emb = ops.concatenate([latents, latents], 0), ops.concatenate([t_emb, t_emb], 0)
            contexts = ops.concatenate([uncond, contexts], axis=0)
        return calls[0]([latents, t_emb, contexts, *residuals])

    eps.__name__ = f"motion_control_eps_{int(guided)}_" + "".join(f"{int(g)}{int(p)}" for g, p in units)
    return eps


def _eps_fn(unet, renderer, plan, jit_compile: bool) -> Callable:
    """The window's eps as `sample_clip` calls it: the compiled motion UNet, with the
    renderer's ControlNets (each frame's hints and scales from the frame plan, each net's
    schedule at the step) where it has any."""
    ops = keras_ops()
    if not renderer.controls:
        program = compiled(_motion_eps, (unet,), jit_compile)  # traced once per model
        return lambda latents, t_emb, contexts, window, step: ops.convert_to_numpy(program(latents, t_emb, contexts))
    units = tuple((bool(c.guess_mode), bool(c.net.pooled)) for c in renderer.controls)
    nets = tuple(c.net.net for c in renderer.controls)
    keeps = np.stack([c.keeps(renderer.scheduler.num_steps) for c in renderer.controls], axis=1)  # (N, n)
    programs = {guided: compiled(_motion_control_eps(units, guided), (unet, *nets), jit_compile)
                for guided in (False, True)}

    def eps(latents, t_emb, contexts, window, step):
        n = len(window)
        frames = [plan.frame(int(j)).control for j in window]
        hints = tuple(np.stack([f[k][0] for f in frames]).astype(np.float32) for k in range(len(nets)))
        scales = np.array([[f[k][1] * keeps[step, k] for f in frames] for k in range(len(nets))], np.float32)
        if len(latents) == 2 * n:  # (negative clip, conditional clip)
            out = programs[True](latents[:n], t_emb[:n], contexts[n:], contexts[:n], hints, scales)
        else:
            out = programs[False](latents, t_emb, contexts, contexts, hints, scales)
        return ops.convert_to_numpy(out)

    return eps


class MotionRun:
    """A walk's clip prepared on a model: the frame plan, the clip (`clip_for`), the motion
    UNet with the renderer's ControlNets, and what a unit of work computes with them.

    Args:
        model: the SD 1.x model.
        job: the walk's `FrameJob`.
        spec: `MotionSpec`.
        plan, renderer: the job's, where the caller has them (else made here).
    """

    def __init__(self, model, job: FrameJob, spec: MotionSpec, plan=None, renderer=None):
        self.renderer = job.renderer(model) if renderer is None else renderer
        self.plan = job.plan(model) if plan is None else plan
        self.clip = clip_for(model, job, spec, self.renderer, self.plan)
        unet = motion_unet(model.diffusion_model, motion_modules_for(model, spec), self.clip.window_length,
                           self.clip.attention_windows, self.clip.attention_weights, spec.spatial_chunk)
        self.eps_fn = _eps_fn(unet, self.renderer, self.plan, bool(getattr(model, "jit_compile", False)))

    def window_eps(self, i: int, t: float, w: int, latents: np.ndarray) -> np.ndarray:
        """Window `w`'s guided prediction at step i (see `window_eps`)."""
        return window_eps(self.eps_fn, self.clip, i, t, w, latents)


def render_clip(clip: Clip, job: FrameJob, spec: MotionSpec, store: FrameStore, record: dict,
                step_windows: Optional[Callable], decode: Callable, progress: bool = True,
                on_batch: Optional[Callable] = None, eps_fn: Optional[Callable] = None) -> dict:
    """Samples `clip` (or resumes it from the state its folder keeps) and writes the frames
    not on disk: {index: image} of the frames written now.

    step_windows, eps_fn: where the units run (`sample_clip`).
    decode: callable (list of index batches, the clip's latents) -> each batch's images, in
        order.
    on_batch(indices, images): after each decoded batch, and with no frames after each
        window of each step (progress; an exception it raises stops the run, the state
        saved last resuming it).
    """
    todo = store.missing(range(len(job)))
    scheduler = make_scheduler(job.settings.scheduler, job.settings.num_steps, spec.betas)

    def unit_done(_step, _window):
        bar.update(1)
        if on_batch is not None:
            on_batch([], [])

    with tqdm(total=scheduler.num_steps * len(clip.windows), desc="windows x steps", unit="unit",
              disable=not progress) as bar:
        latents = sample_clip(eps_fn, clip, scheduler, state_path=os.path.join(store.folder, STATE_FILE),
                              on_unit=unit_done, step_windows=step_windows)
    size = max(1, job.settings.batch_size)
    batches = [todo[start:start + size] for start in range(0, len(todo), size)]
    images = {}
    for batch, decoded in zip(batches, decode(batches, latents)):
        for index, image in zip(batch, decoded):
            store.write(index, image, frame_metadata(job, index, record))
            images[index] = image
        if on_batch is not None:
            on_batch(batch, decoded)
    return images


def render_motion(model, job: FrameJob, spec: MotionSpec, store: FrameStore, plan=None, renderer=None,
                  progress: bool = True, on_batch: Optional[Callable] = None) -> dict:
    """Renders a walk's frames with motion modules into `store`, in this process:
    `render_clip` with the units and the decoding here."""
    if not store.missing(range(len(job))):
        return {}
    run = MotionRun(model, job, spec, plan, renderer)
    decode = lambda batches, latents: (run.renderer.decode(latents[batch]) for batch in batches)  # noqa: E731
    return render_clip(run.clip, job, spec, store, model_record(model), None, decode, progress, on_batch,
                       eps_fn=run.eps_fn)


__all__ = ["Clip", "ClipState", "MotionRun", "STATE_FILE", "check_motion", "clip_for", "motion_record", "render_clip",
           "render_motion", "sample_clip", "window_eps"]
