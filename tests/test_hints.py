"""ControlNet hints made without weights (sdanim.core.hints), how frames take them, and
`python -m sdanim control`. No model here."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from sdanim.config.errors import SdanimError
from sdanim.core.hints import NetHints, canny, lineart_standard, make_hint, resample, shuffle
from sdanim.frontends.cli import main


def _photo(seed: int = 0, size: int = 96) -> np.ndarray:
    """Shapes over a gradient, with grain: edges and lines for the detectors."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    picture = np.stack([x * 255 / size, y * 255 / size, np.full_like(x, 128.0)], axis=-1)
    for _ in range(5):
        cy, cx, r = rng.integers(10, size - 10, 2).tolist() + [int(rng.integers(5, 20))]
        picture[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.integers(0, 255, 3)
    return np.clip(picture + rng.normal(0, 3, picture.shape), 0, 255).astype(np.uint8)


def test_canny_is_opencvs_on_the_rgb_picture():
    """What ControlNet's canny preprocessor runs (controlnet-aux's CannyDetector: OpenCV's
    Canny at 100 / 200 on the RGB picture, one channel made three)."""
    import cv2

    picture = _photo()
    edges = canny(picture)
    expected = cv2.Canny(picture, 100, 200)
    assert edges.dtype == np.uint8 and edges.shape == picture.shape
    assert np.array_equal(edges[..., 0], expected) and np.array_equal(edges[..., 2], expected)
    assert 0.01 < (expected > 0).mean() < 0.5  # it found edges, not everything


def test_lineart_standard_is_controlnet_aux_formula():
    """controlnet-aux's LineartStandardDetector (its defaults: sigma 6, threshold 8), written
    out here from its description: the darkest channel's drop below a Gaussian blur,
    divided by max(16, the median of the values above 8), times 127."""
    import cv2

    picture = _photo(1)
    x = picture.astype(np.float32)
    drop = np.min(cv2.GaussianBlur(x, (0, 0), 6.0) - x, axis=2).clip(0, 255)
    drop = drop / max(16.0, float(np.median(drop[drop > 8])))
    expected = (drop * 127).clip(0, 255).astype(np.uint8)
    lines = lineart_standard(picture)
    assert np.array_equal(lines[..., 1], expected)
    assert lines.max() > 60 and (lines[..., 0] > 20).mean() < 0.5  # lines, not a blank page


def test_shuffle_is_deterministic_under_its_seed_and_moves_content():
    picture = _photo(2)
    a, b, c = shuffle(picture, seed=4), shuffle(picture, seed=4), shuffle(picture, seed=5)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.abs(a.astype(int) - picture.astype(int)).mean() > 10  # content moved
    # Every pixel is fetched from the picture (bilinear between neighbours): nothing new.
    assert a.min() >= picture.min() and a.max() <= picture.max()


def test_inpaint_hint_needs_a_mask_and_frames_take_their_hint():
    picture = _photo(3, 64)
    mask = np.zeros((64, 64), bool)
    mask[:, 32:] = True
    hint = make_hint(picture, "inpaint", mask=mask)
    assert (hint[:, 32:] == -1).all() and np.allclose(hint[:, :32], picture[:, :32] / 255.0)
    with pytest.raises(SdanimError, match=r"the inpaint preprocessor .* needs the inpaint or outpaint command's mask"):
        make_hint(picture, "inpaint")
    assert resample(2, 4) == [0, 0, 1, 1] and resample(5, 3) == [0, 2, 4] and resample(1, 3) == [0, 0, 0]
    hints = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (0, 100, 255)])
    by_frame = NetHints(hints, "frames", order=(2, 0, 1))
    assert by_frame.frame(0, 0.0)[0][0, 0, 0] == 1.0 and by_frame.frame(2, 0.0)[0][0, 0, 0] == pytest.approx(100 / 255)
    by_keyframe = NetHints(hints[:2], "keyframes", np.array([1.0, 0.0], np.float32), scale=0.5)
    hint, scale = by_keyframe.frame(7, 0.25)  # a quarter of the way from keyframe 0 to 1
    assert hint[0, 0, 0] == pytest.approx(0.25 * 100 / 255) and scale == pytest.approx(0.5 * 0.75)


def test_control_command_writes_a_hint_per_picture(tmp_path, capsys):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(_photo(i, 80)).save(folder / f"f{i}.png")
    assert main(["control", str(folder), "--preprocess", "lineart", "--size", "64x64",
                 "--out", str(tmp_path / "hints")]) == 0
    assert "wrote 3 lineart hint(s)" in capsys.readouterr().out
    written = sorted(os.listdir(tmp_path / "hints"))
    assert written == ["hint_00000.png", "hint_00001.png", "hint_00002.png"]
    with Image.open(tmp_path / "hints" / written[0]) as im:
        assert im.size == (64, 64)
    assert main(["control", str(folder), "--preprocess", "inpaint"]) == 2
    assert "invalid choice: 'inpaint'" in capsys.readouterr().err
    assert main(["control", str(tmp_path / "none.png")]) == 2
    assert "source is not a file" in capsys.readouterr().err
