"""In-betweens and upscaling in the runs (sdanim.render.post): a tiny-model walk with
--interpolate and --upscale through the CLI, resume after an interruption, loops that
close, the standalone interpolate/upscale commands and the image tools' --upscale.
Weights: small random RIFE (ccvfi's IFNet) and Real-ESRGAN compact files."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
from PIL import Image

from conftest import gif_frames, read_manifest, require

torch = require("torch")
require("ccvfi")
require("spandrel")

from sdanim.frontends.cli import main  # noqa: E402
from test_rife import _reference as _rife_net, _save as _save_rife  # noqa: E402
from test_upscale import _compact_state  # noqa: E402

COMMON = ["--size", "64x64", "--steps", "2", "--quiet", "--batch-size", "2"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    rife = _save_rife(_rife_net(False), folder / "flownet.pkl")
    upscaler = str(folder / "compact_x2.pth")
    torch.save(_compact_state(num_feat=8, num_conv=2, scale=2), upscaler)
    return {"rife": rife, "upscaler": upscaler}


@pytest.fixture
def cli_model(tiny, monkeypatch):
    from sdanim.frontends.cli import options

    monkeypatch.setattr(options, "model_for", lambda args, settings: tiny)
    return tiny


def _size(path) -> tuple:
    with Image.open(path) as im:
        return im.size


def _files(folder, pattern) -> dict:
    return {os.path.basename(p): os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(folder, pattern))}


def test_morph_with_inbetweens_and_upscaling_resumes_without_recomputing(cli_model, weights, tmp_path, monkeypatch):
    out = str(tmp_path / "m.gif")
    argv = ["morph", "a cat", "a dog", "--frames", "4", "--interpolate", "3", "--rife", weights["rife"],
            "--upscale", "2", "--upscale-model", weights["upscaler"], "--out", out, *COMMON]
    assert main(argv) == 0
    video = gif_frames(out)
    assert len(video) == (4 - 1) * 3 + 1 and video[0].shape == (128, 128, 3)  # in-betweens, then x2
    folder = str(tmp_path / "m_frames")
    post = read_manifest(folder)["post"]
    assert post["interpolate"]["times"] == 3 and len(post["interpolate"]["rife"]["sha256"]) == 64
    assert post["upscale"]["scale"] == 2 and post["upscale"]["model"]["file"] == "compact_x2.pth"
    between = glob.glob(os.path.join(folder, "between-*"))[0]
    upscaled = glob.glob(os.path.join(folder, "upscaled-*"))[0]
    assert len(_files(between, "between_*.png")) == 6 and len(_files(upscaled, "*.png")) == 10
    # The rendered frames and their in-betweens: each in-between differs from both neighbours.
    for i in range(3):
        first, second = (np.asarray(Image.open(os.path.join(folder, f"frame_{j:05d}.png")), int) for j in (i, i + 1))
        for k in (1, 2):
            middle = np.asarray(Image.open(os.path.join(between, f"between_{i:05d}_{k:02d}.png")), int)
            assert middle.shape == (64, 64, 3)
            assert np.abs(middle - first).max() > 0 and np.abs(middle - second).max() > 0, (i, k)

    # An interrupted run: two in-betweens and three upscaled frames lost, a half-written
    # temporary file left behind. The rerun renders nothing, makes only what is missing.
    for name in ("between_00001_01.png", "between_00002_02.png"):
        os.remove(os.path.join(between, name))
    for name in sorted(_files(upscaled, "*.png"))[:3]:
        os.remove(os.path.join(upscaled, name))
    with open(os.path.join(between, ".between_00001_01.x1y2.partial.png"), "wb") as f:  # as a kill leaves it
        f.write(b"\x89PNG half")
    kept_between, kept_upscaled = _files(between, "between_*.png"), _files(upscaled, "*.png")
    from sdanim.model import rife

    calls = []
    real = rife.Interpolator.between
    monkeypatch.setattr(rife.Interpolator, "between", lambda self, a, b, t: calls.append(len(t)) or real(self, a, b, t))
    assert main(argv) == 0
    assert sum(calls) == 2  # only the two missing in-betweens
    assert all(_files(between, "between_*.png")[n] == m for n, m in kept_between.items())
    assert all(_files(upscaled, "*.png")[n] == m for n, m in kept_upscaled.items())
    assert len(_files(upscaled, "*.png")) == 10
    again = gif_frames(out)
    assert len(again) == len(video) and all(np.array_equal(a, b) for a, b in zip(again, video))


def test_loop_closes_and_a_walk_keeps_its_frames_without_post(cli_model, weights, tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("loop: true\nkeyframes: [{prompt: a, seed: 1, frames: 2}, {prompt: b, seed: 2, frames: 2}]\n")
    out = str(tmp_path / "loop.gif")
    assert main(["walk", str(path), "--interpolate", "2", "--rife", weights["rife"], "--out", out, *COMMON]) == 0
    video = gif_frames(out)
    assert len(video) == 4 * 2  # 4 rendered frames, an in-between after each, the last leading back to frame 0
    between = glob.glob(str(tmp_path / "loop_frames" / "between-*"))[0]
    assert sorted(_files(between, "*.png")) == [f"between_{i:05d}_01.png" for i in range(4)]


def test_bad_post_input_is_one_line_and_renders_nothing(cli_model, weights, tmp_path, capsys):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    cases = [
        (["--upscale", "4", "--upscale-model", weights["upscaler"]], "scale"),
        (["--upscale", "2", "--upscale-model", str(empty)], "empty.pth"),
        (["--interpolate", "2", "--rife", weights["upscaler"]], "not RIFE IFNet weights"),
        (["--interpolate", "0"], "interpolate"),
    ]
    for extra, match in cases:
        out = str(tmp_path / "bad.gif")
        assert main(["morph", "a", "b", "--frames", "3", "--out", out, *COMMON, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("sdanim: error: ") and match in err and err.count("\n") == 1, err
        assert not os.path.exists(tmp_path / "bad_frames" / "frame_00000.png")


def test_standalone_interpolate_and_upscale_commands(weights, tmp_path, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(frames / f"f{i}.png")
    out = str(tmp_path / "smooth.gif")
    assert main(["interpolate", str(frames), "--times", "4", "--rife", weights["rife"], "--out", out, "--quiet"]) == 0
    assert len(gif_frames(out)) == (3 - 1) * 4 + 1 and "9 frames from 3" in capsys.readouterr().out
    big = tmp_path / "big"
    assert main(["upscale", str(frames), "--scale", "2", "--upscale-model", weights["upscaler"], "--out", str(big),
                 "--quiet"]) == 0
    assert sorted(os.listdir(big)) == ["f0.png", "f1.png", "f2.png", "manifest.json"]
    assert _size(big / "f0.png") == (112, 80)
    assert main(["upscale", str(tmp_path / "nothing.png"), "--upscale-model", weights["upscaler"], "--out", str(big),
                 "--quiet"]) == 2
    assert "the image does not exist" in capsys.readouterr().err


def test_image_tools_upscale_beside_their_images(cli_model, weights, tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(["generate", "a cat", "--num-images", "2", "--seed", "3", "--out", str(out), "--upscale", "2",
                 "--upscale-model", weights["upscaler"], *COMMON]) == 0
    printed = capsys.readouterr().out
    assert "upscaled x2: 2 image(s)" in printed
    small = sorted(n for n in os.listdir(out) if n.endswith(".png"))
    assert sorted(n for n in os.listdir(out / "x2") if n.endswith(".png")) == small
    assert _size(out / "x2" / small[0]) == (128, 128)
    # A model that cannot do the scale asked: refused before anything is generated.
    assert main(["generate", "a cat", "--out", str(tmp_path / "none"), "--upscale", "4",
                 "--upscale-model", weights["upscaler"], *COMMON]) == 2
    assert not os.path.exists(tmp_path / "none") or not os.listdir(tmp_path / "none")


def _frames_folder(path, seed: int, count: int = 3, size=(40, 56)):
    path.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path / f"f{i}.png")
    return str(path)


def test_interpolate_refuses_another_sources_frames_unless_overwrite(weights, tmp_path, capsys):
    """Item 1 of issue 33: `interpolate dirB` after `interpolate dirA` with the same --out
    wrote dirA's video again. Now the frames folder's manifest names its source."""
    a, b = _frames_folder(tmp_path / "a", 1), _frames_folder(tmp_path / "b", 2)
    out = str(tmp_path / "smooth.gif")
    common = ["--times", "2", "--rife", weights["rife"], "--out", out, "--quiet"]
    assert main(["interpolate", a, *common]) == 0
    first = gif_frames(out)
    assert main(["interpolate", a, *common]) == 0  # the same source resumes
    assert main(["interpolate", b, *common]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdanim: error: the frames folder") and "belongs to another run (source.sha256:" in err
    assert err.count("\n") == 1 and all(np.array_equal(x, y) for x, y in zip(gif_frames(out), first))  # nothing lost
    assert main(["interpolate", b, *common, "--overwrite"]) == 0
    video = gif_frames(out)
    def gap(x, folder, i):  # a GIF's palette moves colours a little: the nearest source is the one it shows
        return np.abs(x.astype(int) - np.asarray(Image.open(os.path.join(folder, f"f{i}.png")), int)).mean()

    assert len(video) == 5 and all(gap(video[2 * i], b, i) < 0.5 * gap(video[2 * i], a, i) for i in range(3))


def test_upscale_resumes_refuses_what_others_made_and_keeps_one_name_per_output(weights, tmp_path, capsys,
                                                                                monkeypatch):
    """Item 1 and 6 of issue 33: an output made by another model or scale is not kept as
    if it were this one's; two sources named alike are refused; batch_size and the
    progress bar do what they say."""
    from sdanim.model import esrgan

    one = _frames_folder(tmp_path / "u1", 3)
    big = str(tmp_path / "big")
    calls = []
    real = esrgan.Upscaler.upscale
    monkeypatch.setattr(esrgan.Upscaler, "upscale", lambda self, images, progress=None: calls.append(len(images))
                        or real(self, images, progress))
    base = ["upscale", one, "--upscale-model", weights["upscaler"], "--out", big]
    assert main([*base, "--scale", "2", "--batch-size", "2"]) == 0
    assert calls == [2, 1] and "upscaling x2" in capsys.readouterr().err  # 3 images of one size, 2 per call
    made = {n: os.stat(os.path.join(big, n)).st_mtime_ns for n in ("f0.png", "f1.png", "f2.png")}
    assert main([*base, "--quiet"]) == 0 and calls == [2, 1]  # the same settings: kept, nothing redone
    assert "upscaling" not in capsys.readouterr().err  # --quiet: no bar
    assert all(os.stat(os.path.join(big, n)).st_mtime_ns == t for n, t in made.items())
    # Another tile size (another output, slightly): refused, then replaced on request.
    assert main([*base, "--tile", "16", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "already holds 3 output(s) made from another image or with other settings" in err and err.count("\n") == 1
    assert main([*base, "--tile", "16", "--quiet", "--overwrite"]) == 0 and calls == [2, 1, 1, 1, 1]
    # Another image under an existing name, and a file sdanim did not write.
    two = _frames_folder(tmp_path / "u2", 4)
    assert main(["upscale", two, "--upscale-model", weights["upscaler"], "--out", big, "--quiet", "--tile", "16"]) == 2
    assert "made from another image" in capsys.readouterr().err
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.path.join(tmp_path, "mine.png"))
    os.replace(os.path.join(tmp_path, "mine.png"), os.path.join(big, "mine.png"))
    mine = tmp_path / "m"
    mine.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(mine / "mine.png")
    assert main(["upscale", str(mine), "--upscale-model", weights["upscaler"], "--out", big, "--quiet"]) == 2
    assert "mine.png: not in the manifest" in capsys.readouterr().err
    # u1/f0.png and u2/f0.png would both write f0.png.
    assert main(["upscale", os.path.join(one, "f0.png"), os.path.join(two, "f0.png"), "--upscale-model",
                 weights["upscaler"], "--out", str(tmp_path / "both"), "--quiet"]) == 2
    assert "two images would be written to one file f0.png" in capsys.readouterr().err
