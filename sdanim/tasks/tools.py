"""Tools for frames from anywhere: `interpolate` (RIFE in-betweens for a folder of frames
or a video) and `upscale` (Real-ESRGAN for images or a folder), on the same
post-processing stage as the walks (`sdanim.render.post`)."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from sdanim.config import __version__
from sdanim.config.choices import PREPROCESSORS
from sdanim.config.errors import SdanimError, check
from sdanim.config.export import ExportSettings
from sdanim.formats.digest import file_sha256, files_sha256
from sdanim.core.hints import make_hint
from sdanim.core.pixels import fit_image
from sdanim.formats.images import load_image, load_pictures
from sdanim.formats.video import read_video_frames
from sdanim.model.esrgan import Upscaler, check_upscaler
from sdanim.render.export import check_output, write_video
from sdanim.render.post import check_post, post_process
from sdanim.render.run import open_run_folder
from sdanim.render.store import FrameStore, PngSequence, ensure_folder, write_png

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclasses.dataclass
class InterpolateResult:
    out: str  # the video
    frames: int  # its frame count
    rendered: int  # source frames
    seconds: float


def source_frames(source: str) -> list:
    """The frames of a folder of images (sorted by name) or a video, as uint8 arrays of
    one size (one line for a missing source, an unreadable file or mixed sizes)."""
    check(os.path.exists(source), f"the frames folder or video does not exist. Received: source={source!r}")
    if os.path.isdir(source):
        names = sorted(n for n in os.listdir(source) if n.lower().endswith(IMAGE_SUFFIXES))
        frames = [load_image(os.path.join(source, n), "source") for n in names]
    else:
        frames = read_video_frames(source)
    check(len(frames) >= 2, f"interpolation needs at least 2 frames. Received: {len(frames)} frame(s) in {source!r}")
    sizes = sorted({f.shape[:2] for f in frames})
    check(len(sizes) == 1, f"the frames must all have one size. Received: sizes {', '.join(f'{w}x{h}' for h, w in sizes)}")
    return frames


def _source_record(source: str, frames: int) -> dict:
    """What identifies the frames of a source: the SHA-256 of the video file, or of a
    folder's image files in name order, and their count."""
    if os.path.isdir(source):
        names = sorted(n for n in os.listdir(source) if n.lower().endswith(IMAGE_SUFFIXES))
        digest = files_sha256(os.path.join(source, n) for n in names)
    else:
        digest = file_sha256(source)
    return {"sha256": digest, "frames": frames}


def interpolate(source: str, times: int = 2, out: str = "outputs/interpolated.mp4", fps: float = 24.0,
                rife: Optional[str] = None, loop: bool = False, batch_size: int = 4, progress: bool = True,
                overwrite: bool = False) -> InterpolateResult:
    """In-betweens for frames from anywhere: `times` - 1 RIFE in-betweens between each
    pair of a folder's images (sorted by name) or a video's frames, exported at `fps`.

    The frames are copied into `<out stem>_frames/` with a manifest naming their source,
    and every in-between is written there as it is made, so an interrupted call resumes
    without recomputing. Frames of another source there are refused (one line) unless
    `overwrite`, which replaces them.

    Args:
        source: str. A folder of images or a video file.
        times: int. Video frames per source frame, >= 2. Defaults to 2.
        out: str. Output .mp4, .webm or .gif. Defaults to "outputs/interpolated.mp4".
        fps: float. The output's frame rate. Defaults to 24.
        rife: str or None. RIFE weights; None: the pinned v4.26 heavy download.
        loop: bool. Also fill between the last frame and the first. Defaults to False.
        batch_size: int. In-betweens per model call. Defaults to 4.
        progress: bool. Show a progress bar. Defaults to True.
        overwrite: bool. Replace another source's frames in `<out stem>_frames/`.
            Defaults to False.

    Example:
    ```python
    sdanim.interpolate("outputs/walk_frames", times=4, out="outputs/smooth.mp4", fps=24)
    ```
    """
    check(isinstance(times, int) and not isinstance(times, bool) and times >= 2,
          f"times must be a whole number >= 2 (video frames per source frame). Received: times={times!r}")
    export = ExportSettings(fps=fps, interpolate=times, rife=rife)
    check(isinstance(batch_size, int) and batch_size >= 1, f"batch_size must be at least 1. Received: batch_size={batch_size!r}")
    check_output(export, out)
    check(os.path.exists(source), f"the frames folder or video does not exist. Received: source={source!r}")
    post = check_post(export, batch_size)
    frames = source_frames(source)
    start = time.perf_counter()
    manifest = {"source": _source_record(source, len(frames)), "source_path": os.path.abspath(source),
                "post": post.record(), "sdanim": __version__}
    store, _ = open_run_folder(os.path.splitext(out)[0] + "_frames", manifest, overwrite, keys=("source",))
    for i, frame in enumerate(frames):
        if not store.has(i):
            store.write(i, frame)
    paths = post_process(store.folder, len(frames), post, loop, progress)
    write_video(out, PngSequence(paths), fps)
    return InterpolateResult(out, len(paths), len(frames), time.perf_counter() - start)


def _image_paths(sources) -> list:
    paths = []
    for source in [sources] if isinstance(sources, (str, os.PathLike)) else list(sources):
        source = os.fspath(source)
        if os.path.isdir(source):
            paths += [os.path.join(source, n) for n in sorted(os.listdir(source)) if n.lower().endswith(IMAGE_SUFFIXES)]
        else:
            check(os.path.isfile(source), f"the image does not exist. Received: image={source!r}")
            paths.append(source)
    check(paths, f"no images to upscale. Received: sources={sources!r}")
    return paths


def upscale(sources, out_dir: str = "outputs/upscaled", scale: Optional[int] = 4, model: Optional[str] = None,
            tile: int = 256, batch_size: int = 1, progress: bool = True, overwrite: bool = False) -> list:
    """Enlarges images (files, or every image in a folder) with Real-ESRGAN into `out_dir`
    as PNG under their own names.

    `out_dir/manifest.json` records what made each output (the source file's SHA-256, the
    model's, the scale and the tile size): a rerun keeps the outputs the same source and
    settings made (it resumes) and refuses, in one line, one made otherwise or a file it
    did not write, unless `overwrite`. Two sources with one name (u1/a.png, u2/a.png)
    would write one output: refused.

    Args:
        sources: str or list of str. Image files or folders.
        out_dir: str. Defaults to "outputs/upscaled".
        scale: int or None. 2 or 4; None: the model's own (4 without a model). Defaults to 4.
        model: str or None. Weights file or pinned name (`sdanim.model.esrgan.PINNED`);
            None: the pinned model for `scale`.
        tile: int. Input pixels per tile side. Defaults to 256.
        batch_size: int. Images of one size per model call. Defaults to 1.
        progress: bool. A progress bar over the tiles. Defaults to True.
        overwrite: bool. Replace outputs made otherwise. Defaults to False.

    Returns:
        The output paths, in the order of the sources.
    """
    check(isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1,
          f"batch_size must be at least 1. Received: batch_size={batch_size!r}")
    file = check_upscaler(model, scale)
    paths = _image_paths(sources)
    targets: dict = {}
    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0] + ".png"
        check(name not in targets,
              f"two images would be written to one file {name}: {targets.get(name)!r} and {path!r}; upscale them "
              f"into separate out folders. Received: sources={sources!r}")
        targets[name] = path
    store = FrameStore(ensure_folder(out_dir, "out"))
    upscaler = Upscaler(file, tile=tile)
    made_by = {"model_sha256": file.sha256, "scale": upscaler.scale, "tile": tile}  # with the source: the output
    wanted = {name: {"source": os.path.abspath(path), "sha256": file_sha256(path), **made_by, "model": file.record()}
              for name, path in targets.items()}
    stored = (store.read_manifest() or {}).get("images", {})
    decides = ("sha256", *made_by)
    done, conflicts = [], []
    for name in targets:
        if FrameStore.complete(os.path.join(out_dir, name)):
            made = stored.get(name) or {}
            same = all(made.get(k) == wanted[name][k] for k in decides)
            (done if same else conflicts).append(name)
    if conflicts and not overwrite:
        raise SdanimError(
            f"{out_dir} already holds {len(conflicts)} output(s) made from another image or with other settings, or "
            f"not by sdanim (e.g. {conflicts[0]}: {_made(stored.get(conflicts[0]))}); pass --overwrite "
            f"(overwrite=True) or choose another --out. Received: out_dir={out_dir!r}")
    store.write_manifest({"sdanim": __version__, "images": {**stored, **wanted}})
    todo = [name for name in targets if name not in done]
    bar = tqdm(total=len(todo), unit="image", desc=f"upscaling x{upscaler.scale}", disable=not progress)
    try:
        for batch, images in _batches(todo, targets, batch_size):
            share = len(batch) / upscaler.tile_count(images.shape[1:])  # of the bar, per tile of this batch
            enlarged = upscaler.upscale(images, progress=lambda n: bar.update(n * share))
            for name, image in zip(batch, enlarged):
                write_png(os.path.join(out_dir, name), image,
                          {"sdanim": {"upscaled": os.path.basename(targets[name]), "model": file.record()}})
    finally:
        bar.close()
    return [os.path.join(out_dir, name) for name in targets]


def _batches(names: list, paths: dict, size: int):
    """(names, (B, H, W, 3) images) of up to `size` consecutive images of one size, each
    image read when its batch is made."""
    batch, images = [], []
    for name in names:
        image = load_image(paths[name], "image")
        if images and (len(batch) == size or image.shape != images[0].shape):
            yield batch, np.stack(images)
            batch, images = [], []
        batch.append(name)
        images.append(image)
    if batch:
        yield batch, np.stack(images)


def _made(entry) -> str:
    if entry is None:
        return "not in the manifest"
    return f"from {os.path.basename(entry.get('source', '?'))} x{entry.get('scale')} with {entry.get('model', {}).get('file')}"


def control_hints(source, preprocess: str = "canny", out_dir: str = "outputs/hints", size: Optional[tuple] = None,
                  fit: str = "crop", seed: int = 0) -> list:
    """The hint images a ControlNet would be given, written as PNG to look at first:
    one per picture of an image, a folder of images or a video (`sdanim.core.hints`).

    Args:
        source: str. An image, a folder of images or a video.
        preprocess: str. "canny", "lineart", "shuffle", "tile" or "none". Defaults to "canny".
        out_dir: str. Defaults to "outputs/hints".
        size: (height, width) or None: each picture fitted to it first (as a render fits
            its control images); None: the pictures' own size. Defaults to None.
        fit: "crop" or "resize". Defaults to "crop".
        seed: int. The shuffle's seed. Defaults to 0.

    Returns:
        The paths written, hint_00000.png, ...
    """
    check(preprocess in PREPROCESSORS and preprocess != "inpaint",
          f"preprocess must be one of {', '.join(p for p in PREPROCESSORS if p != 'inpaint')} (inpaint hints need the "
          f"inpaint command's mask). Received: preprocess={preprocess!r}")
    fitted = (lambda picture: fit_image(picture, size[0], size[1], fit)) if size is not None else None
    pictures = load_pictures(source, "source", fitted)
    ensure_folder(out_dir, "out")
    paths = []
    for i, picture in enumerate(pictures):
        hint = make_hint(picture, preprocess, seed)
        path = os.path.join(out_dir, f"hint_{i:05d}.png")
        write_png(path, hint if hint.dtype == np.uint8 else np.clip(np.rint(hint * 255), 0, 255).astype(np.uint8),
                  {"sdanim": {"hint": preprocess, "from": os.path.basename(os.fspath(source)), "index": i}})
        paths.append(path)
    return paths


__all__ = ["interpolate", "upscale", "control_hints", "source_frames", "InterpolateResult"]
