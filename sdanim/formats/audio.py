"""Audio in: any file ffmpeg reads -> mono float32 samples for `sdanim.core.audio`'s timing.

The ffmpeg binary that imageio-ffmpeg ships (already sdanim's video writer) turns WAV of
any sample format, MP3, AAC/M4A, FLAC, Ogg Vorbis/Opus or the audio track of a video into
mono float32 at `SAMPLE_RATE`, through a pipe; nothing in the file is executed.
(librosa.load would read through soundfile, whose libsndfile has no AAC/M4A or video
containers, and fall back to audioread, which needs a system ffmpeg or GStreamer.)
"""

from __future__ import annotations

import functools
import os
import subprocess

import numpy as np

from sdanim.config.errors import SdanimError, check
from sdanim.core.audio import HOP, SAMPLE_RATE, SILENCE


def read_audio(path: str) -> tuple:
    """(mono float32 samples in [-1, 1] at `SAMPLE_RATE`, SAMPLE_RATE) of any audio file
    ffmpeg reads, or a video file's first audio track. One line (SdanimError) for a
    missing file, something ffmpeg cannot decode, no audio stream, or silence."""
    check(isinstance(path, (str, os.PathLike)) and os.path.isfile(path),
          f"the audio file does not exist. Received: audio={path!r}")
    stat = os.stat(path)
    samples = _decoded(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)  # the checks and the timing share it
    check(len(samples) >= HOP and float(np.abs(samples).max()) > SILENCE,
          f"the audio is silent (or shorter than {1000 * HOP / SAMPLE_RATE:.0f} ms): nothing to time the walk by. "
          f"Received: audio={path!r}")
    return samples, SAMPLE_RATE


@functools.lru_cache(maxsize=2)
def _decoded(path: str, mtime_ns: int, size: int) -> np.ndarray:
    import imageio_ffmpeg

    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-i", path, "-map", "0:a:0",
               "-vn", "-ac", "1", "-ar", str(SAMPLE_RATE), "-f", "f32le", "-"]
    proc = subprocess.run(command, capture_output=True, check=False)
    problem = proc.stderr.decode("utf-8", "replace").strip().splitlines()
    if proc.returncode != 0 or not proc.stdout:
        reason = problem[0] if problem else "no audio decoded"
        if any("matches no streams" in line for line in problem):
            reason = "the file has no audio stream"
        raise SdanimError(f"cannot read the audio ({_short(reason, path)}). Received: audio={path!r}")
    if problem:  # decoded with errors: a truncated or damaged file would time the walk wrongly
        raise SdanimError(f"the audio file is damaged or truncated (ffmpeg: {_short(problem[0], path)}). "
                          f"Received: audio={path!r}")
    samples = np.frombuffer(proc.stdout, np.float32)
    check(np.isfinite(samples).all(), f"the audio decodes to invalid samples. Received: audio={path!r}")
    samples.flags.writeable = False  # shared by every caller of the cache
    return samples


def _short(text: str, path: str) -> str:
    text = " ".join(text.replace(os.fspath(path), "<file>").split())
    return text[:160]


__all__ = ["read_audio"]
