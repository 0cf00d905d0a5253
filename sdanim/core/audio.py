"""Audio-synced timing: a WAV file decides how fast the walk moves, frame by frame.

Each frame covers 1/fps seconds of audio. Its loudness (RMS) or onset strength (the
rise in loudness from the previous frame, a simple spectral-flux stand-in) sets the
speed along the keyframe path, so the picture moves on the beat and rests in the quiet.
Read with the standard library's `wave` module: PCM WAV only, nothing executed.
"""

from __future__ import annotations

import hashlib
import wave

import numpy as np

from sdanim.config.choices import AUDIO_MODES
from sdanim.config.errors import SdanimError, check


def read_wav(path: str) -> tuple:
    """(mono float32 samples in [-1, 1], sample rate) of a PCM WAV file."""
    try:
        with wave.open(path, "rb") as f:
            rate, width, channels, count = f.getframerate(), f.getsampwidth(), f.getnchannels(), f.getnframes()
            raw = f.readframes(count)
    except FileNotFoundError:
        raise SdanimError(f"the audio file does not exist. Received: audio={path!r}") from None
    except (wave.Error, EOFError, OSError) as error:
        raise SdanimError(f"audio must be a PCM WAV file ({error}). Received: audio={path!r}") from None
    check(width in (1, 2, 3, 4), f"audio must be 8, 16, 24 or 32-bit PCM. Received: audio={path!r} ({8 * width}-bit)")
    if width == 3:  # 24-bit little-endian: widen to 32 bits
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        data = (b[:, 0].astype(np.int32) | (b[:, 1].astype(np.int32) << 8) | (b[:, 2].astype(np.int32) << 16))
        data = np.where(data >= 1 << 23, data - (1 << 24), data).astype(np.float32) / (1 << 23)
    elif width == 1:
        data = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    else:
        dtype = np.int16 if width == 2 else np.int32
        data = np.frombuffer(raw, dtype).astype(np.float32) / float(np.iinfo(dtype).max)
    data = data.reshape(-1, channels).mean(axis=1) if channels > 1 else data
    check(len(data) > 0 and rate > 0, f"the audio file is empty. Received: audio={path!r}")
    return data, rate


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def frame_strength(samples: np.ndarray, rate: int, num_frames: int, fps: float, mode: str = "loudness") -> np.ndarray:
    """(num_frames,) non-negative strength of the audio under each frame.

    Frames past the end of the audio get 0 (silence).
    """
    check(mode in AUDIO_MODES, f"audio_mode must be one of {', '.join(AUDIO_MODES)}. Received: audio_mode={mode!r}")
    rms = np.zeros(num_frames)
    for i in range(num_frames):
        a, b = int(round(i * rate / fps)), int(round((i + 1) * rate / fps))
        window = samples[a:b]
        rms[i] = float(np.sqrt(np.mean(window.astype(np.float64) ** 2))) if len(window) else 0.0
    if mode == "onsets":
        return np.maximum(np.diff(rms, prepend=rms[0]), 0.0)
    return rms


def audio_positions(strength: np.ndarray, path_length: float, include_end: bool = True, floor: float = 0.05) -> np.ndarray:
    """Frame positions along a path of `path_length` transitions, advancing by each
    frame's strength (plus a small floor so the walk never stops dead).

    Frame 0 is at 0; the last frame is at path_length (or one step short of it for a
    loop, whose next frame is frame 0 again).
    """
    s = np.asarray(strength, dtype=np.float64)
    s = s / s.max() if s.max() > 0 else np.ones_like(s)
    speed = floor + s  # (F,) how far each frame moves on to the next
    steps = speed[:-1] if include_end else speed
    cum = np.concatenate([[0.0], np.cumsum(steps)])
    return path_length * cum[: len(s)] / cum[-1]
