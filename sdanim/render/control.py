"""ControlNets of a job, made ready before any model is built: each net's file checked
(recognised and hashed), its pictures read and fitted to the frames' size, turned into
hints (`sdanim.core.hints`) and laid over the frames.

    ControlNetSpec(file, image, preprocess, scale, start, end, guess_mode)
        -> ControlInput(spec, hints over the frames, the net's SHA-256, the hints' SHA-256)

Where each frame's hint comes from:

    one image                   every frame
    a folder or a video         one image per frame, spread over the frames (frame i of F
                                takes image round(i (M - 1) / (F - 1)): the first and
                                last of each, evenly between)
    a walk's keyframes          `control_image` on each keyframe, blended linearly between
                                keyframes like everything else; `control_scale` per
                                keyframe likewise (a weight schedule is a walk)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Optional, Sequence

import numpy as np

from sdanim.config.control import ControlNetSpec
from sdanim.config.errors import check
from sdanim.core.hints import NetHints, make_hint, resample
from sdanim.core.pixels import fit_image
from sdanim.formats.images import load_pictures
from sdanim.model.controlnet import checked_controlnet
from sdanim.model.sd3 import is_sd3


@dataclasses.dataclass(frozen=True, eq=False)
class ControlInput:
    """One ControlNet of a job: the spec, its hints over the job's frames, the net file's
    SHA-256 and the SHA-256 of the hints (what a manifest and a resume compare)."""

    spec: ControlNetSpec
    hints: NetHints
    sha256: str
    hints_sha256: str
    version: str

    def record(self) -> dict:
        spec = self.spec
        record = {"file": os.path.basename(spec.file.rstrip("/")), "sha256": self.sha256, "scale": spec.scale,
                  "start": spec.start, "end": spec.end, "guess_mode": spec.guess_mode, "preprocess": spec.preprocess,
                  "hints": {"sha256": self.hints_sha256, "count": int(len(self.hints.hints)), "at": self.hints.at}}
        if spec.preprocess == "shuffle":
            record["shuffle_seed"] = spec.shuffle_seed
        return record


def _digest(hints: NetHints) -> str:
    digest = hashlib.sha256()
    for array in (hints.hints, np.asarray(hints.scales, np.float32), np.asarray(hints.order, np.int64)):
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(hints.at.encode())  # the net's own scale is recorded beside it
    return digest.hexdigest()


def _hints(pictures: list, spec: ControlNetSpec, mask: Optional[np.ndarray]) -> np.ndarray:
    return np.stack([make_hint(p, spec.preprocess, spec.shuffle_seed, mask) for p in pictures])


def prepare_controls(specs: Sequence[ControlNetSpec], frames: int, height: int, width: int, fit: str = "crop",
                     keyframe_images: Optional[Sequence] = None, keyframe_scales: Optional[Sequence] = None,
                     mask: Optional[np.ndarray] = None, version: Optional[str] = None) -> tuple:
    """`ControlInput`s for a job of `frames` frames at (height, width).

    keyframe_images, keyframe_scales: per net, the walk's per-stop images (None where a
    stop gives none) and scales (`Walk.control_stops`). mask: (H, W) bool, the inpaint
    preprocessor's. version: the model's SD version, where known before it is built (a
    ControlNet for the other one is refused now)."""
    check(not (specs and is_sd3(version)),
          f"ControlNets are for Stable Diffusion 1.x/2.x here; SD3's ControlNets (a transformer of their own) are not "
          f"built yet. Received: model={version!r} with {len(specs)} --controlnet")
    out = []
    for k, spec in enumerate(specs):
        file, sha256 = checked_controlnet(spec.file)
        if version is not None and file is not None:
            check(file.version == version,
                  f"this ControlNet is for Stable Diffusion {file.version[0]}.x and the model is {version[0]}.x; use "
                  f"a ControlNet made for it. Received: controlnet={spec.file!r}")
        stops = keyframe_images[k] if keyframe_images is not None and k < len(keyframe_images) else None
        scales = keyframe_scales[k] if keyframe_scales is not None and k < len(keyframe_scales) else None
        name = f"control_image[{k}]" if len(specs) > 1 else "control_image"

        def fitted(picture, name=name):
            return fit_image(picture, height, width, fit)

        if spec.image is not None:
            pictures = load_pictures(spec.image, name, fitted)
            hints = _hints(pictures, spec, mask)
            at, order = ("all", ()) if len(hints) == 1 else ("frames", tuple(resample(len(hints), frames)))
        else:
            check(stops is not None and all(s is not None for s in stops),
                  f"ControlNet {k + 1} has no image: give --control-image (one per --controlnet) or a control_image on "
                  f"every keyframe of the walk. Received: controlnet={spec.file!r}")
            hints = _hints([fitted(load_pictures(s, name)[0]) for s in stops], spec, mask)
            at, order = "keyframes", ()
        scale_table = np.asarray(scales if scales is not None else [1.0], np.float32)
        net = NetHints(hints, at, scale_table, float(spec.scale), order)
        out.append(ControlInput(spec, net, sha256, _digest(net), None if file is None else file.version))
    return tuple(out)


def control_record(controls: Sequence[ControlInput]) -> dict:
    """{"controlnets": [...]} for a manifest or PNG metadata, or {} without any."""
    return {"controlnets": [c.record() for c in controls]} if controls else {}


__all__ = ["ControlInput", "prepare_controls", "control_record"]
