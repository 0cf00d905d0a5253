"""Audio-synced timing: an audio track decides how fast the walk moves, or where its
keyframes fall.

Pure functions of samples (decoding a file is `sdanim.formats.audio`). Analysis:
librosa -- RMS loudness, onset strength (spectral flux on a mel spectrogram) and beat
tracking (Ellis 2007), every curve on one hop grid, then averaged over each frame's
window of time.

Modes (`ExportSettings.audio_mode`):
    loudness  the walk moves faster where the music is louder;
    onsets    faster on note onsets and drum hits;
    beats     every keyframe lands on a beat: keyframe j on beat j * k (k =
              `beats_per_keyframe`), keyframe 0 at the start; the frames between move
              evenly in time (after the transition's easing).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from sdanim.config.errors import check
from sdanim.core.interpolation import EASINGS

SAMPLE_RATE = 22050  # librosa's default analysis rate
HOP = 512  # analysis hop: 23 ms at SAMPLE_RATE
SILENCE = 1e-4  # peak amplitude below which a track counts as silent


@dataclasses.dataclass(frozen=True)
class Analysis:
    """An audio track's curves on one hop grid (`HOP` samples at `SAMPLE_RATE`).

    loudness, onsets: (T,) RMS loudness and onset strength; beats: (N,) beat times in
    seconds; tempo: beats per minute (librosa's estimate); duration in seconds.
    """

    loudness: np.ndarray
    onsets: np.ndarray
    beats: np.ndarray
    tempo: float
    duration: float

    def curve(self, mode: str) -> np.ndarray:
        return self.loudness if mode == "loudness" else self.onsets

    def per_frame(self, mode: str, num_frames: int, fps: float) -> np.ndarray:
        """(num_frames,) the curve averaged over each frame's 1/fps seconds (0 past the end)."""
        return _window_means(self.curve(mode), num_frames, fps)


def analyze(samples: np.ndarray, rate: int = SAMPLE_RATE) -> Analysis:
    """Loudness, onset strength, beats and tempo of a mono track (librosa), in this process.

    librosa's beat tracker is numba code cached on disk, and numba's cache is not safe
    when two processes compile it at once (numba/numba#10128: a segmentation fault then,
    and on every later load of the mixed-up cache). sdanim calls this in a process of its
    own, one at a time, through `sdanim.formats.audio.analyze_audio`.
    """
    import librosa

    y = np.asarray(samples, np.float32)
    loudness = librosa.feature.rms(y=y, frame_length=2048, hop_length=HOP)[0]
    onsets = librosa.onset.onset_strength(y=y, sr=rate, hop_length=HOP)
    tempo, frames = librosa.beat.beat_track(onset_envelope=onsets, sr=rate, hop_length=HOP, units="frames")
    beats = librosa.frames_to_time(frames, sr=rate, hop_length=HOP)
    tempo = float(np.atleast_1d(tempo)[0])
    return Analysis(loudness.astype(np.float64), onsets.astype(np.float64), np.asarray(beats, np.float64), tempo,
                    len(y) / rate)


def _window_means(curve: np.ndarray, num_frames: int, fps: float) -> np.ndarray:
    """The mean of a hop-grid curve (sample k at time k * HOP / SAMPLE_RATE, centred)
    over [i/fps, (i+1)/fps) for each frame i: the curve's integral, differenced."""
    curve = np.asarray(curve, np.float64)
    step = HOP / SAMPLE_RATE
    edges = np.arange(len(curve) + 1) * step - step / 2  # each hop's cell
    integral = np.concatenate([[0.0], np.cumsum(curve * step)])
    bounds = np.arange(num_frames + 1) / fps
    area = np.interp(bounds, edges, integral)  # flat past the end: silence
    return np.maximum(np.diff(area) * fps, 0.0)


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


def check_beats_per_keyframe(value) -> int:
    check(isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1,
          f"beats_per_keyframe must be a whole number >= 1. Received: beats_per_keyframe={value!r}")
    return int(value)


def keyframe_times(beats: np.ndarray, transitions: int, every: int, duration: Optional[float] = None) -> np.ndarray:
    """(transitions + 1,) times of the keyframes: 0, then beat every, 2 * every, ...
    (1-based beat numbers). One line when the track has too few beats."""
    every = check_beats_per_keyframe(every)
    beats = np.asarray(beats, np.float64)
    beats = beats[beats > 0.0]
    need = transitions * every
    check(len(beats) >= need,
          f"keyframes on every {every} beat(s) need {need} beats for {transitions} transition(s); the audio has "
          f"{len(beats)}{'' if duration is None else f' in {duration:.1f} s'}. Received: beats_per_keyframe={every}")
    return np.concatenate([[0.0], beats[every - 1::every][:transitions]])


def beat_positions(key_times: np.ndarray, fps: float, easings: Sequence[str], include_end: bool = True) -> np.ndarray:
    """Frame positions for frames at times i / fps with keyframe k at key_times[k]:
    within transition k, t's fraction of the way from key_times[k] to key_times[k + 1]
    (after the transition's easing). A walk that ends on its last keyframe gets that
    keyframe as its final frame; a loop stops one frame short (its next frame is frame 0)."""
    key_times = np.asarray(key_times, np.float64)
    end = float(key_times[-1])
    count = int(np.ceil(end * fps - 1e-9))  # frames strictly before the last keyframe's time
    times = np.arange(count) / fps
    k = np.clip(np.searchsorted(key_times, times, side="right") - 1, 0, len(key_times) - 2)
    span = key_times[k + 1] - key_times[k]
    fraction = np.where(span > 0, (times - key_times[k]) / np.where(span > 0, span, 1.0), 0.0)
    eased = np.array([EASINGS[easings[j]](float(f)) for j, f in zip(k, fraction)])
    positions = k + eased
    if include_end:
        positions = np.append(positions, float(len(key_times) - 1))
    return positions


__all__ = ["analyze", "Analysis", "audio_positions", "keyframe_times",
           "beat_positions", "check_beats_per_keyframe", "SAMPLE_RATE", "HOP", "SILENCE"]
