"""Keyframe walks: files, loops, easing, prompt mixes, smoothness report."""

import json
import os

import numpy as np
import pytest

import sdanim
from sdanim.frontends.cli import main
from sdanim.config.errors import SdanimError
from sdanim.core.interpolation import EASINGS, path_positions
from sdanim.core.keyframes import Walk, make_keyframe, mix_embeddings, parse_walk
from sdanim.formats.walk_files import load_walk
from sdanim.config.settings import RenderSettings
from sdanim.core.smoothness import gini, smoothness_report

S = RenderSettings(height=64, width=64, num_steps=2, batch_size=4)

WALK_YAML = """\
loop: true
keyframes:
  - {prompt: a red barn at dawn, seed: 1, frames: 4, easing: ease-in-out}
  - {prompt: {a rabbit: 0.5, a frog: 0.5}, seed: 2, frames: 3}
  - {prompt: a snowy forest, seed: 3, frames: 2}
"""


@pytest.mark.parametrize("name", sorted(EASINGS))
def test_easings_fix_the_ends_and_rise(name):
    f = EASINGS[name]
    assert abs(f(0.0)) < 1e-12 and abs(f(1.0) - 1.0) < 1e-12
    values = [f(t) for t in np.linspace(0, 1, 21)]
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_ease_in_out_slows_near_keyframes():
    pos = path_positions([8], ["ease-in-out"])
    steps = np.diff(pos)
    assert steps[0] < steps[3] and steps[-1] < steps[3]


def test_three_keyframe_loop_frame_count_and_no_duplicate_joins(tmp_path):
    path = tmp_path / "walk.yaml"
    path.write_text(WALK_YAML)
    walk = load_walk(str(path))
    assert walk.loop and len(walk.keyframes) == 3
    pos = walk.positions()
    assert len(walk) == 4 + 3 + 2  # a loop has no final frame: it would repeat frame 0
    assert len(np.unique(pos)) == len(pos)
    assert pos[0] == 0 and pos[4] == 1 and pos[7] == 2 and pos[-1] < 3
    assert walk.keyframes[1].prompt == (("a rabbit", 0.5), ("a frog", 0.5))


def test_walk_without_loop_ends_on_the_last_keyframe():
    walk = parse_walk({"keyframes": [{"prompt": "a", "frames": 3}, {"prompt": "b", "frames": 5}, {"prompt": "c"}]})
    assert len(walk) == 3 + 5 + 1
    assert walk.positions()[-1] == 2.0
    assert [k.seed for k in walk.keyframes] == [42, 43, 44]  # default seeds: 42 + index


@pytest.mark.parametrize(
    "data, match",
    [
        ({"keyframes": [{"seed": 1}, {"prompt": "b"}]}, r"keyframes\[0\] has no prompt\. Received: prompt=None"),
        ({"keyframes": [{"prompt": "a", "frames": 0}, {"prompt": "b"}]}, r"keyframes\[0\]\.frames must be a whole number >= 1\. Received: frames=0"),
        ({"keyframes": [{"prompt": "a", "frames": -2}, {"prompt": "b"}]}, r"keyframes\[0\]\.frames must be a whole number >= 1\. Received: frames=-2"),
        ({"keyframes": [{"prompt": "a", "easing": "bouncy"}, {"prompt": "b"}]}, r"keyframes\[0\]\.easing must be one of .*Received: keyframes\[0\]\.easing='bouncy'"),
        ({"keyframes": [{"prompt": {"a": 1, "b": -1}}, {"prompt": "b"}]}, r"keyframes\[0\]\.prompt weights must not sum to zero"),
        ({"keyframes": [{"prompt": "a", "seed": -1}, {"prompt": "b"}]}, r"keyframes\[0\]\.seed must be an integer in \[0, 2\*\*63\)\. Received: keyframes\[0\]\.seed=-1"),
        ({"keyframes": [{"prompt": "a"}]}, r"a walk needs at least 2 keyframes \(1 with loop\)\. Received: 1 keyframes"),
        ({"keyframes": [{"prompt": "a", "colour": "red"}, {"prompt": "b"}]}, r"keyframes\[0\] has unknown field\(s\): colour"),
        ({"frames": 3}, r"unknown walk-file field\(s\): frames"),
        ([1, 2], r"a walk file must hold a mapping with 'keyframes'\. Received: list"),
    ],
)
def test_bad_walk_files(data, match):
    with pytest.raises(SdanimError, match=match):
        parse_walk(data)


def test_walk_file_formats(tmp_path):
    (tmp_path / "w.json").write_text(json.dumps({"keyframes": [{"prompt": "a"}, {"prompt": "b"}]}))
    assert len(load_walk(str(tmp_path / "w.json"))) == 25
    (tmp_path / "bad.yaml").write_text("keyframes: [unclosed")
    with pytest.raises(SdanimError, match=r"the walk file is not valid YAML .*Received: file="):
        load_walk(str(tmp_path / "bad.yaml"))
    with pytest.raises(SdanimError, match=r"walk file must be \.yaml, \.yml or \.json\. Received: file='w\.txt'"):
        load_walk("w.txt")
    with pytest.raises(SdanimError, match=r"cannot read the walk file"):
        load_walk(str(tmp_path / "missing.yaml"))


def test_yaml_walk_file_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.yaml").write_text(
        f"!!python/object/apply:os.system ['touch {marker}']\n"
    )
    with pytest.raises(SdanimError, match="not valid YAML"):
        load_walk(str(tmp_path / "evil.yaml"))
    assert not marker.exists()


def test_prompt_mix_is_the_weighted_mean():
    table = {"a": np.full((77, 4), 1.0), "b": np.full((77, 4), 3.0)}
    embed = lambda texts: np.stack([table[t] for t in texts])  # noqa: E731
    mixed = mix_embeddings((("a", 3.0), ("b", 1.0)), embed)
    np.testing.assert_allclose(mixed, 1.5)
    np.testing.assert_allclose(mix_embeddings("b", embed), 3.0)


def test_gini_and_report():
    assert gini([1, 1, 1, 1]) == 0.0
    assert gini([0, 0, 0, 4]) == pytest.approx(0.75)
    frames = [np.full((4, 4, 3), v, np.uint8) for v in (0, 10, 20, 30)]
    report = smoothness_report(frames)
    assert report["one_minus_gini"] == pytest.approx(1.0) and report["variance"] == pytest.approx(0.0)
    uneven = smoothness_report([np.full((4, 4, 3), v, np.uint8) for v in (0, 1, 2, 60)])
    assert uneven["one_minus_gini"] < 0.5 and uneven["variance"] > 0


def test_animate_loop_walk_with_tiny_model(tiny, tmp_path):
    walk = Walk((make_keyframe(0, "a red cube", 1, 3), make_keyframe(1, {"a cat": 1, "a dog": 1}, 2, 2)), loop=True)
    result = sdanim.animate(walk, out=str(tmp_path / "w.gif"), export=sdanim.ExportSettings(fps=5), settings=S, model=tiny, progress=False)
    assert result.frames.shape[0] == 5
    assert len(result.smoothness["distances"]) == 5  # includes the wrap-around step back to frame 0
    manifest = json.load(open(os.path.join(result.frames_dir, "manifest.json")))
    assert manifest["walk"]["loop"] is True and manifest["walk"]["keyframes"][1]["prompt"] == [["a cat", 1.0], ["a dog", 1.0]]


def test_cli_walk_bad_file_is_one_line(capsys, tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text("keyframes:\n  - {prompt: a, frames: 0}\n  - {prompt: b}\n")
    assert main(["walk", str(path), "--size", "64x64"]) == 2
    err = capsys.readouterr().err
    assert err == "sdanim: error: keyframes[0].frames must be a whole number >= 1. Received: frames=0\n"


def test_cli_morph_rejects_unknown_easing(capsys):
    assert main(["morph", "a", "b", "--easing", "wobble"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdanim: error: argument --easing: invalid choice: 'wobble'") and err.count("\n") == 1
    assert err.endswith("(see 'python -m sdanim morph --help')\n")


def test_circle_noise_has_unit_variance_and_closes():
    from sdanim.core.keyframes import circle_walk
    from sdanim.core.noise import seeded_noise
    from sdanim.core.plan import FramePlan

    walk = circle_walk("a lighthouse", 5, 12)
    seeds = walk.noise_seeds()
    assert seeds == (5, 6)
    basis = np.stack([seeded_noise(s, (32, 32, 4)) for s in seeds])
    plan = FramePlan(np.zeros((2, 77, 4), np.float32), basis, seeds, walk.positions(), noise_mode="circle")
    assert len(plan) == 12
    noises = [plan.frame(i).noise for i in range(12)]
    for n in noises:
        assert abs(n.std() - 1.0) < 0.05
    steps = [np.linalg.norm(noises[i + 1] - noises[i]) for i in range(11)]
    wrap = np.linalg.norm(noises[0] - noises[-1])
    assert abs(wrap - np.mean(steps)) < 0.05 * np.mean(steps)  # the last frame sits next to the first
    np.testing.assert_array_equal(noises[0], basis[0])


def test_circle_walk_render_first_and_last_frames_are_adjacent(tiny, tmp_path):
    from sdanim.core.keyframes import circle_walk

    result = sdanim.animate(circle_walk("a red cube", 3, 8), out=str(tmp_path / "c.gif"), export=sdanim.ExportSettings(fps=8), settings=S, model=tiny, progress=False)
    d = np.array(result.smoothness["distances"])  # 8 steps, the last one wraps back to frame 0
    assert len(d) == 8 and d.max() > 0
    assert d[-1] <= 2 * np.median(d[:-1])
    far = np.abs(result.frames[0].astype(int) - result.frames[4].astype(int)).mean()
    assert far > np.abs(result.frames[0].astype(int) - result.frames[7].astype(int)).mean()


def test_circle_needs_loop_and_frames():
    from sdanim.core.keyframes import circle_walk

    with pytest.raises(SdanimError, match=r"a circle noise walk must loop\. Received: loop=False"):
        Walk((make_keyframe(0, "a", 1), make_keyframe(1, "b", 2)), loop=False, noise="circle")
    with pytest.raises(SdanimError, match=r"frames must be at least 2\. Received: frames=1"):
        circle_walk("a", 1, 1)


def test_uniform_positions_even_out_a_known_distance_curve():
    from sdanim.core.spacing import uniform_positions

    # The picture changes 9x faster in the first half of the transition than in the second.
    speed = lambda u: 9.0 if u < 0.5 else 1.0  # noqa: E731
    pos = path_positions([10])
    dist = [speed(a) * (b - a) for a, b in zip(pos, pos[1:])]
    new = uniform_positions(pos, dist, [10], ["linear"])
    assert new[0] == 0.0 and new[-1] == 1.0 and len(new) == 11
    true = lambda a, b: 9 * (min(b, 0.5) - min(a, 0.5)) + (max(b, 0.5) - max(a, 0.5))  # noqa: E731
    steps = [true(a, b) for a, b in zip(new, new[1:])]
    np.testing.assert_allclose(steps, 0.5, rtol=1e-6)  # total 5.0 over 10 equal steps


def test_uniform_positions_keep_keyframes_and_handle_no_motion():
    from sdanim.core.spacing import uniform_positions

    pos = path_positions([3, 4])
    new = uniform_positions(pos, [0.0] * 7, [3, 4], ["linear", "linear"])
    np.testing.assert_allclose(new, pos)
    new = uniform_positions(pos, [1, 2, 3, 1, 1, 1, 5], [3, 4], ["linear", "ease-in-out"])
    assert new[0] == 0 and new[3] == 1 and new[-1] == 2
    assert np.all(np.diff(new) > 0)


def test_uniform_spacing_evens_out_the_tiny_morph(tiny, tmp_path, monkeypatch):
    """Uniform spacing lowers the spread of consecutive-frame distances (both printed),
    with the default preview: a quarter of the render's steps."""
    from sdanim.render import jobs as run

    steps_used = []
    renderer = run.make_renderer
    monkeypatch.setattr(run, "make_renderer", lambda model, settings, *a, **k: (
        steps_used.append(settings.num_steps), renderer(model, settings, *a, **k))[1])
    s = RenderSettings(height=64, width=64, num_steps=12, batch_size=4, guidance_scale=7.5)
    prompts = ["a red cube on a table", "a blue sphere in the sky"]
    lin = sdanim.morph(prompts, out=str(tmp_path / "lin.gif"), frames=9, settings=s, model=tiny, progress=False)
    assert steps_used == [12]
    uni = sdanim.morph(prompts, out=str(tmp_path / "uni.gif"), frames=9, settings=s, model=tiny, progress=False,
                       spacing="uniform")
    assert steps_used == [12, 3, 12]  # the preview ran at 12 / 4 steps, the frames at 12
    print(f"linear: 1-Gini {lin.smoothness['one_minus_gini']:.3f} var {lin.smoothness['variance']:.3e}; "
          f"uniform: 1-Gini {uni.smoothness['one_minus_gini']:.3f} var {uni.smoothness['variance']:.3e}")
    assert uni.smoothness["variance"] < lin.smoothness["variance"]
    assert uni.smoothness["one_minus_gini"] > lin.smoothness["one_minus_gini"]
    np.testing.assert_array_equal(uni.frames[0], lin.frames[0])  # keyframes stay put
    np.testing.assert_array_equal(uni.frames[-1], lin.frames[-1])
    manifest = json.load(open(os.path.join(uni.frames_dir, "manifest.json")))
    assert manifest["timing"] == {"spacing": "uniform", "preview_steps": 3, "audio": None}
    explicit = sdanim.morph(prompts, out=str(tmp_path / "explicit.gif"), frames=9, settings=s, model=tiny,
                            progress=False, spacing="uniform", preview_steps=5)
    assert steps_used[-2:] == [5, 12] and explicit.frames.shape == uni.frames.shape
    assert len(manifest["positions"]) == 9


def test_uniform_spacing_resume_reuses_positions(tiny, tmp_path, monkeypatch):
    from sdanim.tasks import walks as api

    s = RenderSettings(height=64, width=64, num_steps=2, batch_size=4)
    first = sdanim.morph(["a", "b"], out=str(tmp_path / "u.gif"), frames=6, settings=s, model=tiny, progress=False, spacing="uniform")
    os.remove(os.path.join(first.frames_dir, "frame_00003.png"))
    monkeypatch.setattr(api, "_uniform_spacing", lambda *a, **k: pytest.fail("preview ran again"))
    again = sdanim.morph(["a", "b"], out=str(tmp_path / "u.gif"), frames=6, settings=s, model=tiny, progress=False, spacing="uniform")
    assert again.rendered == 1
    assert np.abs(again.frames.astype(int) - first.frames.astype(int)).max() <= 1


def test_bad_spacing(tiny, tmp_path):
    from sdanim.core.keyframes import circle_walk

    with pytest.raises(SdanimError, match=r"spacing must be one of linear, uniform, beta\. Received: spacing='wavy'"):
        sdanim.morph(["a", "b"], out=str(tmp_path / "x.gif"), settings=S, model=tiny, spacing="wavy")
    with pytest.raises(SdanimError, match=r"circle noise walk has none\. Received: noise='circle'"):
        sdanim.animate(circle_walk("a", 1, 4), out=str(tmp_path / "c.gif"), settings=S, model=tiny, spacing="uniform")


def test_cli_walk_and_circle_succeed(tiny, tmp_path, monkeypatch, capsys):
    from sdanim.frontends.cli import options as cli

    monkeypatch.setattr(cli, "model_for", lambda args, settings: tiny)
    path = tmp_path / "walk.yaml"
    path.write_text(WALK_YAML)
    common = ["--size", "64x64", "--steps", "2", "--quiet"]
    assert main(["walk", str(path), "--out", str(tmp_path / "w.mp4"), "--fps", "9", "--double", *common]) == 0
    out = capsys.readouterr().out
    assert "(9 frames at 9 fps; 9 rendered" in out and "smoothness: mean step" in out
    assert main(["circle", "a lighthouse", "--frames", "6", "--out", str(tmp_path / "c.gif"), *common]) == 0
    assert "(6 frames at 12 fps" in capsys.readouterr().out


def _negative_walk(negatives, frames=3):
    return Walk(tuple(make_keyframe(i, p, s, frames, negative=n)
                      for i, (p, s, n) in enumerate(zip(["a red cube", "a blue sphere", "a green cone"], [1, 2, 3],
                                                        negatives))))


def test_per_keyframe_negative_prompts_travel_with_the_walk(tiny, tmp_path):
    """Each keyframe's negative prompt: a keyframe's frame is `generate` with that negative
    prompt; keyframes that all name the run's negative prompt are that run; a change to one
    keyframe's negative changes its transitions only; the batch size changes nothing."""
    def frames(walk, name, negative_prompt=None, settings=S):
        return sdanim.animate(walk, out=str(tmp_path / f"{name}.gif"), settings=settings, model=tiny,
                              negative_prompt=negative_prompt, progress=False).frames.astype(int)

    negatives = ["blurry", "a dark room", None]
    walk = _negative_walk(negatives)
    base = frames(walk, "base", negative_prompt="text")
    assert base.shape[0] == 7  # frames 0, 3, 6 sit on the keyframes
    for k, frame in ((0, 0), (1, 3), (2, 6)):
        alone = sdanim.generate(walk.keyframes[k].prompt, seed=walk.keyframes[k].seed, settings=S, model=tiny,
                                negative_prompt=negatives[k] or "text", progress=False).images[0].astype(int)
        assert np.abs(base[frame] - alone).max() <= 1, k  # the last keyframe takes the run's negative prompt
    same = frames(_negative_walk(["text"] * 3), "same")
    assert np.abs(same - frames(_negative_walk([None] * 3), "run", negative_prompt="text")).max() <= 1
    changed = frames(_negative_walk(["blurry", "a dark room", "snow"]), "changed", negative_prompt="text")
    assert np.abs(changed[:4] - base[:4]).max() <= 1  # frames up to keyframe 1 do not see keyframe 2's negative
    assert np.abs(changed[4:] - base[4:]).max() > 2  # the last transition does (beyond rounding: the tiny encoder saturates)
    assert np.abs(base - same).max() > 2  # the keyframes' own negatives were used, not the run's
    import dataclasses

    one = frames(walk, "one", negative_prompt="text", settings=dataclasses.replace(S, batch_size=1))
    assert np.abs(one - base).max() <= 1


def test_a_walk_files_negative_prompts_are_read_recorded_and_checked(tmp_path):
    walk = parse_walk({"keyframes": [{"prompt": "a", "negative": "blurry"}, {"prompt": "b", "negative": {"x": 1, "y": 1}},
                                     {"prompt": "c"}]})
    assert [k.negative for k in walk.keyframes] == ["blurry", (("x", 1.0), ("y", 1.0)), None]
    record = walk.record()["keyframes"]
    assert record[0]["negative"] == "blurry" and record[1]["negative"] == [["x", 1.0], ["y", 1.0]]
    assert "negative" not in record[2]  # only when set: walks without one keep their records (and resume)
    with pytest.raises(SdanimError, match=r"keyframes\[1\]\.negative must be a string or a mapping.*Received: "
                                          r"keyframes\[1\]\.negative=5"):
        parse_walk({"keyframes": [{"prompt": "a"}, {"prompt": "b", "negative": 5}]})
    path = tmp_path / "w.yaml"
    path.write_text("keyframes:\n  - {prompt: a, negative: 7}\n  - {prompt: b}\n")
    assert main(["walk", str(path), "--size", "64x64"]) == 2


def test_a_motion_clip_takes_each_frames_negative_from_the_walk(tiny):
    """Motion modules denoise a window's frames together: each row of the negative clip is
    its frame's own negative embedding (the keyframes' interpolated), as for still frames."""
    from sdanim.render.jobs import FrameJob, make_renderer
    from sdanim.render.motion import clip_for

    walk = _negative_walk(["blurry", "a dark room", None])
    job = FrameJob(walk, S, "text")
    plan = job.plan(tiny)
    clip = clip_for(tiny, job, sdanim.MotionSpec("random", context=4, stride=2), make_renderer(tiny, S, "text"), plan)
    expected = np.stack([plan.frame(i).negative for i in range(len(job))])
    np.testing.assert_array_equal(clip.negatives, expected)
    assert np.abs(clip.negatives[0] - clip.negatives[6]).max() > 1e-3  # "blurry" and the run's "text" differ
    plain = clip_for(tiny, FrameJob(_negative_walk([None] * 3), S, "text"), sdanim.MotionSpec("random", context=4, stride=2),
                     make_renderer(tiny, S, "text"))
    np.testing.assert_allclose(plain.negatives, np.repeat(expected[6:], 7, axis=0), atol=1e-6)


def test_negatives_of_the_wrong_shape_are_one_line(tiny):
    """A plan's negatives must match its embeddings; a renderer's, its contexts."""
    from sdanim.core.plan import FramePlan
    from sdanim.render.sampling import Renderer

    embeddings = np.zeros((2, 77, 8), np.float32)
    with pytest.raises(SdanimError, match=r"one negative embedding per keyframe.*Received: negatives of shape "
                                          r"\(1, 77, 8\) for embeddings of shape \(2, 77, 8\)"):
        FramePlan(embeddings, np.zeros((2, 8, 8, 4), np.float32), (1, 2), np.array([0.0, 1.0]),
                  negatives=np.zeros((1, 77, 8), np.float32))
    uncond = np.zeros(tiny.diffusion_model.inputs[2].shape[1:], np.float32)
    renderer = Renderer(tiny.diffusion_model, tiny.decoder, S, uncond)
    contexts = np.zeros((2, *uncond.shape), np.float32)
    with pytest.raises(SdanimError, match=r"negatives must be one negative context per row.*Received: negatives of "
                                          r"shape \(1, "):
        renderer.render(contexts, np.zeros((2, 8, 8, 4), np.float32), [0, 1], negatives=contexts[:1])
