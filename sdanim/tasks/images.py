"""Stills on sdanim's one renderer: text to image, image-to-image, inpainting,
outpainting, comparison grids and denoising-step views.

None of these has a loop of its own. Image-to-image hands the renderer clean
latents and a strength (it starts part-way down the schedule); inpainting adds a mask
(the kept region is reset after every step); step views read the predicted clean
latent the samplers already compute.

    image (+ mask) -> latents (VAE encoder) -> frame plan -> batched sampling -> images
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from typing import Optional, Sequence

import numpy as np

from sdanim.config.control import ControlNetSpec
from sdanim.config.errors import check
from sdanim.config.export import ExportSettings
from sdanim.config.settings import RenderSettings
from sdanim.core.hints import control_inputs
from sdanim.core.keyframes import normalize_prompt, prompt_texts
from sdanim.core.noise import check_seed, seeded_noise
from sdanim.core.pixels import composite, extend_canvas, fit_image, labelled_grid, latent_mask, soft_mask
from sdanim.core.plan import FrameInputs, FramePlan, ImagePlan, ListPlan, step_seed
from sdanim.core.runtime import keras_ops
from sdanim.core.schedulers import steps_for_strength
from sdanim.formats.images import load_image, load_mask
from sdanim.render.export import check_output, write_video
from sdanim.render.control import control_record, prepare_controls
from sdanim.render.jobs import embed_prompt, encode_images, latent_shape, make_renderer, model_text, prompt_record
from sdanim.render.run import get_model, known_version
from sdanim.render.sampling import ControlBatch, render_frames
from sdanim.render.store import ensure_folder, write_png


@dataclasses.dataclass
class GenerateResult:
    """What `generate` made."""

    images: np.ndarray  # (N, H, W, 3) uint8
    seeds: list  # image k was drawn from seeds[k]
    paths: list  # PNG files


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
    controlnets: Sequence[ControlNetSpec] = (),
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
        controlnets: sequence of `sdanim.ControlNetSpec` (an image for every image, or a
            folder or video: one per image). Defaults to none.

    Example:
    ```python
    result = sdanim.generate("a ford truck on a dirt road", num_images=3, seed=4)
    sdanim.plot_images(result.images)
    ```
    """
    settings = settings or RenderSettings()
    seed = check_generate_args(prompt, num_images, seed, out_dir)
    controls = prepare_controls(controlnets, num_images, settings.height, settings.width, version=known_version(model))
    model = get_model(model, settings)
    seeds = [seed + k for k in range(num_images)]
    embedding = embed_prompt(model, prompt)  # (77, D)
    noises = np.stack([seeded_noise(s, latent_shape(model, settings)) for s in seeds])  # (N, h, w, C)
    plan = FramePlan(
        embeddings=np.repeat(embedding[None], num_images, axis=0),
        noises=noises,
        seeds=tuple(seeds),
        positions=np.arange(num_images, dtype=np.float64),
        noise_mode="slerp",  # at integer positions: keyframe k's own noise
        controls=tuple(c.hints for c in controls),
    )
    renderer = make_renderer(model, settings, negative_prompt, controls=controls)
    images = render_frames(renderer, plan, range(num_images), settings.batch_size, progress=progress)
    stacked = np.stack([images[k] for k in range(num_images)])
    paths = []
    if out_dir is not None:
        for s, image in zip(seeds, stacked):
            path = os.path.join(out_dir, f"{slugify(prompt)}-seed{s}.png")
            write_png(path, image, {"sdanim": {"prompt": prompt_record(prompt), "negative_prompt": negative_prompt, "seed": s,
                                               "render": settings.record(), **model_text(model),
                                               **control_record(controls)}})
            paths.append(path)
    return GenerateResult(stacked, seeds, paths)


def prepare_image(image, settings: RenderSettings, fit: str, name: str = "image") -> np.ndarray:
    return fit_image(load_image(image, name), settings.height, settings.width, fit)


def _seeds(seed, num_images, out_dir) -> list:
    """The images' seeds (seed + k; a random first seed if None). Creates out_dir now,
    so a bad folder fails before anything is rendered."""
    seed = check_generate_args("", num_images, seed, out_dir)
    return [seed + k for k in range(num_images)]


def _save(out_dir, stem, seeds, images, record) -> list:
    if out_dir is None:
        return []
    ensure_folder(out_dir, "out")
    paths = []
    for s, image in zip(seeds, images):
        path = os.path.join(out_dir, f"{stem}-seed{s}.png")
        write_png(path, image, {"sdanim": {**record, "seed": s}})
        paths.append(path)
    return paths


def _render_from(model, settings, prompt, negative_prompt, latents, seeds, strength, mask, progress, controls=()):
    plan = ImagePlan(
        context=embed_prompt(model, prompt), latents=latents, seeds=tuple(seeds),
        positions=np.zeros(len(seeds)), mask=mask, controls=tuple(c.hints for c in controls),
    )
    renderer = make_renderer(model, settings, negative_prompt, strength=strength, controls=controls)
    images = render_frames(renderer, plan, range(len(plan)), settings.batch_size, progress=progress)
    return np.stack([images[k] for k in range(len(plan))])


def img2img(
    image,
    prompt,
    strength: float = 0.6,
    num_images: int = 1,
    seed: Optional[int] = None,
    settings: Optional[RenderSettings] = None,
    negative_prompt: Optional[str] = None,
    fit: str = "crop",
    out_dir: Optional[str] = "outputs",
    model=None,
    progress: bool = True,
    controlnets: Sequence[ControlNetSpec] = (),
) -> GenerateResult:
    """Image to image: the image, noised to `strength`, redrawn with the prompt.

    The image is fitted to the settings' size: fit="crop" centre-crops it to that
    aspect ratio and resizes it (nothing is stretched), fit="resize" stretches it.
    It is encoded with the VAE encoder, noised to step N - round(strength N) of the
    scheduler (any scheduler) with image k's own seeded noise, and denoised from there.

    Args:
        image: path, PIL image or (H, W, 3) uint8 array.
        prompt: str or weighted mix. What to turn it into.
        strength: float in [0, 1]. 0 returns the (fitted) image unchanged, no model
            call; 1 ignores it (the same image as `generate` with that seed).
            Defaults to 0.6.
        num_images, seed, settings, negative_prompt, out_dir, model,
            progress, controlnets: as in `sdanim.generate`; image k uses seed + k.
        fit: "crop" or "resize". Defaults to "crop".

    Example:
    ```python
    result = sdanim.img2img("rabbit.png", "a wooden carving of a rabbit", strength=0.6, seed=1)
    ```
    """
    settings = settings or RenderSettings()
    normalize_prompt(prompt)
    steps_for_strength(strength, settings.num_steps)
    seeds = _seeds(seed, num_images, out_dir)
    pixels = prepare_image(image, settings, fit)
    controls = prepare_controls(controlnets, num_images, settings.height, settings.width, fit,
                                version=known_version(model))
    if strength == 0:
        images = np.repeat(pixels[None], num_images, axis=0)
    else:
        model = get_model(model, settings)
        latent = encode_images(model, pixels[None])  # (1, h, w, 4)
        images = _render_from(model, settings, prompt, negative_prompt, latent, seeds, strength, None, progress,
                              controls)
    record = {"tool": "img2img", "prompt": prompt_record(prompt), "strength": strength,
              "negative_prompt": negative_prompt, "render": settings.record(),
              **(model_text(model) if strength > 0 else {}), **control_record(controls)}
    return GenerateResult(images, seeds, _save(out_dir, f"img2img-{slugify(prompt)}", seeds, images, record))


@dataclasses.dataclass
class InpaintResult(GenerateResult):
    """What `inpaint`/`outpaint` made; `mask` is the (H, W) bool mask used (True =
    repainted) and `image` the fitted input the result keeps outside it."""

    mask: Optional[np.ndarray] = None
    image: Optional[np.ndarray] = None


def inpaint(
    image,
    mask,
    prompt,
    num_images: int = 1,
    seed: Optional[int] = None,
    strength: float = 1.0,
    feather: float = 4.0,
    settings: Optional[RenderSettings] = None,
    negative_prompt: Optional[str] = None,
    fit: str = "crop",
    out_dir: Optional[str] = "outputs",
    model=None,
    progress: bool = True,
    controlnets: Sequence[ControlNetSpec] = (),
) -> InpaintResult:
    """Redraws the white part of `mask` with the prompt; the rest of the image stays.

    At every step the latent outside the mask (every 8x8 block the mask touches is
    painted) is reset to the image's latent noised to that step, so the model paints
    the masked region in context. After decoding, the input's own pixels are put back
    outside the mask, blended over `feather` pixels inside its edge: every pixel
    outside the mask is the input's, exactly (the VAE would otherwise blur them).

    Args:
        image: path, PIL image or (H, W, 3) uint8 array.
        mask: path or array of the image's size; white (>= 128) = repaint. All black
            is refused; all white repaints everything (a warning says so).
        prompt: str or weighted mix. What to paint there.
        strength: float in (0, 1]. 1 paints the masked region from pure noise; lower
            keeps some of what was there. Defaults to 1.
        feather: float. Pixels over which the repainted region blends into the
            original inside the mask's edge. Defaults to 4.
        controlnets: as in `img2img`; the inpaint preprocessor takes this mask (an
            inpainting ControlNet with the image itself: control image None -> the image).
        Others as in `img2img`.
    """
    settings = settings or RenderSettings()
    normalize_prompt(prompt)
    steps_for_strength(strength, settings.num_steps)
    check(strength > 0, f"inpaint strength must be above 0 (0 would return the image). Received: strength={strength}")
    seeds = _seeds(seed, num_images, out_dir)
    original = load_image(image, "image")
    hard = load_mask(mask, original.shape, "mask")
    pixels = fit_image(original, settings.height, settings.width, fit)
    hard = fit_image(hard.astype(np.uint8) * 255, settings.height, settings.width, fit, nearest=True) >= 128
    return _inpaint_fitted(pixels, hard, prompt, seeds, strength, feather, settings, negative_prompt, out_dir,
                           model, progress, "inpaint", controlnets)


def _inpaint_fitted(pixels, hard, prompt, seeds, strength, feather, settings, negative_prompt, out_dir,
                    model, progress, tool, controlnets=()) -> InpaintResult:
    weight = soft_mask(hard, feather)  # (H, W), 0 outside the mask
    # A ControlNet without an image of its own (an inpainting ControlNet) sees this image.
    specs = [spec if spec.image is not None else dataclasses.replace(spec, image=pixels) for spec in controlnets]
    controls = prepare_controls(specs, len(seeds), settings.height, settings.width, mask=hard,
                                version=known_version(model))
    model = get_model(model, settings)
    latent = encode_images(model, pixels[None])  # (1, h, w, 4)
    generated = _render_from(model, settings, prompt, negative_prompt, latent, seeds, strength, latent_mask(hard),
                             progress, controls)
    images = np.stack([composite(g, pixels, weight) for g in generated])
    record = {"tool": tool, "prompt": prompt_record(prompt), "strength": strength, "feather": feather,
              "negative_prompt": negative_prompt, "render": settings.record(), **model_text(model),
              **control_record(controls)}
    paths = _save(out_dir, f"{tool}-{slugify(prompt)}", seeds, images, record)
    return InpaintResult(images, seeds, paths, mask=hard, image=pixels)


def outpaint(
    image,
    prompt,
    left: int = 0,
    right: int = 0,
    top: int = 0,
    bottom: int = 0,
    num_images: int = 1,
    seed: Optional[int] = None,
    feather: float = 4.0,
    settings: Optional[RenderSettings] = None,
    negative_prompt: Optional[str] = None,
    out_dir: Optional[str] = "outputs",
    model=None,
    progress: bool = True,
    controlnets: Sequence[ControlNetSpec] = (),
) -> InpaintResult:
    """Extends the image by `left`/`right`/`top`/`bottom` pixels, painting the new
    borders with the prompt (inpainting with the borders as the mask). The image is
    not resized: the extended size must be multiples of 64, and `settings` (or the
    model) must be that size (settings=None takes it).
    """
    original = load_image(image, "image")
    canvas, hard = extend_canvas(original, left, right, top, bottom)
    size = dict(height=canvas.shape[0], width=canvas.shape[1])
    settings = dataclasses.replace(settings, **size) if settings else RenderSettings(**size)
    normalize_prompt(prompt)
    seeds = _seeds(seed, num_images, out_dir)
    return _inpaint_fitted(canvas, hard, prompt, seeds, 1.0, feather, settings, negative_prompt, out_dir,
                           model, progress, "outpaint", controlnets)


def check_grid_args(prompts, seeds, guidance_scales, steps, settings: RenderSettings, out):
    """Checks grid's arguments (cheap; before any model is built). Returns (prompts,
    seeds, one RenderSettings per guidance x steps column group)."""
    prompts = list(prompts)
    check(len(prompts) >= 1, "grid needs at least one prompt. Received: 0 prompts")
    prompts = [normalize_prompt(p, "prompts") for p in prompts]
    seeds = [check_seed(s, "seeds") for s in _values(seeds, "seeds")]
    scales = _values(guidance_scales if guidance_scales is not None else [settings.guidance_scale], "guidances")
    counts = _values(steps if steps is not None else [settings.num_steps], "steps")
    variants = [dataclasses.replace(settings, guidance_scale=float(g), num_steps=n) for g in scales for n in counts]
    if out is not None:
        ensure_folder(os.path.dirname(os.path.abspath(out)), "out")
    return prompts, seeds, variants


@dataclasses.dataclass
class GridResult:
    image: np.ndarray  # the labelled grid, (H', W', 3) uint8
    cells: np.ndarray  # (rows, columns, H, W, 3) uint8
    columns: list  # (seed, guidance, steps) of each column
    path: Optional[str]


def _values(values, name):
    values = list(values)
    check(len(values) >= 1, f"{name} needs at least one value. Received: {name}={values}")
    return values


def grid(
    prompts: Sequence,
    seeds: Sequence[int] = (42,),
    guidance_scales: Optional[Sequence[float]] = None,
    steps: Optional[Sequence[int]] = None,
    settings: Optional[RenderSettings] = None,
    negative_prompt: Optional[str] = None,
    out: Optional[str] = "outputs/grid.png",
    model=None,
    progress: bool = True,
    controlnets: Sequence[ControlNetSpec] = (),
) -> GridResult:
    """A labelled comparison grid: one row per prompt, one column per combination of
    seed x guidance scale x step count, so a row shows what the settings do and a
    column what a keyword does (same seed, same noise).

    Each cell equals `generate(prompt, seed=..)` with that guidance and step count.

    Args:
        prompts: prompts (str or mixes), one per row.
        seeds: seeds to compare. Defaults to (42,).
        guidance_scales: guidance scales to compare. Defaults to the settings'.
        steps: step counts to compare. Defaults to the settings'.
        out: PNG path of the grid, or None. Defaults to "outputs/grid.png".
        controlnets: as in `generate` (one image for every cell, or one per column).
    """
    settings = settings or RenderSettings()
    prompts, seeds, variants = check_grid_args(prompts, seeds, guidance_scales, steps, settings, out)
    controls = prepare_controls(controlnets, len(seeds), settings.height, settings.width, version=known_version(model))
    model = get_model(model, settings)
    contexts = [embed_prompt(model, p) for p in prompts]
    n_scales = len({v.guidance_scale for v in variants})
    n_counts = len({v.num_steps for v in variants})
    columns = [(s, v.guidance_scale, v.num_steps) for v in variants for s in seeds]
    cells = np.zeros((len(prompts), len(columns), settings.height, settings.width, 3), np.uint8)
    for v_index, variant in enumerate(variants):
        # One renderer per (guidance, steps); every prompt x seed of it in batches.
        pairs = list(itertools.product(range(len(prompts)), range(len(seeds))))
        frames = [
            FrameInputs(k, contexts[r], seeded_noise(seeds[c], latent_shape(model, settings)), step_seed(seeds[c]), 0.0,
                        control=control_inputs([x.hints for x in controls], c, 0.0))  # a seed's column: its hint
            for k, (r, c) in enumerate(pairs)
        ]
        plan = ListPlan(frames)
        renderer = make_renderer(model, variant, negative_prompt, controls=controls)
        images = render_frames(renderer, plan, range(len(frames)), settings.batch_size, progress=progress)
        for k, (r, c) in enumerate(pairs):
            cells[r, v_index * len(seeds) + c] = images[k]
    labels = []
    for s, g, n in columns:
        parts = []
        if len(seeds) > 1:
            parts.append(f"seed {s}")
        if n_scales > 1:
            parts.append(f"guidance {g:g}")
        if n_counts > 1:
            parts.append(f"{n} steps")
        labels.append(", ".join(parts) or f"seed {s}")
    row_labels = [p if isinstance(p, str) else " + ".join(f"{w:g} {t}" for t, w in p) for p in prompts]
    sheet = labelled_grid([list(row) for row in cells], row_labels, labels)
    if out is not None:
        write_png(out, sheet, {"sdanim": {"tool": "grid", "prompts": [prompt_record(p) for p in prompts],
                                         "columns": columns, "render": settings.record(),
                                         **model_text(model), **control_record(controls)}})
    return GridResult(sheet, cells, columns, out)


def check_steps_args(prompt, seed, show, settings: RenderSettings, out, fps):
    """Checks denoising_steps' arguments (cheap). Returns (steps to show, seed)."""
    normalize_prompt(prompt)
    n = settings.num_steps
    if show is None:
        show = sorted({int(round(x)) for x in np.linspace(1, n, min(n, 8))})
    show = sorted(set(show))
    check(
        len(show) >= 1 and all(isinstance(s, int) and 1 <= s <= n for s in show),
        f"show must list step numbers from 1 to {n} (the steps). Received: show={list(show)}",
    )
    if out is not None:
        check_output(ExportSettings(fps=fps), out)
    return show, check_seed(seed)


@dataclasses.dataclass
class StepsResult:
    images: np.ndarray  # (S, H, W, 3) uint8: the predicted clean image after each shown step
    steps: list  # 1-based step numbers shown
    strip: Optional[str]  # PNG strip
    gif: Optional[str]


def denoising_steps(
    prompt,
    seed: int = 42,
    show: Optional[Sequence[int]] = None,
    settings: Optional[RenderSettings] = None,
    negative_prompt: Optional[str] = None,
    out: Optional[str] = "outputs/steps.gif",
    fps: float = 4,
    model=None,
    progress: bool = True,
    controlnets: Sequence[ControlNetSpec] = (),
) -> StepsResult:
    """How the picture emerges: the decoded predicted clean image (x0) after chosen
    steps of one generation, as a labelled strip `<out stem>_strip.png` and a GIF.

    The last shown step equals `generate(prompt, seed=seed)` (the final x0 is the image).

    Args:
        show: 1-based step numbers to show. Defaults to 8 steps spread evenly,
            the last included.
        out: GIF (or MP4) path; None saves nothing. Defaults to "outputs/steps.gif".
    """
    ops = keras_ops()
    settings = settings or RenderSettings()
    n = settings.num_steps
    show, seed = check_steps_args(prompt, seed, show, settings, out, fps)
    controls = prepare_controls(controlnets, 1, settings.height, settings.width, version=known_version(model))
    model = get_model(model, settings)
    renderer = make_renderer(model, settings, negative_prompt, controls=controls)
    context = embed_prompt(model, prompt)[None]  # (1, 77, D)
    noise = seeded_noise(seed, latent_shape(model, settings))[None]
    captured = {}

    def on_step(i, denoised):
        if i + 1 in show:
            captured[i + 1] = denoised

    control = None
    if controls:  # each net's hint and scale for the one image: (1, H, W, 3) and (n, 1)
        inputs = control_inputs([c.hints for c in controls], 0, 0.0)
        control = ControlBatch(tuple(h[None] for h, _ in inputs), np.array([[s] for _, s in inputs], np.float32))
    final = renderer.sample_latents(context, noise, [step_seed(seed)], on_step=on_step, control=control)
    captured[n] = final if n in show else captured.get(n)
    latents = ops.concatenate([captured[s] for s in show], axis=0)  # (S, h, w, 4)
    images = np.concatenate([renderer.decode(latents[k : k + 1]) for k in range(len(show))])
    strip = gif = None
    if out is not None:
        strip = os.path.splitext(out)[0] + "_strip.png"
        write_png(strip, labelled_grid([list(images)], [""], [f"step {s}/{n}" for s in show]))
        write_video(out, list(images), fps)
        gif = out
    return StepsResult(images, list(show), strip, gif)


__all__ = [
    "generate", "img2img", "inpaint", "outpaint", "grid", "denoising_steps", "check_generate_args", "slugify",
    "GenerateResult", "InpaintResult", "GridResult", "StepsResult",
]
