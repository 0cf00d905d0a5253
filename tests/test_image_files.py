"""Images as a viewer shows them: a battery of files as phones, scanners and editors
write them (made here with Pillow), through sdanim's loader and its entry points."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdanim.config.errors import SdanimError
from sdanim.formats.images import load_image, load_mask
from sdanim.frontends.cli import main


def _picture(height: int = 48, width: int = 80) -> np.ndarray:
    """A landscape picture whose top-left corner is red and the rest a smooth gradient:
    any rotation or flip shows."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), np.full_like(x, 90)], axis=-1).astype(np.uint8)
    image[:12, :12] = (255, 0, 0)
    return image


def _exif(orientation: int):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


# What a camera stores for a picture taken with the phone rotated, and what a viewer shows.
ORIENTATIONS = {
    3: lambda a: np.rot90(a, 2),        # upside down
    6: lambda a: np.rot90(a, -1),       # stored rotated: shown turned 90 degrees clockwise
    8: lambda a: np.rot90(a, 1),        # shown turned 90 degrees anticlockwise
    2: lambda a: a[:, ::-1],            # mirrored
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_orientation_metadata_gives_the_upright_picture(tmp_path, orientation, fmt):
    stored = _picture()
    path = str(tmp_path / f"photo.{fmt.lower()}")
    Image.fromarray(stored).save(path, fmt, exif=_exif(orientation), **({"quality": 95} if fmt == "JPEG" else {}))
    shown = ORIENTATIONS[orientation](stored)
    loaded = load_image(path)
    assert loaded.shape == shown.shape
    gap = np.abs(loaded.astype(int) - shown.astype(int))
    assert (gap.max() == 0) if fmt == "PNG" else (gap.mean() < 3), gap.max()


def test_sixteen_bit_scan_has_the_eight_bit_pictures_levels(tmp_path):
    levels = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))  # a grey ramp, black to white
    Image.fromarray(levels).save(tmp_path / "scan.png")  # 16-bit greyscale PNG
    Image.fromarray(levels).save(tmp_path / "scan.tif")  # and TIFF
    expected = np.rint(levels / 257.0).astype(np.uint8)
    for name in ("scan.png", "scan.tif"):
        loaded = load_image(str(tmp_path / name))
        assert loaded.shape == (16, 64, 3)
        assert np.abs(loaded[..., 0].astype(int) - expected).max() <= 1, name  # not clipped to white
    assert load_image(levels)[0, 32, 0] == expected[0, 32]  # a uint16 array too
    floats = levels.astype(np.float32) / 65535.0
    Image.fromarray(floats, mode="F").save(tmp_path / "scan_f.tif")  # 32-bit float TIFF in [0, 1]
    assert np.abs(load_image(str(tmp_path / "scan_f.tif"))[..., 0].astype(int) - expected).max() <= 1


def test_transparency_becomes_white_and_masks_keep_it_black(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = (0, 0, 255)
    rgba[:, :16, 3] = 255  # left half opaque blue, right half fully transparent (stored black-ish)
    rgba[:16, 16:, 3] = 128  # top right half-transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "sticker.png")
    loaded = load_image(str(tmp_path / "sticker.png"))
    assert tuple(loaded[0, 0]) == (0, 0, 255)
    assert tuple(loaded[31, 31]) == (255, 255, 255)  # transparent: white, as viewers show it on a page
    assert tuple(loaded[0, 31]) == (127, 127, 255)  # half: blended
    Image.fromarray(rgba[..., 3], "L").convert("LA").save(tmp_path / "la.png")
    assert load_image(str(tmp_path / "la.png")).shape == (32, 32, 3)
    # A mask painted on a transparent layer: transparent means keep (black), paint means repaint.
    stroke = np.zeros((32, 32, 4), np.uint8)
    stroke[8:24, 8:24] = 255
    Image.fromarray(stroke, "RGBA").save(tmp_path / "mask.png")
    mask = load_mask(str(tmp_path / "mask.png"), (32, 32))
    assert mask[16, 16] and not mask[0, 0] and mask.sum() == 16 * 16


def test_palette_greyscale_cmyk_bilevel_and_animations(tmp_path):
    picture = _picture()
    Image.fromarray(picture).convert("CMYK").save(tmp_path / "print.jpg", quality=95)
    assert np.abs(load_image(str(tmp_path / "print.jpg")).astype(int) - picture).mean() < 4
    Image.fromarray(picture).convert("L").save(tmp_path / "grey.png")
    grey = load_image(str(tmp_path / "grey.png"))
    assert grey.shape == (48, 80, 3) and (grey[..., 0] == grey[..., 2]).all()
    Image.fromarray(picture).convert("1").save(tmp_path / "fax.png")
    assert set(np.unique(load_image(str(tmp_path / "fax.png")))) <= {0, 255}
    # An animated GIF with transparency: the first frame, transparent pixels white.
    first = Image.fromarray(picture).convert("P", palette=Image.ADAPTIVE, colors=32)
    first.info["transparency"] = int(np.asarray(first)[0, 0])  # the red corner's palette entry
    second = Image.fromarray(np.zeros_like(picture)).convert("P")
    first.save(tmp_path / "anim.gif", save_all=True, append_images=[second], transparency=first.info["transparency"])
    loaded = load_image(str(tmp_path / "anim.gif"))
    assert tuple(loaded[0, 0]) == (255, 255, 255) and loaded[40, 70].sum() > 200  # not the black second frame
    Image.fromarray(picture).save(tmp_path / "photo.webp", lossless=True)
    assert np.array_equal(load_image(str(tmp_path / "photo.webp")), picture)


@pytest.mark.parametrize("content, match", [
    (b"just some text, named like a picture", "is not a readable image"),
    ("truncated", "is not a readable image"),
    (b"", "is not a readable image"),
])
def test_what_cannot_be_read_is_one_line(tmp_path, content, match):
    path = tmp_path / "photo.png"
    if content == "truncated":
        noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).save(path)
        path.write_bytes(path.read_bytes()[:4000])  # of about 12 kB: the download broke off
    else:
        path.write_bytes(content)
    with pytest.raises(SdanimError, match=match) as error:
        load_image(str(path))
    assert "\n" not in str(error.value) and "Received: image=" in str(error.value)


def test_cli_image_tools_read_files_as_viewers_show_them(tmp_path, monkeypatch, capsys):
    from sdanim.frontends.cli import options
    from sdanim.model import loading
    from tiny import make_tiny_model

    portrait = make_tiny_model(height=128, width=64)  # the size of the upright picture only
    monkeypatch.setattr(options, "model_for", lambda args, settings: portrait)
    Image.fromarray(_picture(64, 128)).save(tmp_path / "phone.jpg", exif=_exif(6))  # stored 128 wide, shown 64 wide
    assert main(["img2img", str(tmp_path / "phone.jpg"), "a carving", "--steps", "2", "--seed", "1",
                 "--out", str(tmp_path / "out"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    written = printed.split(": ")[-1].strip()
    with Image.open(written) as im:
        assert im.size == (64, 128)  # the upright picture's size (W x H)
    (tmp_path / "broken.png").write_text("not an image")
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model was built"))
    assert main(["img2img", str(tmp_path / "broken.png"), "x", "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdanim: error: image is not a readable image") and err.count("\n") == 1


def test_levels_follow_the_stated_rule_never_the_pictures_own_values(tmp_path):
    """Item 3 of issue 33: a float picture holding 0..255 is refused (not clipped to 98%
    white); a 2-D float or bool {0, 1} mask is black and white (not refused as black); a
    float TIFF above 1 is refused; a 32-bit integer TIFF has no white level (refused);
    16-bit files scale by their declared depth, whatever their brightest pixel."""
    ramp = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (8, 1))  # (8, 64) in [0, 1]
    assert np.array_equal(load_image(ramp)[..., 0], np.rint(ramp * 255).astype(np.uint8))
    with pytest.raises(SdanimError, match=r"image is a float image with values from 0 to 255; float images must hold "
                                          r"values in \[0, 1\] .*Received: image of shape \(8, 64\)"):
        load_image(ramp * 255.0)
    half = np.zeros((16, 16), np.float32)
    half[:, 8:] = 1.0
    for mask in (half, half.astype(bool)):
        loaded = load_mask(mask, (16, 16))
        assert loaded[:, 8:].all() and not loaded[:, :8].any()
    Image.fromarray(ramp * 255.0, mode="F").save(tmp_path / "bright.tif")
    with pytest.raises(SdanimError, match=r"float image with values from 0 to 255.*Received: image='.*bright\.tif'"):
        load_image(str(tmp_path / "bright.tif"))
    Image.fromarray((ramp * 1e6).astype(np.int32), mode="I").save(tmp_path / "deep.tif")
    with pytest.raises(SdanimError, match=r"a 32-bit integer image, which has no standard white level"):
        load_image(str(tmp_path / "deep.tif"))
    dim = (ramp * 4096).astype(np.uint16)  # a dark 16-bit scan: its brightest pixel is 4096 of 65535
    Image.fromarray(dim).save(tmp_path / "dim.png")
    expected = np.rint(dim / 65535.0 * 255.0).astype(np.uint8)
    assert np.array_equal(load_image(str(tmp_path / "dim.png"))[..., 0], expected)  # dark stays dark
    Image.fromarray(dim).save(tmp_path / "dim.pgm")  # Pillow reads a 16-bit PGM as 32-bit "I" mode
    assert np.array_equal(load_image(str(tmp_path / "dim.pgm"))[..., 0], expected)
