"""In-betweens and upscaling in the runs (sdanim.render.post): a tiny-model walk with
--interpolate and --upscale through the CLI, resume after an interruption, loops that
close, the standalone interpolate/upscale commands and the image tools' --upscale.
Weights: small random RIFE (ccvfi's IFNet) and Real-ESRGAN compact files."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import require

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


def _gif(path) -> list:
    with Image.open(path) as im:
        frames = []
        for k in range(im.n_frames):
            im.seek(k)
            frames.append(np.asarray(im.convert("RGB")))
    return frames


def _size(path) -> tuple:
    with Image.open(path) as im:
        return im.size


def _manifest(folder) -> dict:
    with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def _files(folder, pattern) -> dict:
    return {os.path.basename(p): os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(folder, pattern))}


def test_morph_with_inbetweens_and_upscaling_resumes_without_recomputing(cli_model, weights, tmp_path, monkeypatch):
    out = str(tmp_path / "m.gif")
    argv = ["morph", "a cat", "a dog", "--frames", "4", "--interpolate", "3", "--rife", weights["rife"],
            "--upscale", "2", "--upscale-model", weights["upscaler"], "--out", out, *COMMON]
    assert main(argv) == 0
    video = _gif(out)
    assert len(video) == (4 - 1) * 3 + 1 and video[0].shape == (128, 128, 3)  # in-betweens, then x2
    folder = str(tmp_path / "m_frames")
    post = _manifest(folder)["post"]
    assert post["interpolate"]["times"] == 3 and len(post["interpolate"]["rife"]["sha256"]) == 64
    assert post["upscale"]["scale"] == 2 and post["upscale"]["model"]["file"] == "compact_x2.pth"
    between = glob.glob(os.path.join(folder, "between-*"))[0]
    upscaled = glob.glob(os.path.join(folder, "upscaled-*"))[0]
    assert len(_files(between, "between_*.png")) == 6 and len(_files(upscaled, "*.png")) == 10
    # The rendered frame and its in-betweens: in-betweens differ from both neighbours.
    assert _size(os.path.join(between, "between_00000_01.png")) == (64, 64)

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
    again = _gif(out)
    assert all(np.array_equal(a, b) for a, b in zip(again, video))


def test_loop_closes_and_a_walk_keeps_its_frames_without_post(cli_model, weights, tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("loop: true\nkeyframes: [{prompt: a, seed: 1, frames: 2}, {prompt: b, seed: 2, frames: 2}]\n")
    out = str(tmp_path / "loop.gif")
    assert main(["walk", str(path), "--interpolate", "2", "--rife", weights["rife"], "--out", out, *COMMON]) == 0
    video = _gif(out)
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
    assert len(_gif(out)) == (3 - 1) * 4 + 1 and "9 frames from 3" in capsys.readouterr().out
    big = tmp_path / "big"
    assert main(["upscale", str(frames), "--scale", "2", "--upscale-model", weights["upscaler"], "--out", str(big),
                 "--quiet"]) == 0
    assert sorted(os.listdir(big)) == ["f0.png", "f1.png", "f2.png"]
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
    assert sorted(os.listdir(out / "x2")) == small and _size(out / "x2" / small[0]) == (128, 128)
    # A model that cannot do the scale asked: refused before anything is generated.
    assert main(["generate", "a cat", "--out", str(tmp_path / "none"), "--upscale", "4",
                 "--upscale-model", weights["upscaler"], *COMMON]) == 2
    assert not os.path.exists(tmp_path / "none") or not os.listdir(tmp_path / "none")
