"""The top-level flows: `morph` (prompt-to-prompt animation) and `generate` (images).

    prompts -> embeddings -> keyframes + noise -> frame plan -> batched sampling
            -> frames on disk -> export
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import time
from typing import Optional, Sequence

import numpy as np

from sdanim import __version__
from sdanim.errors import SdanimError, check
from sdanim.export import blend_double, check_fps, check_quality, contact_sheet, output_format, write_video
from sdanim.frames import FrameStore, ensure_folder, manifest_differences, write_png
from sdanim.interpolation import METHODS, check_easing, split_frames
from sdanim.keyframes import Walk, mix_embeddings, normalize_prompt, prompt_texts, walk_from_prompts
from sdanim.noise import check_seed, seeded_noise
from sdanim.plan import NOISE_MODES, FramePlan
from sdanim.smoothness import consecutive_distances, smoothness_report
from sdanim.spacing import check_spacing, uniform_positions
from sdanim.prompts import PromptEncoder
from sdanim.sampling import Renderer, render_frames
from sdanim.settings import RenderSettings

# Manifest keys that must match for frames on disk to be reused.
_RUN_KEYS = ("walk", "timing", "negative_prompt", "render", "model")


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


def _get_model(model, settings: RenderSettings, version: Optional[str], weights: str):
    if model is None:
        from sdanim.models import clip_vocab_path, load_model

        clip_vocab_path()  # fail before a minute of model building if the vocab is missing
        return load_model(version=version, weights=weights, height=settings.height, width=settings.width)
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


def _renderer(model, settings: RenderSettings, negative_prompt: Optional[str], strength: float = 1.0) -> Renderer:
    uncond = prompt_encoder(model).encode_one(negative_prompt or "")  # (77, D)
    return Renderer(
        model.diffusion_model, model.decoder, settings, uncond,
        jit_compile=bool(getattr(model, "jit_compile", False)), strength=strength,
    )


def embed_prompt(model, prompt) -> np.ndarray:
    """(77, D) embedding of a prompt or a weighted mix (see `sdanim.keyframes`)."""
    return mix_embeddings(normalize_prompt(prompt), prompt_encoder(model).encode)


def _model_record(model) -> dict:
    describe = getattr(model, "describe", None)
    record = describe() if describe else {"height": model.height, "width": model.width}
    record.pop("jit_compile", None)  # does not change the frames
    return record


def _render_record(settings: RenderSettings) -> dict:
    record = dataclasses.asdict(settings)
    record.pop("batch_size")  # frames are batch-invariant
    return record


def _prepare_store(folder: str, manifest: dict, overwrite: bool):
    """Opens the run folder, refusing to mix frames of a different run.

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
        diffs = manifest_differences(stored, manifest, _RUN_KEYS)
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


def check_output_args(out: str, fps, audio: Optional[str] = None) -> float:
    """Checks the output path, fps and audio file, and creates the output folder.
    Returns fps."""
    fps = check_fps(fps)
    ext = output_format(out)
    if audio is not None:
        from sdanim.audio import read_wav

        check(ext != ".gif", f"a GIF cannot carry audio; write .mp4 or .webm. Received: out={out!r}")
        read_wav(audio)
    ensure_folder(os.path.dirname(os.path.abspath(out)), "out")
    return fps


def check_morph_args(prompts, out, frames, fps, seed, interpolation="slerp", noise="fixed", seeds=None, audio=None):
    """Checks morph's arguments (cheap; before any model is built) and creates the
    output folder. Returns (intervals per transition, fps, per-keyframe seeds)."""
    check(len(prompts) >= 2, f"morph needs at least 2 prompts. Received: {len(prompts)} prompt(s)")
    for p in prompts:
        normalize_prompt(p, "prompts")
    intervals = split_frames(frames, len(prompts) - 1)
    fps = check_output_args(out, fps, audio)
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
    return intervals, fps, keyframe_seeds


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
    prompts: Sequence[str],
    out: str = "outputs/morph.gif",
    frames: int = 24,
    fps: float = 12,
    seed: int = 42,
    settings: Optional[RenderSettings] = None,
    negative_prompt: Optional[str] = None,
    interpolation: str = "slerp",
    noise: str = "fixed",
    seeds: Optional[Sequence[int]] = None,
    easing: str = "linear",
    spacing: str = "linear",
    preview_steps: Optional[int] = None,
    audio: Optional[str] = None,
    audio_mode: str = "loudness",
    double: bool = False,
    quality: float = 8.0,
    ping_pong: bool = False,
    sheet: bool = False,
    model=None,
    version: Optional[str] = None,
    weights: str = "keras-cv",
    overwrite: bool = False,
    progress: bool = True,
) -> MorphResult:
    """Renders a prompt-to-prompt morph A -> B (-> C ...) and exports it.

    Frames are written as PNG to `<out stem>_frames/` as each batch finishes, with a
    manifest.json; running the same call again after an interruption renders only the
    missing frames.

    Args:
        prompts: list of str. Two or more prompts, the keyframes in order.
        out: str. Output .gif, .mp4 or .webm path. Defaults to "outputs/morph.gif".
        frames: int. Total frames, keyframes included, >= len(prompts). Defaults to 24.
        fps: float. Frames per second. Defaults to 12.
        seed: int. Seed of the noise (the first keyframe's with noise="slerp").
            Defaults to 42.
        settings: RenderSettings. Size, steps, guidance, scheduler, batch size.
            Defaults to RenderSettings() (512x512, 25 DDIM steps, guidance 7.5, batch 4).
        negative_prompt: str. Steers away from this text. Defaults to None.
        interpolation: str. "slerp" or "linear", for text embeddings. Defaults to "slerp".
        noise: str. "fixed" (one noise for all frames) or "slerp" (between per-prompt
            seeds). Defaults to "fixed".
        seeds: list of int. Per-prompt seeds for noise="slerp". Defaults to
            seed, seed + 1, ...
        easing: str. Easing of every transition ("linear", "ease-in-out", ...).
            Defaults to "linear".
        spacing: str. "linear" or "uniform" (perceptually even steps, from a
            preview; see `animate`). Defaults to "linear".
        preview_steps: int. Steps of the uniform-spacing preview.
        audio, audio_mode, double, quality: as in `animate`.
        ping_pong: bool. Play forward then back. Defaults to False.
        sheet: bool. Also write a contact sheet `<out stem>_sheet.png`. Defaults to False.
        model: a loaded `StableDiffusionModel` (reused across calls), or None to load one.
        version: str or None. "1.4" or "2.1", when loading; None: what `weights`
            holds, else "1.4". Defaults to None.
        weights: str. "keras-cv", "random", a directory of .h5 files or a checkpoint
            (.safetensors, .ckpt, diffusers folder), when loading.
        overwrite: bool. Replace frames of a different run in the frames folder.
        progress: bool. Show a progress bar. Defaults to True.

    Example:
    ```python
    result = sdanim.morph(["a ford truck on a dirt road", "an electric car in a city"],
                          frames=24, fps=12, seed=42)
    sdanim.show_gif(result.out)
    ```
    """
    intervals, fps, keyframe_seeds = check_morph_args(prompts, out, frames, fps, seed, interpolation, noise, seeds, audio)
    check_easing(easing)
    walk = walk_from_prompts(list(prompts), keyframe_seeds, intervals, easing, False, interpolation)
    return animate(
        walk, out=out, fps=fps, settings=settings, negative_prompt=negative_prompt, ping_pong=ping_pong,
        sheet=sheet, spacing=spacing, preview_steps=preview_steps, audio=audio, audio_mode=audio_mode,
        double=double, quality=quality, model=model, version=version, weights=weights, overwrite=overwrite, progress=progress,
    )


def animate(
    walk: Walk,
    out: str = "outputs/walk.gif",
    fps: float = 12,
    settings: Optional[RenderSettings] = None,
    negative_prompt: Optional[str] = None,
    ping_pong: bool = False,
    sheet: bool = False,
    spacing: str = "linear",
    preview_steps: Optional[int] = None,
    audio: Optional[str] = None,
    audio_mode: str = "loudness",
    double: bool = False,
    quality: float = 8.0,
    distance=None,
    model=None,
    version: Optional[str] = None,
    weights: str = "keras-cv",
    overwrite: bool = False,
    progress: bool = True,
) -> MorphResult:
    """Renders a keyframe walk (see `sdanim.keyframes`) and exports it.

    Args:
        walk: `Walk`. Keyframes, loop, interpolation, noise.
        spacing: str. "linear" (equal steps in embedding space, then easing) or
            "uniform": a preview of every frame with `preview_steps` steps measures
            the distance between consecutive frames, and frames are re-placed so that
            they are equally far apart (sdanim.spacing). Defaults to "linear".
        preview_steps: int. Steps of the uniform-spacing preview. Defaults to a
            quarter of the render's steps (at least 2).
        audio: str. A PCM WAV file whose loudness ("loudness") or onset strength
            ("onsets", `audio_mode`) under each frame sets how fast the walk moves
            (sdanim.audio); muxed into an MP4/WebM `out`. Keyframes then fall where
            the music takes them. Defaults to None.
        double: bool. Double the frame count in the video by blending neighbours
            (play at 2 x fps for the same duration). Defaults to False.
        quality: float. MP4/WebM quality, 0-10. Defaults to 8.
        distance: callable (image, image) -> float. The frame distance used by
            uniform spacing and the smoothness report, e.g. a perceptual metric where
            its weights are available. Defaults to mean absolute pixel difference.
        The other arguments are as in `morph`.

    Example:
    ```python
    walk = sdanim.load_walk("walk.yaml")
    result = sdanim.animate(walk, out="outputs/walk.mp4", fps=24)
    ```
    """
    # 1. Validate everything before the (slow) model build.
    settings = settings or RenderSettings()
    fps = check_output_args(out, fps, audio)
    check_spacing(spacing)
    check(
        spacing == "linear" or walk.noise != "circle",
        "spacing='uniform' re-places frames along keyframes; a circle noise walk has none. Received: noise='circle'",
    )
    check_quality(quality)
    check(audio is None or spacing == "linear", "audio timing and spacing='uniform' both place the frames; choose one. Received: spacing='uniform'")
    if audio is not None:
        from sdanim import audio as audio_lib

        samples, rate = audio_lib.read_wav(audio)
        strength = audio_lib.frame_strength(samples, rate, len(walk), fps, audio_mode)
    if spacing == "uniform":
        preview_steps = preview_steps or max(2, settings.num_steps // 4)
        check(
            isinstance(preview_steps, int) and preview_steps >= 1,
            f"preview_steps must be at least 1. Received: preview_steps={preview_steps}",
        )
    stem = os.path.splitext(out)[0]
    folder = stem + "_frames"

    # 2. Model; run folder (refuses another run's frames).
    model = _get_model(model, settings, version, weights)
    manifest = {
        "walk": walk.record(),
        "timing": {
            "spacing": spacing,
            "preview_steps": preview_steps if spacing == "uniform" else None,
            "audio": None if audio is None else {"sha256": audio_lib.file_digest(audio), "mode": audio_mode, "fps": fps},
        },
        "negative_prompt": negative_prompt,
        "render": _render_record(settings),
        "model": _model_record(model),
        "fps": fps,
        "sdanim": __version__,
        "versions": _versions(),
    }
    store, stored = _prepare_store(folder, manifest, overwrite)
    start = time.perf_counter()

    # 3. Prompts -> embeddings; keyframes + noise -> frame plan.
    encoder = prompt_encoder(model)
    stops = walk.stops
    embeddings = np.stack([mix_embeddings(k.prompt, encoder.encode) for k in stops])  # (K, 77, D)
    seeds = walk.noise_seeds()
    noises = np.stack([seeded_noise(s, settings.latent_shape) for s in seeds])  # (K or 2, h, w, 4)
    if walk.noise == "circle":
        noise_mode = "circle"
    else:
        noise_mode = "fixed" if len(set(seeds)) == 1 else "slerp"
    plan = FramePlan(embeddings, noises, seeds, walk.positions(), walk.interpolation, noise_mode)
    if audio is not None:
        positions = audio_lib.audio_positions(strength, len(walk.intervals), include_end=not walk.loop)
        plan = dataclasses.replace(plan, positions=positions)
    if spacing == "uniform":
        known = (stored or {}).get("positions")
        if known is not None and len(known) == len(plan):
            positions = np.array(known, dtype=np.float64)  # same run: the preview is deterministic
        else:
            positions = _uniform_spacing(model, walk, plan, settings, preview_steps, negative_prompt, progress, distance)
        plan = dataclasses.replace(plan, positions=positions)
        manifest["positions"] = [float(u) for u in positions]
        store.write_manifest(manifest)

    # 4. Batched sampling of the frames not yet on disk; each batch saved at once.
    todo = store.missing(range(len(plan)))
    images = {}
    if todo:
        renderer = _renderer(model, settings, negative_prompt)

        def save(indices, batch_images):
            for index, image in zip(indices, batch_images):
                store.write(index, image, {"sdanim": _frame_text(plan, index, walk, settings)})

        images = render_frames(renderer, plan, todo, settings.batch_size, on_batch=save, progress=progress)
    all_frames = np.stack([images[i] if i in images else store.read(i) for i in range(len(plan))])

    # 5. Export, and how evenly it moves.
    video = blend_double(all_frames, loop=walk.loop) if double else list(all_frames)
    write_video(out, video, fps * (2 if double else 1), ping_pong=ping_pong, quality=quality, audio=audio)
    sheet_path = None
    if sheet:
        sheet_path = stem + "_sheet.png"
        write_png(sheet_path, contact_sheet(all_frames))
    report = smoothness_report(list(all_frames) + ([all_frames[0]] if walk.loop else []), distance)
    store.write_manifest({**manifest, "smoothness": report})
    return MorphResult(all_frames, out, folder, sheet_path, len(todo), time.perf_counter() - start, report)


def _uniform_spacing(model, walk: Walk, plan: FramePlan, settings, preview_steps, negative_prompt, progress, distance=None) -> np.ndarray:
    """Renders a cheap preview at linear spacing and re-places the frames so that
    consecutive preview frames would be equally far apart (sdanim.spacing)."""
    preview_plan = dataclasses.replace(plan, positions=walk.positions(eased=False))
    preview_settings = dataclasses.replace(settings, num_steps=preview_steps)
    renderer = _renderer(model, preview_settings, negative_prompt)
    frames = render_frames(renderer, preview_plan, range(len(plan)), settings.batch_size, progress=progress)
    ordered = [frames[i] for i in range(len(plan))]
    distances = consecutive_distances(ordered + ([ordered[0]] if walk.loop else []), distance)
    return uniform_positions(preview_plan.positions, distances, walk.intervals, walk.easings, include_end=not walk.loop)


def _frame_text(plan: FramePlan, index: int, walk: Walk, settings: RenderSettings) -> dict:
    """PNG metadata of one frame: enough to reproduce it."""
    u = float(plan.positions[index])
    return {"frame": index, "position": u, "walk": walk.record(), "render": dataclasses.asdict(settings)}


def _prompt_record(prompt):
    prompt = normalize_prompt(prompt)
    return prompt if isinstance(prompt, str) else [list(p) for p in prompt]


def _versions() -> dict:
    import importlib.metadata as md

    versions = {}
    for name in ("keras", "keras-cv", "tensorflow-cpu", "tensorflow", "jax", "torch", "numpy"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    try:
        import keras

        versions["keras_backend"] = keras.backend.backend()
    except ImportError:  # pragma: no cover
        pass
    return versions


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
    version: Optional[str] = None,
    weights: str = "keras-cv",
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
        model, version, weights, progress: as in `morph`.

    Example:
    ```python
    result = sdanim.generate("a ford truck on a dirt road", num_images=3, seed=4)
    sdanim.plot_images(result.images)
    ```
    """
    settings = settings or RenderSettings()
    seed = check_generate_args(prompt, num_images, seed, out_dir)
    model = _get_model(model, settings, version, weights)
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
    images = render_frames(_renderer(model, settings, negative_prompt), plan, range(num_images), settings.batch_size, progress=progress)
    stacked = np.stack([images[k] for k in range(num_images)])
    paths = []
    if out_dir is not None:
        for s, image in zip(seeds, stacked):
            path = os.path.join(out_dir, f"{slugify(prompt)}-seed{s}.png")
            write_png(path, image, {"sdanim": {"prompt": _prompt_record(prompt), "negative_prompt": negative_prompt, "seed": s, "render": dataclasses.asdict(settings)}})
            paths.append(path)
    return GenerateResult(stacked, seeds, paths)
