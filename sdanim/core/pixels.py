"""Pixels: what the editing tools do to images: fitting, latent masks, feathering,
compositing, outpainting canvases, labelled grids.

Pure functions of arrays (NumPy; Pillow's resampling and drawing): no files, no model.
Images are (H, W, 3) uint8, masks (H, W) bool with True where the model paints. Reading
images and masks from files is `sdanim.formats.images`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from sdanim.config.choices import FITS
from sdanim.config.errors import check


def auto_size(image: np.ndarray) -> tuple[int, int]:
    """The model size for an image: each side rounded down to a multiple of 64 (at
    least 64). Returns (height, width)."""
    h, w = image.shape[:2]
    return max(64, h // 64 * 64), max(64, w // 64 * 64)


def _resample(image: np.ndarray, width: int, height: int, resample) -> np.ndarray:
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image
    mode = "L" if image.ndim == 2 else "RGB"
    return np.asarray(Image.fromarray(image, mode).resize((width, height), resample))


def _crop_box(h: int, w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The centred box of (h, w) with the aspect ratio of (height, width)."""
    if w * height > h * width:  # too wide
        cw = max(1, round(h * width / height))
        x0 = (w - cw) // 2
        return 0, x0, h, x0 + cw
    ch = max(1, round(w * height / width))
    y0 = (h - ch) // 2
    return y0, 0, y0 + ch, w


def fit_image(image: np.ndarray, height: int, width: int, fit: str = "crop", nearest: bool = False) -> np.ndarray:
    """Fits an image (or a mask, 2-D) to (height, width).

    fit="crop": centre-crop to the target's aspect ratio, then resize (nothing is
    distorted; edges may be cut). fit="resize": stretch to the target size.
    Lanczos for images, nearest for masks (`nearest=True`).
    """
    from PIL import Image

    check(fit in FITS, f"fit must be one of {', '.join(FITS)}. Received: fit={fit!r}")
    if fit == "crop":
        y0, x0, y1, x1 = _crop_box(image.shape[0], image.shape[1], height, width)
        image = image[y0:y1, x0:x1]
    return _resample(np.ascontiguousarray(image), width, height, Image.NEAREST if nearest else Image.LANCZOS)


def latent_mask(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H/8, W/8, 1) float32: a latent cell is painted if any of its
    8x8 pixels is (so the painted region covers the whole mask)."""
    h, w = mask.shape
    check(h % 8 == 0 and w % 8 == 0, f"mask sides must be multiples of 8. Received: {w}x{h}")
    blocks = mask.reshape(h // 8, 8, w // 8, 8)  # (h, 8, w, 8)
    return blocks.any(axis=(1, 3)).astype(np.float32)[..., None]


def soft_mask(mask: np.ndarray, feather: float = 0.0) -> np.ndarray:
    """(H, W) bool -> (H, W) float32 in [0, 1]: the mask, its inner edge blurred over
    `feather` pixels. It is 0 everywhere outside the mask, so compositing with it keeps
    every unmasked pixel of the input exactly."""
    from PIL import Image, ImageFilter

    check(feather >= 0, f"feather must be >= 0 pixels. Received: feather={feather}")
    hard = mask.astype(np.float32)
    if feather == 0:
        return hard
    blurred = Image.fromarray((hard * 255).astype(np.uint8), "L").filter(ImageFilter.GaussianBlur(feather / 2.0))
    return hard * (np.asarray(blurred, np.float32) / 255.0)


def composite(generated: np.ndarray, original: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """weight * generated + (1 - weight) * original, per pixel; (H, W, 3) uint8."""
    w = weight[..., None].astype(np.float32)
    out = w * generated.astype(np.float32) + (1.0 - w) * original.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def extend_canvas(image: np.ndarray, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0):
    """Outpainting's canvas: the image with borders added (edge pixels repeated, a
    neutral start for the encoder) and the mask of the new borders. The result must
    be multiples of 64 pixels a side. Returns (canvas (H', W', 3), mask (H', W'))."""
    for name, value in (("left", left), ("right", right), ("top", top), ("bottom", bottom)):
        check(
            isinstance(value, int) and not isinstance(value, bool) and value >= 0,
            f"{name} must be a whole number of pixels >= 0. Received: {name}={value!r}",
        )
    check(left + right + top + bottom > 0, "outpaint needs at least one of left, right, top, bottom > 0. Received: all 0")
    h, w = image.shape[:2]
    new_h, new_w = h + top + bottom, w + left + right
    check(
        new_h % 64 == 0 and new_w % 64 == 0,
        f"the extended image must be multiples of 64 pixels a side; the image is {w}x{h}, so "
        f"left + right must make {w} a multiple of 64 (e.g. {(-w) % 64 or 64}) and top + bottom "
        f"{h} (e.g. {(-h) % 64 or 64}). Received: {new_w}x{new_h} (left={left}, right={right}, top={top}, bottom={bottom})",
    )
    canvas = np.pad(image, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.ones((new_h, new_w), bool)
    mask[top : top + h, left : left + w] = False
    return canvas, mask


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int, max_lines: int = 3) -> list:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(1, len(lines[-1]) - 1)] + "…"
    return lines


def labelled_grid(
    cells: Sequence[Sequence[np.ndarray]],
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    gap: int = 4,
    font_size: Optional[int] = None,
) -> np.ndarray:
    """rows x columns of equal-size images with the row labels on the left and the
    column labels on top, on white: (H', W', 3) uint8."""
    from PIL import Image, ImageDraw

    rows, cols = len(cells), len(cells[0])
    check(len(row_labels) == rows and len(column_labels) == cols, "one label per row and per column")
    h, w = cells[0][0].shape[:2]
    size = font_size or max(10, min(h, w) // 12)
    font = _font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = min(max(w, 160), 2 * w) if any(row_labels) else 0
    line_h = int(size * 1.25)
    top_lines = max(len(_wrap(probe, t, font, w - 4)) for t in column_labels) if any(column_labels) else 0
    label_h = top_lines * line_h + (gap if top_lines else 0)
    sheet = Image.new("RGB", (label_w + cols * (w + gap), label_h + rows * (h + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, text in enumerate(column_labels):
        for k, line in enumerate(_wrap(draw, text, font, w - 4)):
            draw.text((label_w + c * (w + gap) + 2, k * line_h), line, fill="black", font=font)
    for r, text in enumerate(row_labels):
        y = label_h + r * (h + gap)
        for k, line in enumerate(_wrap(draw, text, font, label_w - 8, max_lines=max(1, h // line_h))):
            draw.text((4, y + 2 + k * line_h), line, fill="black", font=font)
        for c in range(cols):
            image = np.asarray(cells[r][c])
            check(image.shape[:2] == (h, w), "grid cells must all have the same size")
            sheet.paste(Image.fromarray(image), (label_w + c * (w + gap), y))
    return np.asarray(sheet)
