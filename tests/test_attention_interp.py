"""Attention interpolation (AID), quick tier: a tiny UNet built from KerasCV's own
transformer block (self- and cross-attention layers, `tiny.tiny_attention_unet`), made
ready by the same `attach_attention_interp` as the real UNet. Parity of the real UNet
with a diffusers reference processor: tests/test_heavy_checkpoints.py."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import level_gap, read_manifest, require
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


@pytest.mark.parametrize("loop", ["steps", "program"])
@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "lcm"])
@pytest.mark.parametrize("mode", ["inner", "outer", "fused"])
def test_keyframes_are_the_plain_render_and_in_betweens_change(model, mode, scheduler, loop):
    """Keyframe frames are the plain render's, bit for bit, on every CPU path (with
    oneDNN's kernels a row's result depends on the batch's shape: a keyframe frame's
    prediction comes from the frames alone, not beside the helper rows)."""
    settings = RenderSettings(height=64, width=64, num_steps=4, batch_size=3, scheduler=scheduler,
                              guidance_scale=1.0 if scheduler == "lcm" else 7.5)
    plain = _render(model, _walk("off"), settings, loop=loop)
    aid = _render(model, _walk(mode), settings, loop=loop)
    assert all(level_gap(aid[k], plain[k]) == 0 for k in KEYFRAMES)  # t = 0 and t = 1: A and B exactly
    moved = [level_gap(aid[i], plain[i]) for i in range(9) if i not in KEYFRAMES]
    assert min(moved) > 0 and max(moved) > 20, moved


def test_warmup_zero_is_the_plain_render(model):
    """No step interpolates: the same frames as embedding interpolation, bit for bit."""
    plain = _render(model, _walk("off"))
    none = _render(model, _walk("fused", attention_warmup=0.0))
    assert all(level_gap(none[i], plain[i]) == 0 for i in range(9))


@pytest.mark.parametrize("mode", ["inner", "outer", "fused"])
def test_keyframes_that_agree_give_the_plain_frames(model, mode):
    """A == B (one prompt, one seed): the keys and values interpolated are the frame's
    own, so every mode is plain attention (up to float32 rounding)."""
    walk = _walk(mode, prompts=["a lighthouse", "a lighthouse"], seeds=(5, 5))
    plain = _render(model, _walk("off", prompts=["a lighthouse", "a lighthouse"], seeds=(5, 5)))
    aid = _render(model, walk)
    assert max(level_gap(aid[i], plain[i]) for i in range(5)) <= 1


def test_batch_size_resume_and_loop_do_not_change_a_frame(model):
    walk = _walk("fused")
    whole = _render(model, walk)
    again = _render(model, walk, indices=[7, 1, 5, 2])  # a resumed run: the missing frames only
    assert all(level_gap(again[i], whole[i]) == 0 for i in again)
    steps = _render(model, walk, loop="steps")
    program = _render(model, walk, loop="program")
    assert max(level_gap(steps[i], program[i]) for i in range(9)) <= 1
    for batch_size in (1, 2, 4):
        other = _render(model, walk, batch_size=batch_size)
        assert max(level_gap(other[i], whole[i]) for i in range(9)) <= 1, batch_size


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
    manifest = read_manifest(os.path.join(result.frames_dir, "manifest.json"))
    assert manifest["walk"]["attention"] == "fused" and manifest["walk"]["attention_warmup"] == 0.75
    text = json.loads(Image.open(os.path.join(result.frames_dir, "frame_00002.png")).text["sdanim"])
    assert text["walk"]["attention"] == "fused"
    again = sdanim.morph(PROMPTS[:2], out=out, attention_interp="fused", attention_warmup=0.75, **kwargs)
    assert again.rendered == 0
    with pytest.raises(SdanimError, match="overwrite"):
        sdanim.morph(PROMPTS[:2], out=out, attention_interp="inner", **kwargs)
    off = sdanim.morph(PROMPTS[:2], out=str(tmp_path / "off.gif"), **kwargs)
    assert "attention" not in read_manifest(os.path.join(off.frames_dir, "manifest.json"))["walk"]


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
    manifest = read_manifest(os.path.join(result.frames_dir, "manifest.json"))
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
    walk = read_manifest(str(tmp_path / "m_frames" / "manifest.json"))["walk"]
    assert walk["attention"] == "inner" and walk["keyframes"][0]["guide"] == "a fox"
    path = tmp_path / "w.yaml"
    path.write_text("attention: outer\nkeyframes: [{prompt: a, seed: 1, frames: 2}, {prompt: b, seed: 2}]\n")
    assert main(["walk", str(path), "--out", str(tmp_path / "w.gif"), *common]) == 0
    assert read_manifest(str(tmp_path / "w_frames" / "manifest.json"))["walk"]["attention"] == "outer"
    assert main(["walk", str(path), "--attention-interp", "off", "--out", str(tmp_path / "w2.gif"), *common]) == 0
    assert "attention" not in read_manifest(str(tmp_path / "w2_frames" / "manifest.json"))["walk"]


def test_ui_plot_compares_lerp_and_attention_renders_of_one_walk(tmp_path):
    require("gradio")
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


def test_aid_rows_match_an_independent_reading_of_the_plan(model):
    """Item 7 of issue 33: `FramePlan.aid_batch`'s bookkeeping (each row's t, its
    keyframes' helper rows a and b, on) against the positions read directly: frame i at
    u lies t = u - floor(u) past keyframe floor(u); the helpers are the keyframes of the
    batch's whole window, in order, padded to one count."""
    walk = _walk("fused", prompts=PROMPTS + ["a blue lake"], seeds=(1, 2, 3, 4))
    plan = FrameJob(walk, S).plan(model)
    positions = np.asarray(plan.positions)
    batch_size = 4
    count = plan.helper_count(batch_size)
    for start in range(0, len(plan), batch_size):
        window = list(range(start, min(start + batch_size, len(plan))))
        padded = window + [window[-1]] * (batch_size - len(window))
        needed = sorted({k for i in window for k in (int(np.floor(positions[i])), int(np.floor(positions[i])) + 1)
                         if positions[i] % 1.0 != 0.0})
        helpers, (t, a, b, on) = plan.aid_batch(padded, batch_size)
        order = (needed or [0]) + [(needed or [0])[-1]] * (count - len(needed or [0]))
        assert len(helpers) == count and [h.position for h in helpers] == [float(k) for k in order]
        for row, i in enumerate(padded):
            u = positions[i]
            k, frac = int(np.floor(u)), u - np.floor(u)
            if frac == 0.0:
                assert on[row] == 0.0 and t[row] == 0.0
                continue
            assert on[row] == 1.0 and t[row] == pytest.approx(frac, abs=1e-6)
            assert helpers[a[row] - batch_size].position == k and helpers[b[row] - batch_size].position == k + 1
            assert np.array_equal(helpers[a[row] - batch_size].context, plan.embeddings[k])
            assert np.array_equal(helpers[b[row] - batch_size].context, plan.embeddings[k + 1])
        assert all(on[batch_size:] == 0.0)  # the helpers themselves never interpolate


@pytest.mark.parametrize("guided", [True, False])
def test_only_the_conditional_rows_interpolate(monkeypatch, guided):
    """`cond_start` (where the UNet's conditional rows begin) is the frames + helpers
    count under guidance (the batch is (uncond, cond)) and 0 without it. (Read while the
    UNet is traced: a model of its own, whose functions no other test traced.)"""
    from sdanim.model import attention_interp

    model = make_tiny_model(attention=True)

    seen = []
    real = attention_interp.mix

    def spy(layer, inputs, context, plain, state):
        seen.append((int(inputs.shape[0]), state.cond_start, int(state.t.shape[0])))
        return real(layer, inputs, context, plain, state)

    monkeypatch.setattr(attention_interp, "mix", spy)
    settings = RenderSettings(height=64, width=64, num_steps=2, batch_size=3, guidance_scale=7.5 if guided else 1.0)
    _render(model, _walk("inner"), settings, indices=[1, 2], loop="steps")
    rows = {r for _, _, r in seen}
    assert len(rows) == 1 and seen
    (r,) = rows
    assert all(n == (2 * r if guided else r) and start == (r if guided else 0) for n, start, _ in seen), seen


def test_a_frame_near_a_keyframe_attends_to_that_keyframe(model):
    """One render where swapping A and B (or t for 1 - t) must show. The tiny UNet sees
    the prompt through cross-attention only, and under inner interpolation a frame at t
    attends to (1 - t) A's + t B's keys and values for every step (warm-up 1): the frame
    at t = 0.1 looks like keyframe A's image, the frame at t = 0.9 like B's. Swapped,
    each would look like the other end."""
    walk = walk_from_prompts(["a red barn at dawn", "a snowy forest"], [5, 5], [10], attention="inner",
                             attention_warmup=1.0)
    settings = RenderSettings(height=64, width=64, num_steps=4, batch_size=4)
    frames = _render(model, walk, settings, indices=[0, 1, 9, 10], batch_size=4)

    def gap(i, j):
        return np.abs(frames[i].astype(int) - frames[j].astype(int)).mean()

    assert gap(1, 0) < 0.5 * gap(1, 10), (gap(1, 0), gap(1, 10))
    assert gap(9, 10) < 0.5 * gap(9, 0), (gap(9, 10), gap(9, 0))
