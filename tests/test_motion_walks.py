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

# End to end, no tolerance: once per CI, not on every CPU path; outside the quick tier (slow).
pytestmark = [pytest.mark.once, pytest.mark.slow]

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


@pytest.fixture(scope="module")
def clip(model, tmp_path_factory):
    """The default motion morph (10 frames, windows of 6 every 2), rendered once for the
    module's tests (they read its frames; the first one also resumes it)."""
    return _morph(model, tmp_path_factory.mktemp("clip") / "clip.gif")


@pytest.fixture(scope="module")
def plain(model, tmp_path_factory):
    """The same morph without motion modules."""
    return walks.morph(PROMPTS, out=str(tmp_path_factory.mktemp("plain") / "plain.gif"), frames=10, seed=5,
                       settings=SETTINGS, model=model, progress=False)


def test_a_motion_morph_renders_records_and_resumes(model, clip, plain, monkeypatch):
    first = clip
    assert first.rendered == 10 and first.frames.shape == (10, 64, 64, 3)
    record = read_manifest(first.frames_dir)["motion"]
    assert record == {"file": "random", "sha256": None, "context": 6, "stride": 2, "weighting": "pyramid",
                      "norm": "frame", "blend": "unet", "betas": "linear"}
    assert os.path.isfile(os.path.join(first.frames_dir, motion_render.STATE_FILE))
    assert np.abs(first.frames.astype(int) - plain.frames.astype(int)).max() > 10  # the modules act

    again = _morph(model, first.out)
    assert again.rendered == 0 and np.array_equal(again.frames, first.frames)
    # A lost frame: decoded again from the saved clip, no window sampled.
    os.remove(os.path.join(first.frames_dir, "frame_00004.png"))
    monkeypatch.setattr(motion_render, "sample_clip", _sample_from_state_only)
    healed = _morph(model, first.out)
    assert healed.rendered == 1 and np.array_equal(healed.frames, first.frames)


def _sample_from_state_only(eps_fn, clip, scheduler, state_path=None, **kwargs):
    state = motion_render.ClipState.load(state_path, clip.key)
    assert state is not None and state.step == scheduler.num_steps  # finished: nothing to sample
    return state.latents


def test_frames_are_coupled_only_with_motion_modules(model, plain, tmp_path):
    """Only the last keyframe's prompt changes: with motion modules the first frame changes
    too (it is denoised together with the frames that prompt reaches: one window of 16),
    without them it does not (frames are independent)."""
    other = [*PROMPTS[:2], "a desert at noon"]
    motion = MotionSpec("random")
    a = _morph(model, tmp_path / "a.gif", motion=motion).frames
    b = walks.morph(other, out=str(tmp_path / "b.gif"), frames=10, seed=5, settings=SETTINGS, model=model,
                    progress=False, motion=motion).frames
    assert np.abs(a[0].astype(int) - b[0].astype(int)).max() > 0
    changed = walks.morph(other, out=str(tmp_path / "plain_other.gif"), frames=10, seed=5, settings=SETTINGS,
                          model=model, progress=False).frames
    assert np.array_equal(plain.frames[0], changed[0]) and not np.array_equal(plain.frames[-1], changed[-1])


def test_the_two_blends_differ_and_agree_on_one_window(model, clip, tmp_path):
    """Windows blended in the UNet's predictions or in the motion modules' attention: two
    ways to sample a long clip, so their frames differ; a clip of one window is the same
    either way (one UNet call on every frame)."""
    long = {"unet": clip.frames, "attention": _morph(model, tmp_path / "long_attention.gif", motion=MotionSpec(
        "random", context=6, stride=2, blend="attention")).frames}
    assert np.abs(long["unet"].astype(int) - long["attention"].astype(int)).max() > 2
    short = {blend: _morph(model, tmp_path / f"short_{blend}.gif", frames=6,
                           motion=MotionSpec("random", context=6, stride=2, blend=blend)).frames
             for blend in ("unet", "attention")}
    assert np.array_equal(short["unet"], short["attention"])


def test_a_controlnet_holds_the_structure_of_a_motion_clip(model, clip, tmp_path):
    """A ControlNet (random weights, every parameter drawn) with motion modules: its record
    beside the motion record, its residuals acting on every window (the frames change), and
    scale 0 giving the clip without a net bit for bit."""
    from PIL import Image

    from sdanim.config.control import ControlNetSpec

    picture = tmp_path / "edges.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(picture)
    motion = MotionSpec("random", context=6, stride=2)
    plain = clip  # the same clip without a net
    controlled = _morph(model, tmp_path / "net.gif", motion=motion,
                        controlnets=[ControlNetSpec("random", image=str(picture), scale=1.0)])
    manifest = read_manifest(controlled.frames_dir)
    assert manifest["motion"]["context"] == 6 and len(manifest["controlnets"]) == 1
    assert np.abs(controlled.frames.astype(int) - plain.frames.astype(int)).max() > 2
    zero = _morph(model, tmp_path / "zero.gif", motion=motion,
                  controlnets=[ControlNetSpec("random", image=str(picture), scale=0.0)])
    assert np.array_equal(zero.frames, plain.frames)


def test_other_motion_settings_are_refused_unless_overwrite(model, tmp_path):
    _morph(model, tmp_path / "clip.gif", frames=7)
    with pytest.raises(SdanimError, match="motion"):
        _morph(model, tmp_path / "clip.gif", frames=7, motion=MotionSpec("random", context=4, stride=2))
    redone = _morph(model, tmp_path / "clip.gif", frames=7, motion=MotionSpec("random", context=4, stride=2),
                    overwrite=True)
    assert redone.rendered == 7


def test_what_does_not_combine_is_refused_before_any_model(tmp_path):
    def model():  # never built
        raise AssertionError("the model was built")

    cases = [
        (dict(attention_interp="fused"), r"^attention interpolation adds helper rows .* Received: attention_interp='fused'$"),
        (dict(spacing="uniform"), r"^uniform spacing previews frames one by one, .* Received: spacing='uniform'$"),
    ]
    for kwargs, message in cases:
        with pytest.raises(SdanimError, match=message):
            _morph(model, tmp_path / "x.gif", **kwargs)
    with pytest.raises(SdanimError, match=r"^context_stride must be a whole number of frames in \[1, context=4\]\. "
                                          r"Received: context_stride=5$"):
        MotionSpec("random", context=4, stride=5)
    with pytest.raises(SdanimError, match=r"^context_blend must be one of unet, attention\. Received: context_blend='frames'$"):
        MotionSpec("random", blend="frames")
    with pytest.raises(SdanimError, match=r"^betas must be one of scaled_linear, linear\. Received: betas='cosine'$"):
        MotionSpec("random", betas="cosine")


def test_an_sd2_model_is_refused_before_anything_runs(tmp_path):
    import types

    sd2 = types.SimpleNamespace(version="2.1")  # a model that says what it is (the UNet's check: test_motion.py)
    with pytest.raises(SdanimError, match=r"^motion modules are for SD 1.x \(AnimateDiff's; none exist for SD 2.x or SD3\)\. "
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
    lightning = ["--scheduler", "euler_trailing", "--guidance", "1", "--context-blend", "attention",
                 "--betas", "scaled_linear", "--overwrite"]
    assert main([*common, "--motion-module", "random", "--context", "4", "--context-stride", "2", *lightning]) == 0
    manifest = read_manifest(tmp_path / "cli_frames")
    assert (manifest["motion"]["blend"], manifest["motion"]["betas"]) == ("attention", "scaled_linear")
    assert manifest["render"]["scheduler"] == "euler_trailing"
    assert main([*common, "--context", "8"]) == 2
    err = capsys.readouterr().err
    assert "--context needs --motion-module FILE" in err and "Traceback" not in err
    assert main([*common, "--motion-module", str(tmp_path / "missing.ckpt")]) == 2
    assert "the motion module does not exist" in capsys.readouterr().err
