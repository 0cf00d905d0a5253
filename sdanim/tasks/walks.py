"""Animations: `morph` (prompt to prompt), `animate` (any keyframe walk) and
`image_morph` (between two images), on the shared run set-up of `sdanim.render.run`.

    prompts -> embeddings -> keyframes + noise -> frame plan -> batched sampling
            -> frames on disk -> export

Every check that needs no model runs first, before any model is built: front-ends
hand over specs and settings and print the message.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional, Sequence

import numpy as np

from sdanim.config import __version__
from sdanim.config.choices import INTERPOLATIONS, MORPH_NOISES
from sdanim.config.control import ControlNetSpec
from sdanim.config.errors import check
from sdanim.config.export import ExportSettings
from sdanim.config.limits import Limits
from sdanim.config.motion import MotionSpec
from sdanim.config.settings import RenderSettings
from sdanim.core import audio as audio_lib
from sdanim.core.interpolation import check_easing, split_frames
from sdanim.core.keyframes import Walk, normalize_prompt, walk_from_prompts
from sdanim.core.noise import check_seed
from sdanim.core.pixels import fit_image
from sdanim.core.smoothness import consecutive_distances, smoothness_report
from sdanim.core.spacing import beta_positions, check_spacing, uniform_positions
from sdanim.core.schedulers import steps_for_strength
from sdanim.formats.audio import analyze_audio, read_audio
from sdanim.formats.digest import file_sha256
from sdanim.formats.images import load_image
from sdanim.model.sd3 import is_sd3
from sdanim.render.export import blend_double, check_output, contact_sheet, write_video
from sdanim.render.control import control_record, prepare_controls
from sdanim.render.jobs import FrameJob, ImageMorphJob, render_record
from sdanim.render.motion import check_motion, motion_record
from sdanim.render.ray import check_workers_args
from sdanim.render.run import frame_source, known_version, open_run_folder, tiny_decoder_available, versions
from sdanim.render.plots import audio_figure, save_figure
from sdanim.render.post import PostProcess, check_post, post_process, sequence
from sdanim.render.store import FrameStore, PngSequence, ensure_folder, write_png


@dataclasses.dataclass
class MorphResult:
    """What `morph` made."""

    frames: np.ndarray  # (F, H, W, 3) uint8
    out: str  # the GIF or MP4
    frames_dir: str  # PNG frames and manifest.json
    sheet: Optional[str]  # contact sheet PNG, if asked for
    rendered: int  # frames rendered by this call (the rest were already on disk)
    seconds: float  # wall time of this call, model loading excluded
    smoothness: dict  # consecutive-frame distances and their spread (sdanim.smoothness)
    audio_plot: Optional[str] = None  # <out stem>_audio.png: the audio's strength and the walk's speed
    tempo: Optional[float] = None  # beats per minute found in the audio (audio timing only)


def check_morph_args(prompts, out, frames, seed, interpolation="slerp", noise="fixed", seeds=None,
                     export: Optional[ExportSettings] = None):
    """Checks morph's arguments (cheap; before any model is built) and creates the
    output folder. Returns (intervals per transition, per-keyframe seeds)."""
    check(len(prompts) >= 2, f"morph needs at least 2 prompts. Received: {len(prompts)} prompt(s)")
    for p in prompts:
        normalize_prompt(p, "prompts")
    intervals = split_frames(frames, len(prompts) - 1)
    check_output(export or ExportSettings(), out)
    check(interpolation in INTERPOLATIONS,
          f"interpolation must be one of {', '.join(INTERPOLATIONS)}. Received: interpolation={interpolation!r}")
    check(noise in MORPH_NOISES, f"noise must be one of {', '.join(MORPH_NOISES)}. Received: noise={noise!r}")
    seed = check_seed(seed)
    if noise == "fixed":
        check(seeds is None, "seeds (per prompt) only apply with noise='slerp'. Received: noise='fixed'")
        keyframe_seeds = [seed] * len(prompts)
    else:
        keyframe_seeds = list(seeds) if seeds is not None else [seed + k for k in range(len(prompts))]
        check(
            len(keyframe_seeds) == len(prompts),
            f"seeds needs one seed per prompt ({len(prompts)}). Received: seeds={keyframe_seeds}",
        )
        keyframe_seeds = [check_seed(s, "seeds") for s in keyframe_seeds]
    return intervals, keyframe_seeds


def morph(
    prompts: Sequence,
    out: str = "outputs/morph.gif",
    frames: int = 24,
    seed: int = 42,
    settings: Optional[RenderSettings] = None,
    export: Optional[ExportSettings] = None,
    model=None,
    negative_prompt: Optional[str] = None,
    interpolation: str = "slerp",
    noise: str = "fixed",
    seeds: Optional[Sequence[int]] = None,
    easing: str = "linear",
    spacing: str = "linear",
    preview_steps: Optional[int] = None,
    workers=None,
    overwrite: bool = False,
    progress: bool = True,
    on_batch=None,
    attention_interp: str = "off",
    attention_warmup: float = 0.5,
    guide=None,
    limits: Optional[Limits] = None,
    controlnets: Sequence[ControlNetSpec] = (),
    motion: Optional[MotionSpec] = None,
) -> MorphResult:
    """Renders a prompt-to-prompt morph A -> B (-> C ...) and exports it.

    Frames are written as PNG to `<out stem>_frames/` as each batch finishes, with a
    manifest.json; running the same call again after an interruption renders only the
    missing frames.

    Args:
        prompts: list of str (or weighted mixes). Two or more prompts, the keyframes in order.
        out: str. Output .gif, .mp4 or .webm path. Defaults to "outputs/morph.gif".
        frames: int. Total frames, keyframes included, >= len(prompts). Defaults to 24.
        seed: int. Seed of the noise (the first keyframe's with noise="slerp").
            Defaults to 42.
        settings: `RenderSettings`. Size, steps, guidance, sampler, batch size.
            Defaults to RenderSettings() (512x512, 25 DDIM steps, guidance 7.5, batch 4).
        export: `ExportSettings`. fps, ping-pong, frame doubling, quality, contact
            sheet, audio. Defaults to ExportSettings() (12 fps).
        model: a loaded `StableDiffusionModel` (reused across calls), a `ModelSpec`
            to load from, or None (KerasCV's weights). With `workers`, a `ModelSpec`
            or a function that builds a model.
        negative_prompt: str. Steers away from this text. Defaults to None.
        interpolation: str. "slerp" or "linear", for text embeddings. Defaults to "slerp".
        noise: str. "fixed" (one noise for all frames) or "slerp" (between per-prompt
            seeds). Defaults to "fixed".
        seeds: list of int. Per-prompt seeds for noise="slerp". Defaults to
            seed, seed + 1, ...
        easing: str. Easing of every transition ("linear", "ease-in-out", ...).
            Defaults to "linear".
        spacing, preview_steps, workers, overwrite, progress, on_batch: as in `animate`.
        attention_interp: str. "off" (the frames' text embeddings interpolated, as
            every latent walk does), or AID's attention interpolation: "inner", "outer"
            or "fused" (AID's default): in-between frames attend to keys and values
            interpolated from their two keyframes' (`sdanim.model.attention_interp`),
            which turns hard cuts into gradual changes. Defaults to "off".
        attention_warmup: float in [0, 1]. The fraction of the steps that interpolate
            attention (plain attention after). Defaults to 0.5 (AID's).
        guide: str or mix or None. PAID's guide prompt: the in-between frames take its
            embedding instead of the blend of their keyframes'. Defaults to None.
        limits: `sdanim.config.limits.Limits` or None: as in `animate`.
        controlnets, motion: as in `animate`.

    Example:
    ```python
    result = sdanim.morph(["a ford truck on a dirt road", "an electric car in a city"],
                          frames=24, seed=42, export=sdanim.ExportSettings(fps=12))
    sdanim.show_gif(result.out)
    ```
    """
    export = export or ExportSettings()
    intervals, keyframe_seeds = check_morph_args(prompts, out, frames, seed, interpolation, noise, seeds, export)
    check_easing(easing)
    walk = walk_from_prompts(list(prompts), keyframe_seeds, intervals, easing, False, interpolation,
                             attention_interp, attention_warmup, guide)
    return animate(
        walk, out=out, settings=settings, export=export, model=model, negative_prompt=negative_prompt,
        spacing=spacing, preview_steps=preview_steps, workers=workers, overwrite=overwrite, progress=progress,
        on_batch=on_batch, limits=limits, controlnets=controlnets, motion=motion,
    )


def animate(
    walk: Walk,
    out: str = "outputs/walk.gif",
    settings: Optional[RenderSettings] = None,
    export: Optional[ExportSettings] = None,
    model=None,
    negative_prompt: Optional[str] = None,
    spacing: str = "linear",
    preview_steps: Optional[int] = None,
    distance=None,
    workers=None,
    overwrite: bool = False,
    progress: bool = True,
    on_batch=None,
    limits: Optional[Limits] = None,
    controlnets: Sequence[ControlNetSpec] = (),
    motion: Optional[MotionSpec] = None,
) -> MorphResult:
    """Renders a keyframe walk (see `sdanim.keyframes`) and exports it.

    Args:
        walk: `Walk`. Keyframes, loop, interpolation, noise.
        out: str. Output .gif, .mp4 or .webm. Defaults to "outputs/walk.gif".
        settings, export, model, negative_prompt: as in `morph`.
        spacing: str. "linear" (equal steps in embedding space, then easing),
            "uniform": a preview of every frame with `preview_steps` steps measures
            the distance between consecutive frames, and frames are re-placed so that
            they are equally far apart (sdanim.core.spacing), or "beta": AID's Beta(3, 3)
            prior, more frames in the middle of each transition, fewer next to the
            keyframes (`sdanim.core.spacing.beta_positions`). Defaults to "linear".
        preview_steps: int. Steps of the uniform-spacing preview. Defaults to a
            quarter of the render's steps (at least 2).
        distance: callable (image, image) -> float. The frame distance used by
            uniform spacing and the smoothness report, e.g. a perceptual metric where
            its weights are available. Defaults to mean absolute pixel difference.
        workers: int or `sdanim.Workers` or None. Render on this many Ray
            workers (one model each; `pip install "sdanim[ray]"`); None renders in
            this process and never imports Ray. Defaults to None.
        overwrite: bool. Replace frames of a different run in the frames folder.
        progress: bool. Show a progress bar. Defaults to True.
        on_batch: callable (frame indices, images) or None. Called after each batch is
            saved (live previews); an exception it raises stops the render, keeping
            every frame already saved (the same call resumes). With motion modules it
            is also called with no frames after each window of each step (the clip's
            state is kept instead). Defaults to None.
        limits: `sdanim.config.limits.Limits` or None. What one request may ask for (a
            shared app's): checked on the final plan before anything is built: the
            video's frames after audio timing and in-betweens, the output size after
            upscaling, steps and batch. Defaults to None (no limits).
        controlnets: sequence of `sdanim.ControlNetSpec`: ControlNets whose structure the
            frames follow, each with its image (one for all frames, a folder or a video:
            one per frame), or the walk's per-keyframe `control_image` and
            `control_scale` (`sdanim.render.control`). Defaults to none.
        motion: `sdanim.MotionSpec` or None. AnimateDiff motion modules (SD 1.x): the
            frames are denoised together in context windows, so they move coherently,
            each with its own interpolated prompt (prompt travel); a stopped run resumes
            from the state its frames folder keeps (docs/architecture.md). With workers,
            each step's windows are shared out among them (the frames do not depend on
            how many); ControlNets act on every window; not with attention
            interpolation or uniform spacing (each refused with the reason). Defaults
            to None.

    Example:
    ```python
    walk = sdanim.load_walk("walk.yaml")
    result = sdanim.animate(walk, out="outputs/walk.mp4", export=sdanim.ExportSettings(fps=24))
    ```
    """
    # 1. Validate everything before the (slow) model build.
    settings = settings or RenderSettings()
    export = export or ExportSettings()
    check_output(export, out)
    timing = _check_timing(walk, settings, export, spacing, preview_steps)
    count = len(timing.positions) if timing.positions is not None else len(walk)  # audio timing decides it
    if limits is not None:  # on the final plan
        check_plan_limits(limits, settings, export, count, walk.loop)
    post = check_post(export, settings.batch_size)
    if motion is not None:
        _check_motion(motion, walk, timing)
        check_motion(motion, count, known_version(model))
    check(walk.attention == "off" or not is_sd3(known_version(model)),
          "attention interpolation (AID) reaches into SD 1.x/2.x's UNet attention; on SD3's joint attention it is "
          f"not built yet. Received: attention={walk.attention!r} with {known_version(model)}")
    images, scales = walk.control_stops(len(controlnets))
    controls = prepare_controls(controlnets, count, settings.height, settings.width, keyframe_images=images,
                                keyframe_scales=scales, version=known_version(model))
    if workers is not None:
        check_workers_args(model, workers)
    folder = os.path.splitext(out)[0] + "_frames"

    with frame_source(model, settings, workers) as source:
        # 2. Model; run folder (refuses another run's frames).
        manifest = {
            "walk": walk.record(), "timing": timing.record(export), "negative_prompt": negative_prompt,
            "render": render_record(settings), "model": source.describe(), "fps": export.fps,
            **({"post": post.record()} if post.active else {}), "sdanim": __version__, "versions": versions(),
            **control_record(controls), **({"motion": motion_record(motion)} if motion is not None else {}),
        }
        store, stored = open_run_folder(folder, manifest, overwrite)
        start = time.perf_counter()

        # 3. Where each frame sits along the keyframe path (the plan is built per model).
        job = FrameJob(walk, settings, negative_prompt, controls=controls)
        if timing.positions is not None:  # audio timing
            job = dataclasses.replace(job, positions=tuple(float(u) for u in timing.positions))
        if timing.spacing == "beta":
            positions = beta_positions(walk.intervals, walk.easings, include_end=not walk.loop)
            job = dataclasses.replace(job, positions=tuple(float(u) for u in positions))
        if timing.spacing == "uniform":
            known = (stored or {}).get("positions")
            if known is not None and len(known) == len(walk):
                positions = np.array(known, dtype=np.float64)  # same run: the preview is deterministic
            else:
                decoder = "tiny" if tiny_decoder_available(model) else settings.decoder
                positions = _uniform_spacing(source, job, timing.preview_steps, progress, distance, decoder)
                manifest["preview"] = {"decoder": decoder}
            job = dataclasses.replace(job, positions=tuple(float(u) for u in positions))
        if job.positions is not None:  # placed by audio, the Beta prior or the preview: kept with the frames
            manifest["positions"] = list(job.positions)
            store.write_manifest(manifest)

        # 4. Batched sampling of the frames not yet on disk; each batch saved at once.
        todo = store.missing(range(len(job)))
        if motion is not None:  # frames denoised together: the clip, then its frames
            images = source.render_motion(job, motion, store, progress, on_batch)
        else:
            images = source.render(job, todo, store=store, progress=progress, on_batch=on_batch) if todo else {}
    all_frames = np.stack([images[i] if i in images else store.read(i) for i in range(len(job))])

    # 5. In-betweens and upscaling, the video, and how evenly it moves.
    sheet = export_video(out, all_frames, store, export, post, walk.loop, progress)
    report = smoothness_report(list(all_frames) + ([all_frames[0]] if walk.loop else []), distance)
    store.write_manifest({**manifest, "smoothness": report})
    plot = timing.save_plot(os.path.splitext(out)[0] + "_audio.png", job.frame_positions())
    return MorphResult(all_frames, out, folder, sheet, len(todo), time.perf_counter() - start, report, plot,
                       timing.analysis.tempo if timing.analysis is not None else None)


def _check_motion(motion: MotionSpec, walk: Walk, timing) -> None:
    """What motion modules do not combine with (yet), each refused with the reason."""
    check(isinstance(motion, MotionSpec), f"motion must be a MotionSpec. Received: motion={motion!r}")
    check(walk.attention == "off", "attention interpolation adds helper rows to a batch, which motion modules would "
                                   f"mix into the clip; use one or the other. Received: attention_interp={walk.attention!r}")
    check(timing.spacing != "uniform", "uniform spacing previews frames one by one, which motion modules do not "
                                       "render; use linear or beta. Received: spacing='uniform'")


def video_frames(rendered: int, export: ExportSettings, loop: bool) -> int:
    """The frames an animation's video has: the rendered ones and the in-betweens RIFE
    adds (or the blended doubles)."""
    times = export.interpolate if export.interpolate > 1 else 2 if export.double else 1
    return len(sequence(rendered, times, loop))


def check_plan_limits(limits: Limits, settings: RenderSettings, export: ExportSettings, rendered: int,
                      loop: bool) -> None:
    """A request's final plan against `limits`: sampling (size after upscaling, steps,
    batch) and the video's frame count."""
    limits.check_settings(settings, export.upscale)
    limits.check_frames(video_frames(rendered, export, loop))


@dataclasses.dataclass(frozen=True)
class _Timing:
    """Where the frames of a walk sit: `spacing` (and its preview's steps), or an audio
    track (`analysis`, its `mode`, rendered frames per second of audio `fps`), which
    gives the frames' `positions` before anything is rendered."""

    spacing: str
    preview_steps: Optional[int]
    analysis: Optional[audio_lib.Analysis] = None
    mode: Optional[str] = None
    fps: Optional[float] = None
    beats_per_keyframe: Optional[int] = None
    positions: Optional[np.ndarray] = None

    def record(self, export: ExportSettings) -> dict:
        audio = None
        if export.audio is not None:
            audio = {"sha256": file_sha256(export.audio), "mode": export.audio_mode, "fps": export.fps}
            if export.interpolate > 1:
                audio["interpolate"] = export.interpolate
            if self.mode == "beats":
                audio.update(beats_per_keyframe=self.beats_per_keyframe, tempo=round(self.analysis.tempo, 3))
        return {"spacing": self.spacing, "preview_steps": self.preview_steps, "audio": audio}

    def save_plot(self, path: str, positions: np.ndarray) -> Optional[str]:
        """The audio's strength under each rendered frame and the walk's speed, as a
        PNG beside the video (audio timing only)."""
        if self.analysis is None:
            return None
        positions = np.asarray(positions, np.float64)
        speed = np.diff(positions)  # how far along the keyframe path each frame moves
        strength = self.analysis.per_frame("onsets" if self.mode == "beats" else self.mode, len(positions), self.fps)
        figure = audio_figure(strength, speed, self.fps, self.analysis.beats, self.analysis.tempo, self.mode)
        return save_figure(figure, path)


def _check_timing(walk: Walk, settings: RenderSettings, export: ExportSettings, spacing: str, preview_steps) -> _Timing:
    check_spacing(spacing)
    check(
        spacing == "linear" or walk.noise != "circle",
        f"spacing={spacing!r} re-places frames along keyframes; a circle noise walk has none. Received: noise='circle'",
    )
    check(export.audio is None or spacing == "linear",
          f"audio timing and spacing={spacing!r} both place the frames; choose one. Received: spacing={spacing!r}")
    if spacing == "uniform":
        preview_steps = preview_steps or max(2, settings.num_steps // 4)
        check(
            isinstance(preview_steps, int) and preview_steps >= 1,
            f"preview_steps must be at least 1. Received: preview_steps={preview_steps}",
        )
    timing = _Timing(spacing, preview_steps if spacing == "uniform" else None)
    if export.audio is None:
        return timing
    check(walk.noise != "circle" or export.audio_mode != "beats",
          "audio_mode='beats' puts keyframes on beats; a circle noise walk has none. Received: noise='circle'")
    # Each rendered frame stands for `interpolate` video frames: its audio window is that long.
    fps = export.fps / export.interpolate
    analysis = analyze_audio(*read_audio(export.audio))
    if export.audio_mode == "beats":
        times = audio_lib.keyframe_times(analysis.beats, len(walk.intervals), export.beats_per_keyframe, analysis.duration)
        positions = audio_lib.beat_positions(times, fps, walk.easings, include_end=not walk.loop)
    else:
        strength = analysis.per_frame(export.audio_mode, len(walk), fps)
        positions = audio_lib.audio_positions(strength, len(walk.intervals), include_end=not walk.loop)
    return dataclasses.replace(timing, analysis=analysis, mode=export.audio_mode, fps=fps,
                               beats_per_keyframe=export.beats_per_keyframe, positions=positions)


def export_video(out: str, frames: np.ndarray, store: FrameStore, export: ExportSettings, post: PostProcess,
                 loop: bool, progress: bool = True) -> Optional[str]:
    """The rendered frames (also in `store`) -> in-betweens and upscaling as configured
    -> the video at `out`; a contact sheet of the rendered frames if asked. Returns the
    sheet's path (or None)."""
    if post.active:
        video = PngSequence(post_process(store.folder, len(frames), post, loop, progress))
        fps = export.fps
    elif export.double:
        video, fps = blend_double(frames, loop=loop), export.fps * 2
    else:
        video, fps = list(frames), export.fps
    write_video(out, video, fps, ping_pong=export.ping_pong, quality=export.quality, audio=export.audio)
    if not export.sheet:
        return None
    sheet = os.path.splitext(out)[0] + "_sheet.png"
    write_png(sheet, contact_sheet(frames))
    return sheet


def _uniform_spacing(source, job: FrameJob, preview_steps: int, progress: bool, distance=None,
                     decoder: str = "full") -> np.ndarray:
    """Renders a cheap preview at linear spacing (`preview_steps`, the `decoder` given:
    the tiny one where its weights are at hand) and re-places the frames so that
    consecutive preview frames would be equally far apart (sdanim.core.spacing)."""
    walk = job.walk
    linear = walk.positions(eased=False)
    settings = dataclasses.replace(job.settings, num_steps=preview_steps, decoder=decoder)
    preview = FrameJob(walk, settings, job.negative_prompt, positions=tuple(float(u) for u in linear),
                       controls=job.controls)
    frames = source.render(preview, range(len(preview)), progress=progress)
    ordered = [frames[i] for i in range(len(preview))]
    distances = consecutive_distances(ordered + ([ordered[0]] if walk.loop else []), distance)
    return uniform_positions(linear, distances, walk.intervals, walk.easings, include_end=not walk.loop)


def check_image_morph_args(prompt, out, frames, seed, strength, interpolation, settings: RenderSettings,
                           export: Optional[ExportSettings] = None):
    """Checks image_morph's arguments (cheap). Returns (frames - 1, seed)."""
    normalize_prompt(prompt)
    (count,) = split_frames(frames, 1)
    check_output(export or ExportSettings(), out)
    check(interpolation in INTERPOLATIONS,
          f"interpolation must be one of {', '.join(INTERPOLATIONS)}. Received: interpolation={interpolation!r}")
    check(steps_for_strength(strength, settings.num_steps) > 0, f"image morph strength must be above 0. Received: strength={strength}")
    return count, check_seed(seed)


@dataclasses.dataclass
class ImageMorphResult:
    frames: np.ndarray  # (F, H, W, 3) uint8
    out: str
    frames_dir: str
    seconds: float


def image_morph(
    image_a,
    image_b,
    prompt="",
    out: str = "outputs/image_morph.gif",
    frames: int = 24,
    seed: int = 42,
    strength: float = 0.5,
    interpolation: str = "slerp",
    settings: Optional[RenderSettings] = None,
    negative_prompt: Optional[str] = None,
    fit: str = "crop",
    export: Optional[ExportSettings] = None,
    model=None,
    workers=None,
    progress: bool = True,
    limits: Optional[Limits] = None,
    controlnets: Sequence[ControlNetSpec] = (),
) -> ImageMorphResult:
    """A morph between two of your own images: both are encoded, their latents
    interpolated, and every frame is redrawn at `strength` with the prompt over one
    fixed seeded noise (so the frames agree on what the noise adds).

    Args:
        image_a, image_b: paths, PIL images or arrays; fitted to the settings' size.
        prompt: str or mix guiding the redraw ("" = none). Defaults to "".
        strength: float in (0, 1]. How much each frame is redrawn: low keeps the
            blend of the two images, high lets the model make each in-between a
            clean image. Defaults to 0.5.
        interpolation: "slerp" or "linear", between the latents. Defaults to "slerp".
        export: `ExportSettings`; fps, ping_pong and quality apply. Defaults to
            ExportSettings().
        workers: int or `sdanim.Workers`: render on Ray workers, as `animate`.
        out, frames, seed, settings, negative_prompt, fit, model, progress, limits,
            controlnets: as in `morph` and `img2img`.
    """
    settings = settings or RenderSettings()
    export = export or ExportSettings()
    count, seed = check_image_morph_args(prompt, out, frames, seed, strength, interpolation, settings, export)
    if limits is not None:
        check_plan_limits(limits, settings, export, count + 1, loop=False)
    post = check_post(export, settings.batch_size)
    pixels = np.stack([fit_image(load_image(image, name), settings.height, settings.width, fit)
                       for image, name in ((image_a, "image_a"), (image_b, "image_b"))])  # (2, H, W, 3)
    if workers is not None:
        check_workers_args(model, workers)
    controls = prepare_controls(controlnets, count + 1, settings.height, settings.width, fit,
                                version=known_version(model))
    job = ImageMorphJob(pixels, normalize_prompt(prompt), seed, tuple(float(u) for u in np.linspace(0.0, 1.0, count + 1)),
                        float(strength), interpolation, settings, negative_prompt, controls)
    folder = os.path.splitext(out)[0] + "_frames"
    with frame_source(model, settings, workers) as source:
        start = time.perf_counter()
        store = FrameStore(ensure_folder(folder, "out"))
        images = source.render(job, range(len(job)), store=store, progress=progress)
    all_frames = np.stack([images[i] if i in images else store.read(i) for i in range(len(job))])
    export_video(out, all_frames, store, export, post, loop=False, progress=progress)
    return ImageMorphResult(all_frames, out, folder, time.perf_counter() - start)
