"""Walks with motion modules end to end on a tiny SD 1.x model (random modules of the exact
structure): prompt travel through context windows, frames written with a manifest that
records the modules, a rerun that renders nothing, a lost frame decoded again from the
saved clip without sampling, other modules refused unless overwrite, what does not combine
refused with the reason, and the command line."""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import read_manifest

from sdanim.config.errors import SdanimError
from sdanim.config.motion import MotionSpec
from sdanim.config.settings import RenderSettings
from sdanim.render import motion as motion_render
from sdanim.tasks import walks

SETTINGS = RenderSettings(height=64, width=64, num_steps=2, guidance_scale=2.0, batch_size=3, scheduler="ddim")
PROMPTS = ["a red barn", "a snowy forest", "a city at night"]


@pytest.fixture(scope="module")
def model():
    from tiny import make_tiny_sd_model

    return make_tiny_sd_model(context_dim=768)


def _morph(model, out, **kwargs):
    args = dict(frames=10, seed=5, settings=SETTINGS, model=model, progress=False,
                motion=MotionSpec("random", context=6, stride=2))
    args.update(kwargs)
    return walks.morph(PROMPTS, out=str(out), **args)


def test_a_motion_morph_renders_records_and_resumes(model, tmp_path, monkeypatch):
    first = _morph(model, tmp_path / "clip.gif")
    assert first.rendered == 10 and first.frames.shape == (10, 64, 64, 3)
    record = read_manifest(first.frames_dir)["motion"]
    assert record == {"file": "random", "sha256": None, "context": 6, "stride": 2, "weighting": "pyramid",
                      "norm": "frame"}
    assert os.path.isfile(os.path.join(first.frames_dir, motion_render.STATE_FILE))
    plain = walks.morph(PROMPTS, out=str(tmp_path / "plain.gif"), frames=10, seed=5, settings=SETTINGS, model=model,
                        progress=False)
    assert np.abs(first.frames.astype(int) - plain.frames.astype(int)).max() > 10  # the modules act

    again = _morph(model, tmp_path / "clip.gif")
    assert again.rendered == 0 and np.array_equal(again.frames, first.frames)
    # A lost frame: decoded again from the saved clip, no window sampled.
    os.remove(os.path.join(first.frames_dir, "frame_00004.png"))
    monkeypatch.setattr(motion_render, "sample_clip", _sample_from_state_only)
    healed = _morph(model, tmp_path / "clip.gif")
    assert healed.rendered == 1 and np.array_equal(healed.frames, first.frames)


def _sample_from_state_only(eps_fn, clip, scheduler, state_path=None, **kwargs):
    state = motion_render.ClipState.load(state_path, clip.key)
    assert state is not None and state.step == scheduler.num_steps  # finished: nothing to sample
    return state.latents


def test_other_motion_settings_are_refused_unless_overwrite(model, tmp_path):
    _morph(model, tmp_path / "clip.gif", frames=7)
    with pytest.raises(SdanimError, match="motion"):
        _morph(model, tmp_path / "clip.gif", frames=7, motion=MotionSpec("random", context=4, stride=2))
    redone = _morph(model, tmp_path / "clip.gif", frames=7, motion=MotionSpec("random", context=4, stride=2),
                    overwrite=True)
    assert redone.rendered == 7


def test_what_does_not_combine_is_refused_before_any_model(tmp_path):
    from sdanim.config.control import ControlNetSpec

    def model():  # never built
        raise AssertionError("the model was built")

    cases = [
        (dict(workers=1), r"^motion modules render in one process: .* Received: workers=1$"),
        (dict(attention_interp="fused"), r"^attention interpolation adds helper rows .* Received: attention_interp='fused'$"),
        (dict(spacing="uniform"), r"^uniform spacing previews frames one by one, .* Received: spacing='uniform'$"),
        (dict(controlnets=[ControlNetSpec("random", image=None)]), r"^ControlNets with motion modules are not supported"),
    ]
    for kwargs, message in cases:
        with pytest.raises(SdanimError, match=message):
            _morph(model, tmp_path / "x.gif", **kwargs)
    with pytest.raises(SdanimError, match=r"^context_stride must be a whole number of frames in \[1, context=4\]\. "
                                          r"Received: context_stride=5$"):
        MotionSpec("random", context=4, stride=5)


def test_an_sd2_model_is_refused_before_anything_runs(tmp_path):
    import types

    sd2 = types.SimpleNamespace(version="2.1")  # a model that says what it is (the UNet's check: test_motion.py)
    with pytest.raises(SdanimError, match=r"^motion modules are for SD 1.x \(no SD 2.x modules exist\)\. "
                                          r"Received: model version 2.1$"):
        _morph(sd2, tmp_path / "clip.gif", frames=4)
    assert not os.path.exists(tmp_path / "clip_frames")


def test_the_command_line(model, tmp_path, monkeypatch, capsys):
    from sdanim.frontends.cli import main, options

    monkeypatch.setattr(options, "model_for", lambda args, settings: model)
    common = ["morph", *PROMPTS[:2], "--frames", "6", "--size", "64x64", "--steps", "2", "--quiet",
              "--out", str(tmp_path / "cli.gif")]
    assert main([*common, "--motion-module", "random", "--context", "4", "--context-stride", "2"]) == 0
    assert read_manifest(tmp_path / "cli_frames")["motion"]["context"] == 4
    assert main([*common, "--context", "8"]) == 2
    err = capsys.readouterr().err
    assert "--context needs --motion-module FILE" in err and "Traceback" not in err
    assert main([*common, "--motion-module", str(tmp_path / "missing.ckpt")]) == 2
    assert "the motion module does not exist" in capsys.readouterr().err
