"""Audio in: any file ffmpeg reads -> mono float32 samples for `sdanim.core.audio`'s timing.

The ffmpeg binary that imageio-ffmpeg ships (already sdanim's video writer) turns WAV of
any sample format, MP3, AAC/M4A, FLAC, Ogg Vorbis/Opus or the audio track of a video into
mono float32 at `SAMPLE_RATE`, through a pipe; nothing in the file is executed.
(librosa.load would read through soundfile, whose libsndfile has no AAC/M4A or video
containers, and fall back to audioread, which needs a system ffmpeg or GStreamer.)

Analysis: `analyze_audio` runs librosa (`sdanim.core.audio.analyze`) in a Python process
of its own, one at a time per machine (a file lock), with numba's compiled code cached in
sdanim's own folder. numba's on-disk cache is not safe when two processes compile the same
code at once (numba/numba#10128: librosa's beat tracker then crashes with a segmentation
fault, and again on every later load of the mixed-up cache). In a process of its own a
crash cannot take a notebook's kernel or a render with it; a crash clears sdanim's cache
and the analysis runs once more.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import signal
import subprocess
import sys
import tempfile
from typing import Sequence

import numpy as np

import sdanim
from sdanim.config.errors import SdanimError, check
from sdanim.core.audio import HOP, SAMPLE_RATE, SILENCE, Analysis, analyze


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


ANALYSIS_TIMEOUT = 900  # seconds: numba's first compile takes about 30 s on 2 cores


def numba_cache_dir() -> str:
    """Where the analysis process keeps numba's compiled code: sdanim's own folder under
    the user's cache ($XDG_CACHE_HOME, else ~/.cache), unless NUMBA_CACHE_DIR is set."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sdanim", "numba")


def analyze_audio(samples: np.ndarray, rate: int = SAMPLE_RATE) -> Analysis:
    """Loudness, onset strength, beats and tempo of a mono track, computed by librosa in
    a process of its own (see the module's docstring). One line (SdanimError) if the
    analysis fails twice or takes over `ANALYSIS_TIMEOUT` seconds."""
    return analyze_audios([samples], rate)[0]


def analyze_audios(tracks: Sequence[np.ndarray], rate: int = SAMPLE_RATE) -> list:
    """`analyze_audio` of several mono tracks at `rate`, in one process (it starts once)."""
    from filelock import FileLock

    tracks = [np.ascontiguousarray(t, np.float32) for t in tracks]
    seconds = sum(len(t) for t in tracks) / rate
    own_cache = "NUMBA_CACHE_DIR" not in os.environ
    cache = numba_cache_dir() if own_cache else os.environ["NUMBA_CACHE_DIR"]
    os.makedirs(os.path.dirname(cache) if own_cache else cache, exist_ok=True)
    lock = cache + ".lock" if own_cache else os.path.join(cache, "sdanim-audio.lock")
    with FileLock(lock, timeout=ANALYSIS_TIMEOUT):
        result = _run_analysis(tracks, rate, cache)
        if isinstance(result, list):
            return result
        # A crash (a signal): numba's cached code may be the mixed-up kind. Compile afresh,
        # in sdanim's own folder (cleared) or, under the user's NUMBA_CACHE_DIR, in a
        # temporary one (theirs is left as it is).
        if own_cache:
            import shutil

            shutil.rmtree(cache, ignore_errors=True)
            result = _run_analysis(tracks, rate, cache)
        else:
            with tempfile.TemporaryDirectory(prefix="sdanim-numba-") as fresh:
                result = _run_analysis(tracks, rate, fresh)
    if isinstance(result, list):
        return result
    raise SdanimError(f"the audio analysis (librosa) crashed twice ({result}), the second time with numba's "
                      f"code compiled afresh. Received: {seconds:.1f} s of audio")


def _analysis_command() -> list:
    return [sys.executable, "-c", "from sdanim.formats.audio import _analysis_process; _analysis_process()"]


def _run_analysis(tracks: list, rate: int, cache: str):
    """[Analysis of each track] from a fresh process, or the name of the signal that killed it."""
    seconds = sum(len(t) for t in tracks) / rate
    sent = io.BytesIO()
    np.savez(sent, *tracks)
    env = dict(os.environ, NUMBA_CACHE_DIR=cache)
    here = os.path.dirname(os.path.dirname(os.path.abspath(sdanim.__file__)))  # this very sdanim
    env["PYTHONPATH"] = os.pathsep.join([here] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    try:
        proc = subprocess.run(_analysis_command() + [str(int(rate))], input=sent.getvalue(), capture_output=True,
                              env=env, timeout=ANALYSIS_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise SdanimError(f"the audio analysis (librosa) took over {ANALYSIS_TIMEOUT} s. "
                          f"Received: {seconds:.1f} s of audio") from None
    if proc.returncode < 0:
        return signal.Signals(-proc.returncode).name
    if proc.returncode != 0:
        lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise SdanimError(f"the audio analysis (librosa) failed: {lines[-1] if lines else proc.returncode}. "
                          f"Received: {seconds:.1f} s of audio")
    with np.load(io.BytesIO(proc.stdout)) as out:
        return [Analysis(out[f"{i}_loudness"], out[f"{i}_onsets"], out[f"{i}_beats"], float(out[f"{i}_tempo"]),
                         float(out[f"{i}_duration"])) for i in range(len(tracks))]


def _analysis_process() -> None:
    """The analysis process: the tracks (.npz, float32) on stdin, the rate in argv, each
    track's Analysis arrays (.npz, "<i>_<field>") on stdout."""
    with np.load(io.BytesIO(sys.stdin.buffer.read())) as tracks:
        analyses = [analyze(tracks[f"arr_{i}"], int(sys.argv[1])) for i in range(len(tracks.files))]
    buffer = io.BytesIO()
    np.savez(buffer, **{f"{i}_{field.name}": getattr(a, field.name) for i, a in enumerate(analyses)
                        for field in dataclasses.fields(a)})
    sys.stdout.buffer.write(buffer.getvalue())
    sys.stdout.buffer.flush()


__all__ = ["read_audio", "analyze_audio", "analyze_audios", "numba_cache_dir"]
