"""The top-level flows: `morph` (prompt-to-prompt animation), `animate` (any walk) and
`generate` (images), on the shared run set-up of `sdanim.run`.

    prompts -> embeddings -> keyframes + noise -> frame plan -> batched sampling
            -> frames on disk -> export
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Optional, Sequence

import numpy as np

from sdanim import __version__
from sdanim.errors import check
from sdanim.export import blend_double, contact_sheet, write_video
from sdanim.frames import ensure_folder, write_png
from sdanim.interpolation import METHODS, check_easing, split_frames
from sdanim.keyframes import Walk, normalize_prompt, prompt_texts, walk_from_prompts
from sdanim.noise import check_seed, seeded_noise
from sdanim.plan import NOISE_MODES, FramePlan
from sdanim.run import (
    ExportSettings, FrameJob, embed_prompt, frame_source, get_model, make_renderer, model_text, open_run_folder,
    prompt_encoder, prompt_record, render_record, versions,  # noqa: F401  (prompt_encoder: kept importable here)
)
from sdanim.sampling import render_frames
from sdanim.settings import RenderSettings
from sdanim.smoothness import consecutive_distances, smoothness_report
from sdanim.spacing import check_spacing, uniform_positions


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


@dataclasses.dataclass
class GenerateResult:
    """What `generate` made."""

    images: np.ndarray  # (N, H, W, 3) uint8
    seeds: list  # image k was drawn from seeds[k]
    paths: list  # PNG files


def check_morph_args(prompts, out, frames, seed, interpolation="slerp", noise="fixed", seeds=None,
                     export: Optional[ExportSettings] = None):
    """Checks morph's arguments (cheap; before any model is built) and creates the
    output folder. Returns (intervals per transition, per-keyframe seeds)."""
    check(len(prompts) >= 2, f"morph needs at least 2 prompts. Received: {len(prompts)} prompt(s)")
    for p in prompts:
        normalize_prompt(p, "prompts")
    intervals = split_frames(frames, len(prompts) - 1)
    (export or ExportSettings()).check_output(out)
    check(interpolation in METHODS, f"interpolation must be one of {', '.join(METHODS)}. Received: interpolation={interpolation!r}")
    check(noise in NOISE_MODES, f"noise must be one of {', '.join(NOISE_MODES)}. Received: noise={noise!r}")
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


def check_generate_args(prompt, num_images, seed, out_dir):
    """Checks generate's arguments and creates `out_dir`. Returns the seed (drawn if None)."""
    normalize_prompt(prompt)
    check(
        isinstance(num_images, int) and not isinstance(num_images, bool) and num_images >= 1,
        f"num_images must be at least 1. Received: num_images={num_images}",
    )
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**31))
    seed = check_seed(seed)
    if out_dir is not None:
        ensure_folder(out_dir, "out")
    return seed


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
    walk = walk_from_prompts(list(prompts), keyframe_seeds, intervals, easing, False, interpolation)
    return animate(
        walk, out=out, settings=settings, export=export, model=model, negative_prompt=negative_prompt,
        spacing=spacing, preview_steps=preview_steps, workers=workers, overwrite=overwrite, progress=progress,
        on_batch=on_batch,
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
) -> MorphResult:
    """Renders a keyframe walk (see `sdanim.keyframes`) and exports it.

    Args:
        walk: `Walk`. Keyframes, loop, interpolation, noise.
        out: str. Output .gif, .mp4 or .webm. Defaults to "outputs/walk.gif".
        settings, export, model, negative_prompt: as in `morph`.
        spacing: str. "linear" (equal steps in embedding space, then easing) or
            "uniform": a preview of every frame with `preview_steps` steps measures
            the distance between consecutive frames, and frames are re-placed so that
            they are equally far apart (sdanim.spacing). Defaults to "linear".
        preview_steps: int. Steps of the uniform-spacing preview. Defaults to a
            quarter of the render's steps (at least 2).
        distance: callable (image, image) -> float. The frame distance used by
            uniform spacing and the smoothness report, e.g. a perceptual metric where
            its weights are available. Defaults to mean absolute pixel difference.
        workers: int or `sdanim.distributed.Workers` or None. Render on this many Ray
            workers (one model each; `pip install "sdanim[ray]"`); None renders in
            this process and never imports Ray. Defaults to None.
        overwrite: bool. Replace frames of a different run in the frames folder.
        progress: bool. Show a progress bar. Defaults to True.
        on_batch: callable (frame indices, images) or None. Called after each batch is
            saved (live previews); an exception it raises stops the render, keeping
            every frame already saved (the same call resumes). Defaults to None.

    Example:
    ```python
    walk = sdanim.load_walk("walk.yaml")
    result = sdanim.animate(walk, out="outputs/walk.mp4", export=sdanim.ExportSettings(fps=24))
    ```
    """
    # 1. Validate everything before the (slow) model build.
    settings = settings or RenderSettings()
    export = export or ExportSettings()
    export.check_output(out)
    check_spacing(spacing)
    check(
        spacing == "linear" or walk.noise != "circle",
        "spacing='uniform' re-places frames along keyframes; a circle noise walk has none. Received: noise='circle'",
    )
    check(export.audio is None or spacing == "linear", "audio timing and spacing='uniform' both place the frames; choose one. Received: spacing='uniform'")
    if export.audio is not None:
        from sdanim import audio as audio_lib

        samples, rate = audio_lib.read_wav(export.audio)
        strength = audio_lib.frame_strength(samples, rate, len(walk), export.fps, export.audio_mode)
    if spacing == "uniform":
        preview_steps = preview_steps or max(2, settings.num_steps // 4)
        check(
            isinstance(preview_steps, int) and preview_steps >= 1,
            f"preview_steps must be at least 1. Received: preview_steps={preview_steps}",
        )
    if workers is not None:
        from sdanim.distributed import check_workers_args

        check_workers_args(model, workers)
    stem = os.path.splitext(out)[0]
    folder = stem + "_frames"

    with frame_source(model, settings, workers) as source:
        # 2. Model; run folder (refuses another run's frames).
        manifest = {
            "walk": walk.record(),
            "timing": {
                "spacing": spacing,
                "preview_steps": preview_steps if spacing == "uniform" else None,
                "audio": None if export.audio is None else {
                    "sha256": audio_lib.file_digest(export.audio), "mode": export.audio_mode, "fps": export.fps},
            },
            "negative_prompt": negative_prompt,
            "render": render_record(settings),
            "model": source.describe(),
            "fps": export.fps,
            "sdanim": __version__,
            "versions": versions(),
        }
        store, stored = open_run_folder(folder, manifest, overwrite)
        start = time.perf_counter()

        # 3. Where each frame sits along the keyframe path (the plan is built per model).
        job = FrameJob(walk, settings, negative_prompt)
        if export.audio is not None:
            positions = audio_lib.audio_positions(strength, len(walk.intervals), include_end=not walk.loop)
            job = dataclasses.replace(job, positions=tuple(float(u) for u in positions))
        if spacing == "uniform":
            known = (stored or {}).get("positions")
            if known is not None and len(known) == len(walk):
                positions = np.array(known, dtype=np.float64)  # same run: the preview is deterministic
            else:
                positions = _uniform_spacing(source, job, preview_steps, progress, distance)
            job = dataclasses.replace(job, positions=tuple(float(u) for u in positions))
            manifest["positions"] = list(job.positions)
            store.write_manifest(manifest)

        # 4. Batched sampling of the frames not yet on disk; each batch saved at once.
        todo = store.missing(range(len(job)))
        images = source.render(job, todo, store=store, progress=progress, on_batch=on_batch) if todo else {}
    all_frames = np.stack([images[i] if i in images else store.read(i) for i in range(len(job))])

    # 5. Export, and how evenly it moves.
    video = blend_double(all_frames, loop=walk.loop) if export.double else list(all_frames)
    write_video(out, video, export.fps * (2 if export.double else 1), ping_pong=export.ping_pong,
                quality=export.quality, audio=export.audio)
    sheet_path = None
    if export.sheet:
        sheet_path = stem + "_sheet.png"
        write_png(sheet_path, contact_sheet(all_frames))
    report = smoothness_report(list(all_frames) + ([all_frames[0]] if walk.loop else []), distance)
    store.write_manifest({**manifest, "smoothness": report})
    return MorphResult(all_frames, out, folder, sheet_path, len(todo), time.perf_counter() - start, report)


def _uniform_spacing(source, job: FrameJob, preview_steps: int, progress: bool, distance=None) -> np.ndarray:
    """Renders a cheap preview at linear spacing and re-places the frames so that
    consecutive preview frames would be equally far apart (sdanim.spacing)."""
    walk = job.walk
    linear = walk.positions(eased=False)
    preview = FrameJob(walk, dataclasses.replace(job.settings, num_steps=preview_steps), job.negative_prompt,
                       positions=tuple(float(u) for u in linear))
    frames = source.render(preview, range(len(preview)), progress=progress)
    ordered = [frames[i] for i in range(len(preview))]
    distances = consecutive_distances(ordered + ([ordered[0]] if walk.loop else []), distance)
    return uniform_positions(linear, distances, walk.intervals, walk.easings, include_end=not walk.loop)


def slugify(text, limit: int = 40) -> str:
    """A file-name stem from a prompt (or the texts of a mix)."""
    if not isinstance(text, str):
        text = " ".join(prompt_texts(normalize_prompt(text)))
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "image"


def generate(
    prompt,
    num_images: int = 3,
    seed: Optional[int] = None,
    settings: Optional[RenderSettings] = None,
    negative_prompt: Optional[str] = None,
    out_dir: Optional[str] = "outputs",
    model=None,
    progress: bool = True,
) -> GenerateResult:
    """Text to image: `num_images` images of one prompt, image k from seed + k.

    Image k is the same as generating (prompt, seed + k) alone, on any batch size.

    Args:
        prompt: str, or a weighted mix {"a rabbit": 0.5, "a frog": 0.5} (the
            embeddings blended, see `sdanim.keyframes`). What to draw.
        num_images: int. How many images. Defaults to 3.
        seed: int or None. Seed of the first image; None draws one (it is returned).
        settings: RenderSettings. Defaults to RenderSettings().
        negative_prompt: str. Steers away from this text. Defaults to None.
        out_dir: str or None. Folder for `<prompt>-seed<seed>.png` files; None saves
            nothing. Defaults to "outputs".
        model, progress: as in `morph`.

    Example:
    ```python
    result = sdanim.generate("a ford truck on a dirt road", num_images=3, seed=4)
    sdanim.plot_images(result.images)
    ```
    """
    settings = settings or RenderSettings()
    seed = check_generate_args(prompt, num_images, seed, out_dir)
    model = get_model(model, settings)
    seeds = [seed + k for k in range(num_images)]
    embedding = embed_prompt(model, prompt)  # (77, D)
    noises = np.stack([seeded_noise(s, settings.latent_shape) for s in seeds])  # (N, h, w, 4)
    plan = FramePlan(
        embeddings=np.repeat(embedding[None], num_images, axis=0),
        noises=noises,
        seeds=tuple(seeds),
        positions=np.arange(num_images, dtype=np.float64),
        noise_mode="slerp",  # at integer positions: keyframe k's own noise
    )
    images = render_frames(make_renderer(model, settings, negative_prompt), plan, range(num_images), settings.batch_size, progress=progress)
    stacked = np.stack([images[k] for k in range(num_images)])
    paths = []
    if out_dir is not None:
        for s, image in zip(seeds, stacked):
            path = os.path.join(out_dir, f"{slugify(prompt)}-seed{s}.png")
            write_png(path, image, {"sdanim": {"prompt": prompt_record(prompt), "negative_prompt": negative_prompt, "seed": s, "render": dataclasses.asdict(settings), **model_text(model)}})
            paths.append(path)
    return GenerateResult(stacked, seeds, paths)
