"""Attention interpolation (AID), quick tier: a tiny UNet built from KerasCV's own
transformer block (self- and cross-attention layers, `tiny.tiny_attention_unet`), made
ready by the same `attach_attention_interp` as the real UNet. Parity of the real UNet
with a diffusers reference processor: tests/test_heavy_checkpoints.py."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from sdanim.config.errors import SdanimError
from sdanim.config.settings import RenderSettings
from sdanim.core.keyframes import parse_walk, walk_from_prompts
from sdanim.frontends.cli import main
from sdanim.render.jobs import FrameJob, make_renderer
from sdanim.render.sampling import render_frames
from tiny import make_tiny_model

S = RenderSettings(height=64, width=64, num_steps=4, batch_size=3)
PROMPTS = ["a red barn at dawn", "a snowy forest", "a green frog"]
KEYFRAMES = (0, 4, 8)  # of the 9 frames of `_walk`


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(attention=True)


def _walk(mode: str, prompts=PROMPTS, seeds=(1, 2, 3), **kwargs):
    return walk_from_prompts(list(prompts), list(seeds), [4] * (len(prompts) - 1), attention=mode, **kwargs)


def _render(model, walk, settings=S, indices=None, batch_size=3, loop=None) -> dict:
    plan = FrameJob(walk, settings).plan(model)
    renderer = make_renderer(model, settings, None)
    if loop is not None:
        renderer.loop = loop
    return render_frames(renderer, plan, range(len(plan)) if indices is None else indices, batch_size, progress=False)


def _manifest(path) -> dict:
    with open(path) as f:
        return json.load(f)


def _gap(a, b) -> int:
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "lcm"])
@pytest.mark.parametrize("mode", ["inner", "outer", "fused"])
def test_keyframes_are_the_plain_render_and_in_betweens_change(model, mode, scheduler):
    settings = RenderSettings(height=64, width=64, num_steps=4, batch_size=3, scheduler=scheduler,
                              guidance_scale=1.0 if scheduler == "lcm" else 7.5)
    plain = _render(model, _walk("off"), settings)
    aid = _render(model, _walk(mode), settings)
    assert all(_gap(aid[k], plain[k]) == 0 for k in KEYFRAMES)  # t = 0 and t = 1: A and B exactly
    moved = [_gap(aid[i], plain[i]) for i in range(9) if i not in KEYFRAMES]
    assert min(moved) > 0 and max(moved) > 20, moved


def test_warmup_zero_is_the_plain_render(model):
    """No step interpolates: the same frames as embedding interpolation, bit for bit."""
    plain = _render(model, _walk("off"))
    none = _render(model, _walk("fused", attention_warmup=0.0))
    assert all(_gap(none[i], plain[i]) == 0 for i in range(9))


@pytest.mark.parametrize("mode", ["inner", "outer", "fused"])
def test_keyframes_that_agree_give_the_plain_frames(model, mode):
    """A == B (one prompt, one seed): the keys and values interpolated are the frame's
    own, so every mode is plain attention (up to float32 rounding)."""
    walk = _walk(mode, prompts=["a lighthouse", "a lighthouse"], seeds=(5, 5))
    plain = _render(model, _walk("off", prompts=["a lighthouse", "a lighthouse"], seeds=(5, 5)))
    aid = _render(model, walk)
    assert max(_gap(aid[i], plain[i]) for i in range(5)) <= 1


def test_batch_size_resume_and_loop_do_not_change_a_frame(model):
    walk = _walk("fused")
    whole = _render(model, walk)
    again = _render(model, walk, indices=[7, 1, 5, 2])  # a resumed run: the missing frames only
    assert all(_gap(again[i], whole[i]) == 0 for i in again)
    steps = _render(model, walk, loop="steps")
    program = _render(model, walk, loop="program")
    assert max(_gap(steps[i], program[i]) for i in range(9)) <= 1
    for batch_size in (1, 2, 4):
        other = _render(model, walk, batch_size=batch_size)
        assert max(_gap(other[i], whole[i]) for i in range(9)) <= 1, batch_size


def test_layer_math_at_the_ends_and_for_equal_keyframes():
    """One KerasCV attention layer through `attention_interp.mix`: t = 0 (1) attends to
    A's (B's) keys and values only; with K_A = K_B inner == outer == plain attention to A."""
    import keras
    from keras_cv.src.models.stable_diffusion.diffusion_model import CrossAttention

    from sdanim.model import attention_interp

    keras.utils.set_random_seed(3)
    layer = CrossAttention(2, 8)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 10, 16)).astype(np.float32)  # rows: frame, frame, A, B
    x[3] = x[2] + 0.5 * rng.standard_normal((10, 16)).astype(np.float32)
    plain = np.asarray(layer(x))

    def mixed(mode, t, b_row=3, rows=x):
        state = attention_interp._State(mode, 0, np.array([t, t, 0, 0], np.float32), np.array([2, 2, 0, 0]),
                                        np.array([b_row, b_row, 0, 0]), np.array([1, 1, 0, 0], np.float32))
        return np.asarray(attention_interp.mix(layer, rows, None, layer(rows), state))

    # A frame whose own input is A's: at t = 0 every mode gives A's output; at t = 1 inner
    # and outer attend to B's keys (fused also keeps the frame's own).
    ends = x.copy()
    ends[0] = x[2]
    for mode in ("inner", "outer", "fused"):
        np.testing.assert_allclose(mixed(mode, 0.0, rows=ends)[0], plain[2], atol=1e-5)
    k_b = layer.to_k(x[3:4]), layer.to_v(x[3:4])
    q = layer.to_q(x[0:1])
    expected = layer.out_proj(keras.ops.reshape(keras.ops.dot_product_attention(
        keras.ops.reshape(q, (1, 10, 2, 8)), keras.ops.reshape(k_b[0], (1, 10, 2, 8)),
        keras.ops.reshape(k_b[1], (1, 10, 2, 8)), scale=layer.scale), (1, 10, 16)))
    for mode in ("inner", "outer"):
        np.testing.assert_allclose(mixed(mode, 1.0)[0], np.asarray(expected)[0], atol=1e-5)
    # K_A = K_B: B's row is A's.
    same = [mixed(mode, 0.37, b_row=2) for mode in ("inner", "outer")]
    np.testing.assert_allclose(same[0], same[1], atol=1e-5)
    np.testing.assert_allclose(mixed("inner", 0.0, b_row=2), mixed("inner", 0.9, b_row=2), atol=1e-5)
    # Rows that do not interpolate are the layer's own output, bit for bit.
    assert np.array_equal(mixed("fused", 0.5)[2:], plain[2:])
    assert not np.allclose(mixed("fused", 0.5)[:2], plain[:2], atol=1e-3)


def test_guide_prompt_replaces_the_blend_between_keyframes(model):
    walk = _walk("off", guide="a cartoon animal")
    plan = FrameJob(walk, S).plan(model)
    guide = FrameJob(_walk("off", prompts=["a cartoon animal", "x"], seeds=(1, 2)), S).plan(model).embeddings[0]
    assert all(np.array_equal(plan.frame(i).context, guide) for i in (1, 2, 3, 5, 7))
    assert not np.array_equal(plan.frame(4).context, guide)  # keyframes keep their own prompt
    assert np.array_equal(plan.frame(0).context, plan.embeddings[0])
    record = walk.record()["keyframes"]
    assert record[0]["guide"] == "a cartoon animal" and "guide" not in record[2]
    assert parse_walk(walk.record()).record() == walk.record()


def test_morph_records_attention_and_resume_refuses_another_mode(model, tmp_path):
    import sdanim
    from PIL import Image

    out = str(tmp_path / "m.gif")
    kwargs = dict(frames=5, settings=S, model=model, progress=False)
    result = sdanim.morph(PROMPTS[:2], out=out, attention_interp="fused", attention_warmup=0.75, **kwargs)
    manifest = _manifest(os.path.join(result.frames_dir, "manifest.json"))
    assert manifest["walk"]["attention"] == "fused" and manifest["walk"]["attention_warmup"] == 0.75
    text = json.loads(Image.open(os.path.join(result.frames_dir, "frame_00002.png")).text["sdanim"])
    assert text["walk"]["attention"] == "fused"
    again = sdanim.morph(PROMPTS[:2], out=out, attention_interp="fused", attention_warmup=0.75, **kwargs)
    assert again.rendered == 0
    with pytest.raises(SdanimError, match="overwrite"):
        sdanim.morph(PROMPTS[:2], out=out, attention_interp="inner", **kwargs)
    off = sdanim.morph(PROMPTS[:2], out=str(tmp_path / "off.gif"), **kwargs)
    assert "attention" not in _manifest(os.path.join(off.frames_dir, "manifest.json"))["walk"]


def test_beta_spacing_keeps_keyframes_and_gathers_mid_transition(model, tmp_path):
    from sdanim.core.spacing import beta_positions

    u = beta_positions([8, 8], ["linear", "linear"])
    assert u[0] == 0.0 and u[8] == 1.0 and u[-1] == 2.0 and len(u) == 17
    steps = np.diff(u[:9])
    assert steps[3] < steps[0] and steps[4] < steps[7]  # denser in the middle
    np.testing.assert_allclose(u[1:8], 1.0 - u[7:0:-1], atol=1e-12)  # Beta(3, 3) is symmetric
    import sdanim

    result = sdanim.morph(PROMPTS[:2], out=str(tmp_path / "b.gif"), frames=5, settings=S, model=model,
                          spacing="beta", progress=False)
    manifest = _manifest(os.path.join(result.frames_dir, "manifest.json"))
    assert manifest["timing"]["spacing"] == "beta"


@pytest.mark.parametrize("argv, match", [
    (["morph", "a", "b", "--attention-interp", "sideways"], "argument --attention-interp: invalid choice: 'sideways'"),
    (["morph", "a", "b", "--attention-interp", "fused", "--attention-warmup", "1.5"],
     "attention_warmup must be a fraction of the steps in [0, 1]. Received: attention_warmup=1.5"),
    (["circle", "a lighthouse", "--attention-interp", "inner"],
     "a circle noise walk has one prompt and no keyframe noises to blend. Received: attention_interp='inner'"),
    (["walk", "WALK", "--attention-warmup", "-0.1"], "Received: attention_warmup=-0.1"),
    (["walk", "GUIDED"], "a guide prompt guides the frames between two keyframes; this walk has one"),
    (["walk", "BADMODE"], "attention_interp must be one of off, inner, outer, fused. Received: attention_interp='sometimes'"),
])
def test_bad_input_is_one_line_before_any_model(tmp_path, monkeypatch, capsys, argv, match):
    from sdanim.model import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model was built"))
    files = {
        "WALK": "keyframes: [{prompt: a, seed: 1, frames: 2}, {prompt: b, seed: 2}]\n",
        "GUIDED": "loop: true\nkeyframes: [{prompt: a, seed: 1, frames: 4, guide: c}]\n",
        "BADMODE": "attention: sometimes\nkeyframes: [{prompt: a, seed: 1, frames: 2}, {prompt: b, seed: 2}]\n",
    }
    for name, text in files.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    argv = [str(tmp_path / f"{a}.yaml") if a in files else a for a in argv]
    assert main(argv + ["--out", str(tmp_path / "x.gif"), "--size", "64x64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdanim: error: ") and match in err and err.count("\n") == 1


def test_cli_morph_and_walk_file_with_attention(model, tmp_path, monkeypatch, capsys):
    from sdanim.frontends.cli import options

    monkeypatch.setattr(options, "model_for", lambda args, settings: model)
    common = ["--size", "64x64", "--steps", "2", "--quiet", "--batch-size", "2"]
    out = str(tmp_path / "m.gif")
    assert main(["morph", "a cat", "a dog", "--frames", "4", "--attention-interp", "inner", "--guide", "a fox",
                 "--out", out, *common]) == 0
    walk = _manifest(str(tmp_path / "m_frames" / "manifest.json"))["walk"]
    assert walk["attention"] == "inner" and walk["keyframes"][0]["guide"] == "a fox"
    path = tmp_path / "w.yaml"
    path.write_text("attention: outer\nkeyframes: [{prompt: a, seed: 1, frames: 2}, {prompt: b, seed: 2}]\n")
    assert main(["walk", str(path), "--out", str(tmp_path / "w.gif"), *common]) == 0
    assert _manifest(str(tmp_path / "w_frames" / "manifest.json"))["walk"]["attention"] == "outer"
    assert main(["walk", str(path), "--attention-interp", "off", "--out", str(tmp_path / "w2.gif"), *common]) == 0
    assert "attention" not in _manifest(str(tmp_path / "w2_frames" / "manifest.json"))["walk"]


def test_ui_plot_compares_lerp_and_attention_renders_of_one_walk(tmp_path):
    pytest.importorskip("gradio")
    from sdanim.frontends.ui.animate import _compare

    walk = _walk("off").record()
    smooth = {"distances": [1.0, 2.0], "mean": 1.5, "one_minus_gini": 0.9, "variance": 0.25}
    runs = {"a": walk, "b": _walk("fused").record(), "c": _walk("off", prompts=["x", "y", "z"]).record()}
    for name, record in runs.items():
        os.makedirs(tmp_path / f"walk-{name}_frames")
        with open(tmp_path / f"walk-{name}_frames" / "manifest.json", "w") as f:
            json.dump({"walk": record, "timing": {"spacing": "linear"}, "render": {"scheduler": "ddim"},
                       "smoothness": smooth}, f)
    reports = _compare(str(tmp_path), walk, str(tmp_path / "walk-a_frames"), smooth)
    assert list(reports) == ["this render (attention=lerp, spacing=linear, sampler=ddim)",
                             "attention=fused (warm-up 0.5), spacing=linear, sampler=ddim"]  # not the other walk
