"""After the frames: in-betweens (RIFE) and upscaling (Real-ESRGAN), on frames on disk.

    rendered frames (frame_00000.png ...) -> in-betweens: N - 1 per pair of neighbours
    (and last -> first for a loop), each a pure function of its two frames and t
    -> upscaled copies of every video frame -> the video

Everything is written as it is made, each file beside its final name and renamed in,
into folders named by what decides their content (the rendered frames' bytes, the
weights' SHA-256, N), so a killed run resumes without recomputing a finished file, and
other frames, weights or N never mix old files in. The run's manifest records what
made them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from sdanim.config.export import ExportSettings
from sdanim.formats.digest import data_key, files_sha256
from sdanim.model.esrgan import Upscaler, UpscalerFile, check_upscaler
from sdanim.model.rife import Interpolator, RifeFile, check_rife
from sdanim.render.store import FrameStore, ensure_folder, read_png, write_png


@dataclasses.dataclass(frozen=True)
class PostProcess:
    """What happens to rendered frames before export, with its weights checked.

    Args:
        times: int. Video frames per rendered frame: times - 1 in-betweens per pair (1: none).
        rife: `RifeFile` or None (needed when times > 1).
        upscaler: `UpscalerFile` or None: every video frame enlarged by its scale.
        batch_size: int. In-betweens (or images) per model call.
    """

    times: int = 1
    rife: Optional[RifeFile] = None
    upscaler: Optional[UpscalerFile] = None
    batch_size: int = 4

    @property
    def active(self) -> bool:
        return self.times > 1 or self.upscaler is not None

    def record(self) -> dict:
        """What the manifest records (nothing for a run without either stage)."""
        record = {}
        if self.times > 1:
            record["interpolate"] = {"times": self.times, "rife": self.rife.record()}
        if self.upscaler is not None:
            record["upscale"] = {"scale": self.upscaler.arch.scale, "model": self.upscaler.record()}
        return record


def check_post(export: ExportSettings, batch_size: int = 4) -> PostProcess:
    """Resolves and checks the in-betweening and upscaling weights an export asks for
    (reading headers; a pinned file is fetched once) before anything is rendered."""
    rife = check_rife(export.rife) if export.interpolate > 1 else None
    upscaler = check_upscaler(export.upscale_model, export.upscale) if export.upscale or export.upscale_model else None
    return PostProcess(export.interpolate, rife, upscaler, batch_size)


def sequence(count: int, times: int, loop: bool) -> list:
    """The video's frames in order: ("frame", i) for rendered frame i and
    ("between", i, k) for the k-th of the times - 1 in-betweens after it."""
    out = []
    for i in range(count):
        out.append(("frame", i))
        if times > 1 and (i + 1 < count or (loop and count > 1)):
            out += [("between", i, k) for k in range(1, times)]
    return out


class _Files:
    """A folder of post-processed frames, named after what they come from."""

    def __init__(self, folder: str):
        self.folder = ensure_folder(folder, "out")
        self.store = FrameStore(self.folder)

    def path(self, item) -> str:
        name = f"frame_{item[1]:05d}" if item[0] == "frame" else f"between_{item[1]:05d}_{item[2]:02d}"
        return os.path.join(self.folder, name + ".png")

    def has(self, item) -> bool:
        return self.store.complete(self.path(item))


def _batches(items: list, size: int) -> list:
    return [items[i:i + size] for i in range(0, len(items), size)]


def frames_digest(frames_dir: str, count: int) -> str:
    """SHA-256 of the rendered frames' files, in order: what the post-processed files
    are made from."""
    store = FrameStore(frames_dir)
    return files_sha256(store.path(i) for i in range(count))


def make_inbetweens(frames_dir: str, count: int, post: PostProcess, loop: bool, progress: bool = True,
                    source: str = "") -> str:
    """Writes the in-betweens of `count` rendered frames in `frames_dir` (missing ones
    only) into their folder; returns the folder. `source`: `frames_digest`."""
    files = _Files(os.path.join(frames_dir, f"between-{data_key(source, post.rife.sha256, post.times, loop)}"))
    rendered = FrameStore(frames_dir)
    todo = [item for item in sequence(count, post.times, loop) if item[0] == "between" and not files.has(item)]
    if not todo:
        return files.folder
    interpolator = Interpolator(post.rife)
    bar = tqdm(total=len(todo), unit="frame", desc="in-betweens", disable=not progress)
    try:
        for batch in _batches(todo, post.batch_size):
            needed = sorted({i for _, i, _ in batch} | {(i + 1) % count for _, i, _ in batch})
            frame = {i: rendered.read(i) for i in needed}  # each rendered frame read once per batch
            first = np.stack([frame[i] for _, i, _ in batch])  # (B, H, W, 3)
            second = np.stack([frame[(i + 1) % count] for _, i, _ in batch])
            images = interpolator.between(first, second, [k / post.times for _, _, k in batch])
            for item, image in zip(batch, images):
                write_png(files.path(item), image, {"sdanim": {"between": [item[1], (item[1] + 1) % count],
                                                               "t": item[2] / post.times, **post.record()}})
            bar.update(len(batch))
    finally:
        bar.close()
    return files.folder


def make_upscaled(frames_dir: str, sources: Sequence, source_path: Callable, post: PostProcess,
                  progress: bool = True, source: str = "") -> str:
    """Writes an upscaled copy of every video frame in `sources` (missing ones only);
    `source_path(item)` is where an item's frame is. Returns the folder."""
    rife = post.rife.sha256 if post.rife is not None else None
    files = _Files(os.path.join(frames_dir, f"upscaled-{data_key(source, rife, post.times, post.upscaler.sha256)}"))
    todo = [item for item in sources if not files.has(item)]
    if not todo:
        return files.folder
    upscaler = Upscaler(post.upscaler)
    bar = tqdm(total=len(todo), unit="frame", desc=f"upscaling x{upscaler.scale}", disable=not progress)
    try:
        for batch in _batches(todo, max(1, post.batch_size // 2)):
            images = upscaler.upscale(np.stack([read_png(source_path(item)) for item in batch]))
            for item, image in zip(batch, images):
                write_png(files.path(item), image, {"sdanim": post.record()})
            bar.update(len(batch))
    finally:
        bar.close()
    return files.folder


def post_process(frames_dir: str, count: int, post: PostProcess, loop: bool, progress: bool = True) -> list:
    """In-betweens and upscaling of a run's `count` rendered frames, as configured;
    returns the video's frame files in order (the rendered frames themselves when
    there is nothing to do)."""
    items = sequence(count, post.times, loop)
    rendered = FrameStore(frames_dir)
    digest = frames_digest(frames_dir, count)
    between = make_inbetweens(frames_dir, count, post, loop, progress, digest) if post.times > 1 else None

    def source(item) -> str:
        return rendered.path(item[1]) if item[0] == "frame" else _Files(between).path(item)

    if post.upscaler is None:
        return [source(item) for item in items]
    upscaled = _Files(make_upscaled(frames_dir, items, source, post, progress, digest))
    return [upscaled.path(item) for item in items]


POST_FOLDERS = ("between-*", "upscaled-*")  # what `open_run_folder(overwrite=True)` clears with the frames


__all__ = ["PostProcess", "check_post", "post_process", "sequence", "make_inbetweens", "make_upscaled", "frames_digest",
           "POST_FOLDERS"]
