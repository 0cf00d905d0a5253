"""Tools for frames from anywhere: `interpolate` (RIFE in-betweens for a folder of frames
or a video) and `upscale` (Real-ESRGAN for images or a folder), on the same
post-processing stage as the walks (`sdanim.render.post`)."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional

import numpy as np

from sdanim.config.errors import SdanimError, check
from sdanim.config.export import ExportSettings
from sdanim.core.pixels import load_image
from sdanim.model.esrgan import Upscaler, check_upscaler
from sdanim.render.export import check_output, write_video
from sdanim.render.post import check_post, post_process
from sdanim.render.store import FrameStore, PngSequence, ensure_folder, write_png

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclasses.dataclass
class InterpolateResult:
    out: str  # the video
    frames: int  # its frame count
    rendered: int  # source frames
    seconds: float


def _video_frames(path: str) -> list:
    import imageio.v2 as imageio

    try:
        reader = imageio.get_reader(path, format="FFMPEG")
        frames = [np.asarray(f)[..., :3] for f in reader]
        reader.close()
    except Exception as error:  # imageio-ffmpeg raises OSError/RuntimeError for what ffmpeg cannot read
        reason = " ".join(str(error).split())[:160] or type(error).__name__
        raise SdanimError(f"cannot read the video ({reason}). Received: source={path!r}") from None
    return frames


def source_frames(source: str) -> list:
    """The frames of a folder of images (sorted by name) or a video, as uint8 arrays of
    one size (one line for a missing source, an unreadable file or mixed sizes)."""
    check(os.path.exists(source), f"the frames folder or video does not exist. Received: source={source!r}")
    if os.path.isdir(source):
        names = sorted(n for n in os.listdir(source) if n.lower().endswith(IMAGE_SUFFIXES))
        frames = [load_image(os.path.join(source, n), "source") for n in names]
    else:
        frames = _video_frames(source)
    check(len(frames) >= 2, f"interpolation needs at least 2 frames. Received: {len(frames)} frame(s) in {source!r}")
    sizes = sorted({f.shape[:2] for f in frames})
    check(len(sizes) == 1, f"the frames must all have one size. Received: sizes {', '.join(f'{w}x{h}' for h, w in sizes)}")
    return frames


def interpolate(source: str, times: int = 2, out: str = "outputs/interpolated.mp4", fps: float = 24.0,
                rife: Optional[str] = None, loop: bool = False, batch_size: int = 4, progress: bool = True
                ) -> InterpolateResult:
    """In-betweens for frames from anywhere: `times` - 1 RIFE in-betweens between each
    pair of a folder's images (sorted by name) or a video's frames, exported at `fps`.

    The frames are copied into `<out stem>_frames/` and every in-between is written there
    as it is made, so an interrupted call resumes without recomputing.

    Args:
        source: str. A folder of images or a video file.
        times: int. Video frames per source frame, >= 2. Defaults to 2.
        out: str. Output .mp4, .webm or .gif. Defaults to "outputs/interpolated.mp4".
        fps: float. The output's frame rate. Defaults to 24.
        rife: str or None. RIFE weights; None: the pinned v4.26 heavy download.
        loop: bool. Also fill between the last frame and the first. Defaults to False.
        batch_size: int. In-betweens per model call. Defaults to 4.

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
    store = FrameStore(ensure_folder(os.path.splitext(out)[0] + "_frames", "out"))
    for i, frame in enumerate(frames):
        if not store.has(i):
            store.write(i, frame)
    paths = post_process(store.folder, len(frames), post, loop, progress)
    write_video(out, PngSequence(paths), fps)
    return InterpolateResult(out, len(paths), len(frames), time.perf_counter() - start)


def upscale(sources, out_dir: str = "outputs/upscaled", scale: Optional[int] = 4, model: Optional[str] = None,
            tile: int = 256, batch_size: int = 1, progress: bool = True) -> list:
    """Enlarges images (files, or every image in a folder) with Real-ESRGAN into `out_dir`
    as PNG under their own names; images already there are kept (a rerun resumes).

    Args:
        sources: str or list of str. Image files or folders.
        out_dir: str. Defaults to "outputs/upscaled".
        scale: int or None. 2 or 4; None: the model's own (4 without a model). Defaults to 4.
        model: str or None. Weights file or pinned name (`sdanim.model.esrgan.PINNED`);
            None: the pinned model for `scale`.
        tile: int. Input pixels per tile side. Defaults to 256.

    Returns:
        The output paths.
    """
    file = check_upscaler(model, scale)
    paths = []
    for source in [sources] if isinstance(sources, (str, os.PathLike)) else list(sources):
        source = os.fspath(source)
        if os.path.isdir(source):
            paths += [os.path.join(source, n) for n in sorted(os.listdir(source)) if n.lower().endswith(IMAGE_SUFFIXES)]
        else:
            check(os.path.isfile(source), f"the image does not exist. Received: image={source!r}")
            paths.append(source)
    check(paths, f"no images to upscale. Received: sources={sources!r}")
    ensure_folder(out_dir, "out")
    upscaler = Upscaler(file, tile=tile)
    outputs = []
    for path in paths:
        target = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
        outputs.append(target)
        if FrameStore.complete(target):
            continue
        image = load_image(path, "image")
        upscaler.check_fits((1, *image.shape))
        write_png(target, upscaler.upscale(image[None])[0],
                  {"sdanim": {"upscaled": os.path.basename(path), "model": file.record()}})
    return outputs


__all__ = ["interpolate", "upscale", "source_frames", "InterpolateResult"]
