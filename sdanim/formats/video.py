"""Video in: the frames of any file ffmpeg reads (imageio's ffmpeg reader; the binary
imageio-ffmpeg ships), as (H, W, 3) uint8 arrays. Nothing in the file is executed."""

from __future__ import annotations

import numpy as np

from sdanim.config.errors import SdanimError


def read_video_frames(path: str, name: str = "source", fit=None, first: bool = False) -> list:
    """Every frame of a video file (or only the first), in order, each passed through
    `fit` (frame -> frame) as it is read; one line (naming `name`) for a file ffmpeg
    cannot read."""
    import imageio.v2 as imageio

    try:
        reader = imageio.get_reader(path, format="FFMPEG")
        try:
            frames = []
            for frame in reader:
                frames.append((fit or np.asarray)(np.asarray(frame)[..., :3]))
                if first:
                    break
        finally:
            reader.close()
    except Exception as error:  # imageio-ffmpeg raises OSError/RuntimeError for what ffmpeg cannot read
        reason = " ".join(str(error).split())[:160] or type(error).__name__
        raise SdanimError(f"cannot read the video ({reason}). Received: {name}={path!r}") from None
    return frames


__all__ = ["read_video_frames"]
