"""Frames -> files: animated GIF, MP4 (imageio-ffmpeg), contact sheets.

Every writer goes through `atomic_write`: a file at the output path is always whole.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np

from sdanim.config.errors import check
from sdanim.config.export import ExportSettings, check_fps, check_quality, output_format
from sdanim.formats.audio import read_audio
from sdanim.render.store import atomic_write, ensure_folder

_CODECS = {".mp4": ("libx264", "aac"), ".webm": ("libvpx-vp9", "libopus")}


def boomerang(frames: Sequence[np.ndarray]) -> list:
    """A -> B -> A without repeating either end: [0..n-1] + [n-2..1]."""
    frames = list(frames)
    return frames + frames[-2:0:-1]


def gif_palette(frames: Sequence[np.ndarray], max_colors: int = 256):
    """One palette for the whole animation, sized to the content.

    Per-frame palettes (what a plain GIF writer does) make flat areas flicker from
    frame to frame; one shared palette does not. It is built by median cut from a
    sample of up to 16 frames, with as many colours as the sample holds, up to 256,
    so simple animations get small palettes and small files.
    """
    from PIL import Image

    step = max(1, len(frames) // 16)
    sample = np.concatenate([np.asarray(f)[::2, ::2] for f in frames[::step]], axis=0)  # (n*H/2, W/2, 3)
    colors = min(max_colors, len(np.unique(sample.reshape(-1, 3), axis=0)))
    return Image.fromarray(sample).quantize(colors=max(colors, 2), method=Image.Quantize.MEDIANCUT)


def write_gif(path: str, frames: Sequence[np.ndarray], fps: float, loop: int = 0) -> None:
    """Animated GIF with one shared palette (see `gif_palette`), looping forever by
    default. GIF stores delays in 1/100 s, so the delay is 1000/fps ms rounded to 10 ms."""
    from PIL import Image

    fps = check_fps(fps)
    duration_ms = int(round(100.0 / fps)) * 10
    palette = gif_palette(frames)
    images = [Image.fromarray(np.asarray(f)).quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG) for f in frames]

    def write(tmp):
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=loop, optimize=False)

    atomic_write(path, write)


def write_mp4(path: str, frames: Sequence[np.ndarray], fps: float, quality: float = 8.0, audio: Optional[str] = None) -> None:
    """H.264 MP4 or VP9 WebM (by extension; yuv420p) through imageio-ffmpeg.

    quality: 0-10 (imageio's scale; 10 is best). audio: optional audio file muxed in
    (AAC in MP4, Opus in WebM), cut to the video's length.
    """
    import imageio.v2 as imageio

    fps = check_fps(fps)
    quality = check_quality(quality)
    codec, audio_codec = _CODECS.get(os.path.splitext(path)[1].lower(), _CODECS[".mp4"])

    def write(tmp):
        extra = {"audio_path": audio, "audio_codec": audio_codec, "output_params": ["-shortest"]} if audio else {}
        writer = imageio.get_writer(
            tmp, format="FFMPEG", mode="I", fps=fps, codec=codec,
            quality=quality, pixelformat="yuv420p", macro_block_size=16, **extra,
        )
        try:
            for frame in frames:
                writer.append_data(np.asarray(frame))
        finally:
            writer.close()

    atomic_write(path, write)


def blend_double(frames: Sequence[np.ndarray], loop: bool = False) -> list:
    """Doubles the frame count by inserting the mean of each consecutive pair (and of
    the last and first frame for a loop): smoother playback at twice the fps."""
    frames = [np.asarray(f) for f in frames]
    out = []
    pairs = list(zip(frames, frames[1:] + ([frames[0]] if loop else [])))
    for a, b in pairs:
        out.append(a)
        out.append(((a.astype(np.uint16) + b.astype(np.uint16) + 1) // 2).astype(np.uint8))
    if not loop:
        out.append(frames[-1])
    return out


def write_video(
    path: str, frames: Sequence[np.ndarray], fps: float, ping_pong: bool = False,
    quality: float = 8.0, audio: Optional[str] = None,
) -> None:
    """Writes a GIF, MP4 or WebM by `path`'s extension; ping_pong plays it back and forth."""
    ext = output_format(path)
    frames = boomerang(frames) if ping_pong else list(frames)
    if ext == ".gif":
        write_gif(path, frames, fps)
    else:
        write_mp4(path, frames, fps, quality=quality, audio=audio)


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


def check_output(export: ExportSettings, out: str) -> None:
    """Checks `out` against the export settings (format, audio) and creates its folder."""
    ext = output_format(out)
    if export.audio is not None:
        check(ext != ".gif", f"a GIF cannot carry audio; write .mp4 or .webm. Received: out={out!r}")
        read_audio(export.audio)
    ensure_folder(os.path.dirname(os.path.abspath(out)), "out")
