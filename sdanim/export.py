"""Frames -> files: animated GIF, MP4 (imageio-ffmpeg), contact sheets.

Every writer goes through `atomic_write`: a file at the output path is always whole.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np

from sdanim.errors import check
from sdanim.frames import atomic_write

VIDEO_FORMATS = (".gif", ".mp4")


def output_format(path: str) -> str:
    """The output extension of `path`, checked: ".gif" or ".mp4"."""
    ext = os.path.splitext(str(path))[1].lower()
    check(
        ext in VIDEO_FORMATS,
        f"out must end in {' or '.join(VIDEO_FORMATS)}. Received: out={str(path)!r}",
    )
    return ext


def check_fps(fps) -> float:
    check(
        isinstance(fps, (int, float)) and not isinstance(fps, bool) and math.isfinite(fps) and fps > 0,
        f"fps must be > 0. Received: fps={fps}",
    )
    return float(fps)


def boomerang(frames: Sequence[np.ndarray]) -> list:
    """A -> B -> A without repeating either end: [0..n-1] + [n-2..1]."""
    frames = list(frames)
    return frames + frames[-2:0:-1]


def write_gif(path: str, frames: Sequence[np.ndarray], fps: float, loop: int = 0) -> None:
    """Animated GIF, looping forever by default. GIF stores delays in 1/100 s, so the
    delay is 1000/fps ms rounded to 10 ms."""
    import imageio.v3 as iio

    fps = check_fps(fps)
    duration_ms = int(round(100.0 / fps)) * 10
    stack = np.stack(frames)
    atomic_write(path, lambda tmp: iio.imwrite(tmp, stack, extension=".gif", duration=duration_ms, loop=loop))


def write_mp4(path: str, frames: Sequence[np.ndarray], fps: float, quality: float = 8.0) -> None:
    """H.264 MP4 (yuv420p) through imageio-ffmpeg. quality: 0-10 (imageio's scale)."""
    import imageio.v2 as imageio

    fps = check_fps(fps)

    def write(tmp):
        writer = imageio.get_writer(
            tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264",
            quality=quality, pixelformat="yuv420p", macro_block_size=16,
        )
        try:
            for frame in frames:
                writer.append_data(np.asarray(frame))
        finally:
            writer.close()

    atomic_write(path, write)


def write_video(path: str, frames: Sequence[np.ndarray], fps: float, ping_pong: bool = False) -> None:
    """Writes a GIF or MP4 by `path`'s extension; ping_pong plays it back and forth."""
    ext = output_format(path)
    frames = boomerang(frames) if ping_pong else list(frames)
    if ext == ".gif":
        write_gif(path, frames, fps)
    else:
        write_mp4(path, frames, fps)


def contact_sheet(frames: Sequence[np.ndarray], columns: Optional[int] = None, gap: int = 4) -> np.ndarray:
    """All frames in a grid (row-major), white gaps between: (H', W', 3) uint8."""
    frames = [np.asarray(f) for f in frames]
    check(len(frames) >= 1, "contact_sheet needs at least one frame. Received: 0 frames")
    n = len(frames)
    columns = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / columns))
    h, w = frames[0].shape[:2]
    sheet = np.full((rows * h + (rows - 1) * gap, columns * w + (columns - 1) * gap, 3), 255, np.uint8)
    for k, frame in enumerate(frames):
        r, c = divmod(k, columns)
        sheet[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = frame
    return sheet
