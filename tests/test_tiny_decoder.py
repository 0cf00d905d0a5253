"""The tiny decoder in the runs: --decoder tiny renders with TAESD, the manifest records
it and resume refuses a folder made with the other decoder; uniform-spacing previews use
TAESD when its weights are at hand. (TAESD itself against diffusers: tests/test_taesd.py.)"""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import read_manifest, require

torch = require("torch")
diffusers = require("diffusers")

import sdanim  # noqa: E402
from sdanim.config.settings import RenderSettings  # noqa: E402
from sdanim.frontends.cli import main  # noqa: E402
from test_taesd import _original, _write  # noqa: E402

S = RenderSettings(height=64, width=64, num_steps=2, batch_size=2)
COMMON = ["--size", "64x64", "--steps", "2", "--quiet", "--batch-size", "2", "--frames", "4"]


@pytest.fixture(scope="module")
def taesd_file(tmp_path_factory):
    torch.manual_seed(1)
    vae = diffusers.AutoencoderTiny().eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return _write(tmp_path_factory.mktemp("taesd") / "taesd_decoder.pth", _original(vae.state_dict(), "decoder"))


@pytest.fixture
def model(taesd_file):
    from tiny import make_tiny_model

    tiny = make_tiny_model()
    tiny.taesd = taesd_file
    return tiny


def test_decoder_tiny_renders_records_and_resume_refuses_the_other(model, tmp_path, monkeypatch, capsys):
    from sdanim.frontends.cli import options

    monkeypatch.setattr(options, "model_for", lambda args, settings: model)
    tiny_out, full_out = str(tmp_path / "tiny.gif"), str(tmp_path / "full.gif")
    assert main(["morph", "a cat", "a dog", "--decoder", "tiny", "--out", tiny_out, *COMMON]) == 0
    assert main(["morph", "a cat", "a dog", "--out", full_out, *COMMON]) == 0
    tiny_manifest, full_manifest = read_manifest(tmp_path / "tiny_frames"), read_manifest(tmp_path / "full_frames")
    assert tiny_manifest["render"]["decoder"] == "tiny" and "decoder" not in full_manifest["render"]
    from PIL import Image

    a = np.asarray(Image.open(tmp_path / "tiny_frames" / "frame_00001.png"))
    b = np.asarray(Image.open(tmp_path / "full_frames" / "frame_00001.png"))
    assert a.shape == b.shape == (64, 64, 3) and not np.array_equal(a, b)  # another decoder, another picture
    capsys.readouterr()
    assert main(["morph", "a cat", "a dog", "--out", tiny_out, *COMMON]) == 2  # the full decoder into tiny's folder
    err = capsys.readouterr().err
    assert "overwrite" in err and "decoder" in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path / "tiny_frames"))[:4] == [f"frame_{i:05d}.png" for i in range(4)]  # kept
    assert main(["morph", "a cat", "a dog", "--out", tiny_out, "--overwrite", *COMMON]) == 0
    assert "decoder" not in read_manifest(tmp_path / "tiny_frames")["render"]


def test_uniform_spacing_previews_with_the_tiny_decoder(model, tmp_path, monkeypatch):
    from sdanim.render import jobs

    decoders = []
    real = jobs.make_renderer

    def spy(model_, settings, *args, **kwargs):
        decoders.append((settings.num_steps, settings.decoder))
        return real(model_, settings, *args, **kwargs)

    monkeypatch.setattr(jobs, "make_renderer", spy)
    result = sdanim.morph(["a cat", "a dog"], out=str(tmp_path / "u.gif"), frames=5, settings=S, model=model,
                          spacing="uniform", preview_steps=1, progress=False)
    assert (1, "tiny") in decoders and (2, "full") in decoders  # the preview, then the frames
    assert read_manifest(result.frames_dir)["preview"] == {"decoder": "tiny"}


def test_bad_tiny_decoder_weights_are_one_line_before_rendering(model, tmp_path, monkeypatch, capsys):
    from sdanim.frontends.cli import options

    (tmp_path / "taesd_decoder.pth").write_bytes(b"")
    model.taesd = str(tmp_path / "taesd_decoder.pth")
    monkeypatch.setattr(options, "model_for", lambda args, settings: model)
    assert main(["morph", "a", "b", "--decoder", "tiny", "--out", str(tmp_path / "x.gif"), *COMMON]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdanim: error: ") and "taesd" in err and err.count("\n") == 1
    assert not (tmp_path / "x_frames" / "frame_00000.png").exists()
