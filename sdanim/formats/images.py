"""Images and masks in: files (anything Pillow reads), PIL images and arrays -> the
(H, W, 3) uint8 picture an image viewer shows, or an (H, W) bool mask.

Pillow only decodes pixels (no code runs from an image file); its decompression-bomb
guard stays on. Levels follow a stated rule per kind, decided by the data type and the
bit depth the file declares, never by the picture's own values:

    8-bit files, uint8 arrays         as they are
    16-bit files (PNG, TIFF, PGM),    value / 65535 x 255
      uint16 arrays
    bool arrays                       False = 0, True = 255
    float files (TIFF "F"), float     [0, 1] x 255; values outside [0, 1] (a float image
      arrays                          holding 0..255, say) are refused with one line
    32-bit integer files, anything    refused with one line (no standard white level)
      whose depth is not declared

Anything unreadable is one line naming the parameter.
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence

import numpy as np

from sdanim.config.errors import SdanimError, check
from sdanim.formats.video import read_video_frames

WHITE, BLACK = 255, 0
_FLOAT_SLACK = 1e-6  # float rounding around [0, 1] that still counts as inside


def load_image(source, name: str = "image", background: int = WHITE) -> np.ndarray:
    """A path (PNG, JPEG, WebP, TIFF, GIF, BMP ... anything Pillow reads), a PIL image or
    an array -> (H, W, 3) uint8, the picture as an image viewer shows it:

    - orientation metadata (EXIF, as phones write it) applied: the upright picture;
    - levels by the module's rule (16-bit scans scaled to 8 bits, floats from [0, 1]);
    - every colour mode converted to RGB (greyscale, palette, CMYK, YCbCr, bilevel);
    - transparency (alpha channels, palette or single-colour transparency) composited
      over `background`: white (255) for pictures, as most viewers show them on a page;
      black (0) for masks (`load_mask`), so transparent means "keep";
    - a multi-frame file (GIF, APNG, multi-page TIFF): its first frame.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, np.ndarray):
        return _from_array(source, name, background)
    if isinstance(source, Image.Image):
        return _from_pil(source, name, background)
    check(
        isinstance(source, (str, os.PathLike)),
        f"{name} must be an image path or an array. Received: {name}={source!r}",
    )
    path = os.fspath(source)
    check(os.path.isfile(path), f"{name} is not a file. Received: {name}={path!r}")
    try:
        with Image.open(path) as im:
            return _from_pil(im, name, background, path)
    except SdanimError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        reason = str(error).split("\n")[0] or type(error).__name__
        raise SdanimError(f"{name} is not a readable image ({reason}). Received: {name}={path!r}") from None


def _received(name: str, path) -> str:
    return f"{name}={path!r}" if path is not None else f"{name} (an image object)"


def _declared_bits(im) -> int:
    """The bits per sample a 32-bit-integer-mode ("I") image's file declares: TIFF's
    BitsPerSample, or the raw mode Pillow decoded it with (16-bit PGM/PNG); 0 if unknown."""
    tags = getattr(im, "tag_v2", None)
    if tags is not None and 258 in tags:
        bits = tags[258]
        return int(bits[0] if isinstance(bits, tuple) else bits)
    for tile in getattr(im, "tile", None) or ():
        raw = tile.args[0] if isinstance(tile.args, tuple) and tile.args else tile.args
        if isinstance(raw, str) and raw.startswith("I;16"):
            return 16
    return 0


def _from_pil(im, name: str, background: int, path=None) -> np.ndarray:
    from PIL import ImageOps

    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)  # the first frame (GIF, APNG, multi-page TIFF)
    bits = _declared_bits(im) if im.mode == "I" else 0  # read before load() drops the tile list
    im.load()
    im = ImageOps.exif_transpose(im)  # the upright picture; a no-op without orientation metadata
    if im.mode.startswith("I;16"):
        return _grey_to_rgb(_levels(np.asarray(im, np.float64), 65535.0))
    if im.mode == "I":
        check(bits in (8, 16), f"{name} is a {bits or 'unknown'}-bit integer image, which has no standard white "
                               f"level; save it with 8 or 16 bits per sample. Received: {_received(name, path)}")
        return _grey_to_rgb(_levels(np.asarray(im, np.float64), 255.0 if bits == 8 else 65535.0))
    if im.mode == "F":
        return _grey_to_rgb(_unit_levels(np.asarray(im, np.float64), name, _received(name, path)))
    transparent = (im.mode in ("RGBA", "LA", "PA", "RGBa", "La")
                   or (im.mode in ("P", "L", "RGB", "1") and "transparency" in im.info))
    if not transparent:
        return np.ascontiguousarray(np.asarray(im.convert("RGB")))
    rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
    alpha = rgba[..., 3:] / 255.0
    out = rgba[..., :3] * alpha + float(background) * (1.0 - alpha)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _levels(values: np.ndarray, white: float) -> np.ndarray:
    """Integer levels with `white` as full scale -> uint8 levels (float64 (...) kept as is)."""
    return np.rint(np.clip(values, 0.0, white) / white * 255.0)


def _unit_levels(values: np.ndarray, name: str, received: str) -> np.ndarray:
    """Float levels in [0, 1] -> uint8 levels; anything else is one line."""
    finite = np.isfinite(values)
    check(finite.all(), f"{name} holds NaN or infinite values. Received: {received}")
    low, high = float(values.min()), float(values.max())
    check(low >= -_FLOAT_SLACK and high <= 1.0 + _FLOAT_SLACK,
          f"{name} is a float image with values from {low:g} to {high:g}; float images must hold values in "
          f"[0, 1] (divide by 255 for 0..255, or pass uint8). Received: {received}")
    return np.rint(np.clip(values, 0.0, 1.0) * 255.0)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1))


def _from_array(array: np.ndarray, name: str, background: int) -> np.ndarray:
    """uint8, uint16, bool or float ([0, 1]) arrays of shape (H, W), (H, W, 1), (H, W, 3)
    or (H, W, 4) (alpha composited over `background`)."""
    check(
        array.ndim in (2, 3) and (array.ndim == 2 or array.shape[-1] in (1, 3, 4))
        and (array.dtype in (np.uint8, np.uint16, np.bool_) or np.issubdtype(array.dtype, np.floating)),
        f"{name} must be an (H, W, 3) uint8 array (or (H, W), RGBA, uint16, bool, float in [0, 1]). Received: {name} "
        f"of shape {array.shape} and dtype {array.dtype}",
    )
    received = f"{name} of shape {array.shape} and dtype {array.dtype}"
    if array.dtype == np.uint16:
        array = _levels(array.astype(np.float64), 65535.0)
    elif array.dtype == np.bool_:
        array = array.astype(np.float64) * 255.0
    elif np.issubdtype(array.dtype, np.floating):
        array = _unit_levels(array.astype(np.float64), name, received)
    array = np.asarray(array, np.float64)
    if array.ndim == 2 or array.shape[-1] == 1:
        array = np.repeat(array.reshape(array.shape[0], array.shape[1], 1), 3, axis=-1)
    if array.shape[-1] == 4:
        alpha = array[..., 3:] / 255.0
        array = array[..., :3] * alpha + float(background) * (1.0 - alpha)
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def load_mask(source, image_shape: Sequence[int], name: str = "mask") -> np.ndarray:
    """A mask file or array -> (H, W) bool, True (white) where the model paints.

    Levels as `load_image` reads them (a bool or a float {0, 1} array is black and
    white; uint8 is 0..255), transparency over black; levels of 128 and up count as
    white. The mask must have the image's size (before any fitting), and must not be
    all black (nothing to paint); an all-white mask repaints everything (a warning says so).
    """
    grey = load_image(source, name, background=BLACK).astype(np.float32).mean(axis=-1)  # (H, W)
    h, w = image_shape[:2]
    check(
        grey.shape == (h, w),
        f"{name} must have the image's size {w}x{h}. Received: {name} of size {grey.shape[1]}x{grey.shape[0]}",
    )
    mask = grey >= 128
    check(mask.any(), f"{name} is all black: nothing to repaint (white = repaint). Received: {name}={_describe(source)}")
    if mask.all():
        warnings.warn(f"{name} is all white: the whole image is repainted (as image-to-image at this strength)", stacklevel=2)
    return mask


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def load_pictures(source, name: str = "image", fit=None, first: bool = False) -> list:
    """The pictures of an image file, a folder of images (sorted by name) or a video, each
    as `load_image` reads it, and passed through `fit` (picture -> picture) as it is read
    (a long video is not held at its own size); only the first with first=True. One line
    for a source that does not exist, an unreadable file, or a folder without images."""
    fit = fit or (lambda picture: picture)
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        names = sorted(n for n in os.listdir(source) if n.lower().endswith(IMAGE_SUFFIXES))
        check(names, f"{name} is a folder without images. Received: {name}={os.fspath(source)!r}")
        return [fit(load_image(os.path.join(source, n), name)) for n in names[:1 if first else None]]
    if isinstance(source, (str, os.PathLike)) and os.path.isfile(source) and _is_video(os.fspath(source)):
        return read_video_frames(os.fspath(source), name, fit, first)
    return [fit(load_image(source, name))]


def _is_video(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")


def _describe(source) -> str:
    return repr(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else f"array {getattr(source, 'shape', '?')}"


__all__ = ["load_image", "load_mask", "load_pictures", "IMAGE_SUFFIXES", "WHITE", "BLACK"]
