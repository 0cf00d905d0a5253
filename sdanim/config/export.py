"""How rendered frames become a video: `ExportSettings` and the checks of its values."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

from sdanim.config.choices import AUDIO_MODES, VIDEO_FORMATS
from sdanim.config.errors import check


def output_format(path: str) -> str:
    """The output extension of `path`, checked: ".gif", ".mp4" or ".webm"."""
    ext = os.path.splitext(str(path))[1].lower()
    check(
        ext in VIDEO_FORMATS,
        f"out must end in {', '.join(VIDEO_FORMATS)}. Received: out={str(path)!r}",
    )
    return ext


def check_fps(fps) -> float:
    check(
        isinstance(fps, (int, float)) and not isinstance(fps, bool) and math.isfinite(fps) and fps > 0,
        f"fps must be > 0. Received: fps={fps}",
    )
    return float(fps)


def check_quality(quality) -> float:
    check(
        isinstance(quality, (int, float)) and not isinstance(quality, bool) and 0 <= quality <= 10,
        f"quality must be between 0 and 10. Received: quality={quality}",
    )
    return float(quality)


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    """How rendered frames become a video.

    Args:
        fps: float. Frames per second. Defaults to 12.
        ping_pong: bool. Play forward then back. Defaults to False.
        double: bool. Double the frame count by blending neighbours (played at
            2 x fps for the same duration). Defaults to False.
        quality: float. MP4/WebM quality, 0-10. Defaults to 8.
        sheet: bool. Also write a contact sheet `<out stem>_sheet.png`. Defaults to False.
        audio: str or None. An audio file (any format ffmpeg reads, or a video's audio
            track) whose loudness, onsets or beats (`audio_mode`) time the walk; muxed
            into an MP4/WebM. Defaults to None.
        audio_mode: str. "loudness" or "onsets" (how fast the walk moves), or "beats"
            (keyframe j on beat j * beats_per_keyframe). Defaults to "loudness".
        beats_per_keyframe: int. With audio_mode="beats", the beats from one keyframe
            to the next. Defaults to 4 (a bar of 4/4).
        interpolate: int. Video frames per rendered frame: RIFE makes interpolate - 1
            in-betweens between each pair of neighbours (1: none). Defaults to 1.
        rife: str or None. RIFE weights (flownet.pkl of v4.22-v4.26, or .safetensors);
            None: the pinned v4.26 heavy download. Defaults to None.
        upscale: int or None. Enlarge every video frame 2x or 4x with Real-ESRGAN.
            Defaults to None.
        upscale_model: str or None. The upscaler's weights: a file, or a name of a
            pinned download ("realesrgan-x4plus", ...); None: the pinned model for
            `upscale`. Defaults to None.
    """

    fps: float = 12.0
    ping_pong: bool = False
    double: bool = False
    quality: float = 8.0
    sheet: bool = False
    audio: Optional[str] = None
    audio_mode: str = "loudness"
    interpolate: int = 1
    rife: Optional[str] = None
    upscale: Optional[int] = None
    upscale_model: Optional[str] = None
    beats_per_keyframe: int = 4

    def __post_init__(self):
        object.__setattr__(self, "fps", check_fps(self.fps))
        object.__setattr__(self, "quality", check_quality(self.quality))
        check(
            self.audio_mode in AUDIO_MODES,
            f"audio_mode must be one of {', '.join(AUDIO_MODES)}. Received: audio_mode={self.audio_mode!r}",
        )
        check(
            isinstance(self.interpolate, int) and not isinstance(self.interpolate, bool) and self.interpolate >= 1,
            "interpolate must be a whole number >= 2 (video frames per rendered frame; 1 = none). "
            f"Received: interpolate={self.interpolate!r}",
        )
        check(self.upscale in (None, 2, 4), f"upscale must be 2 or 4. Received: upscale={self.upscale!r}")
        bpk = self.beats_per_keyframe
        check(isinstance(bpk, int) and not isinstance(bpk, bool) and bpk >= 1,
              f"beats_per_keyframe must be a whole number >= 1. Received: beats_per_keyframe={bpk!r}")
        check(not (self.double and self.interpolate > 1),
              "double blends neighbours, interpolate computes in-betweens: choose one. Received: double=True, "
              f"interpolate={self.interpolate}")
