"""morph and generate on tiny models: files on disk, resume, run-folder safety."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import sdanim
from sdanim.config.errors import SdanimError
from sdanim.config.settings import RenderSettings

S = RenderSettings(height=64, width=64, num_steps=2, batch_size=3)


def _morph(tiny, out, fps=5, sheet=False, **kw):
    args = dict(frames=7, seed=3, settings=S, model=tiny, progress=False,
                export=sdanim.ExportSettings(fps=fps, sheet=sheet))
    args.update(kw)
    return sdanim.morph(["a red cube", "a blue sphere", "a green cone"], out=str(out), **args)


def test_morph_writes_gif_frames_manifest(tiny, tmp_path):
    result = _morph(tiny, tmp_path / "m.gif", sheet=True)
    assert result.frames.shape == (7, 64, 64, 3)
    with Image.open(result.out) as im:
        assert im.n_frames == 7 and im.info["duration"] == 200
    pngs = sorted(f for f in os.listdir(result.frames_dir) if f.endswith(".png"))
    assert pngs == [f"frame_{i:05d}.png" for i in range(7)]
    with Image.open(os.path.join(result.frames_dir, pngs[3])) as im:
        meta = json.loads(im.text["sdanim"])
        assert meta["frame"] == 3 and meta["walk"]["keyframes"][1]["prompt"] == "a blue sphere"
    manifest = json.load(open(os.path.join(result.frames_dir, "manifest.json")))
    assert [k["seed"] for k in manifest["walk"]["keyframes"]] == [3, 3, 3]
    assert manifest["render"]["num_steps"] == 2
    assert len(manifest["smoothness"]["distances"]) == 6
    assert os.path.isfile(result.sheet)
    # Keyframe images differ: the prompts matter.
    assert np.abs(result.frames[0].astype(int) - result.frames[6].astype(int)).max() > 5


def test_morph_frames_on_disk_equal_the_returned_frames(tiny, tmp_path):
    result = _morph(tiny, tmp_path / "m.gif")
    for i in range(7):
        with Image.open(os.path.join(result.frames_dir, f"frame_{i:05d}.png")) as im:
            np.testing.assert_array_equal(np.asarray(im), result.frames[i])


def test_morph_resumes_only_missing_frames(tiny, tmp_path):
    first = _morph(tiny, tmp_path / "m.gif")
    os.remove(os.path.join(first.frames_dir, "frame_00002.png"))
    os.remove(os.path.join(first.frames_dir, "frame_00005.png"))
    second = _morph(tiny, tmp_path / "m.gif", settings=RenderSettings(height=64, width=64, num_steps=2, batch_size=1))
    assert second.rendered == 2
    assert np.abs(first.frames.astype(int) - second.frames.astype(int)).max() <= 1


def test_morph_refuses_a_folder_of_another_run(tiny, tmp_path):
    _morph(tiny, tmp_path / "m.gif")
    with pytest.raises(SdanimError, match=r"belongs to another run \(walk\.keyframes\[0\]\.seed: 3 on disk, 4 now; "):
        _morph(tiny, tmp_path / "m.gif", seed=4)
    result = _morph(tiny, tmp_path / "m.gif", seed=4, overwrite=True)
    assert result.rendered == 7


def test_morph_mp4(tiny, tmp_path):
    import imageio.v2 as imageio

    result = _morph(tiny, tmp_path / "m.mp4", fps=6)
    reader = imageio.get_reader(result.out, format="FFMPEG")
    assert abs(reader.get_meta_data()["fps"] - 6) < 1e-6
    assert sum(1 for _ in reader) == 7
    reader.close()


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"frames": 1}, r"frames must be at least 2\. Received: frames=1"),
        ({"frames": 2}, r"frames must be at least 3 to show all 3 prompts\. Received: frames=2"),
        ({"fps": 0}, r"fps must be > 0\. Received: fps=0"),
        ({"out": "x.avi"}, r"out must end in \.gif, \.mp4, \.webm\. Received: out='x\.avi'"),
        ({"noise": "slerp", "seeds": [1, 2]}, r"seeds needs one seed per prompt \(3\)\. Received: seeds=\[1, 2\]"),
        ({"seed": -5}, r"seed must be an integer in \[0, 2\*\*63\)\. Received: seed=-5"),
    ],
)
def test_morph_bad_input(tiny, tmp_path, kw, match):
    kw.setdefault("out", str(tmp_path / "m.gif"))
    out = kw.pop("out")
    with pytest.raises(SdanimError, match=match):
        _morph(tiny, out, **kw)
    assert not os.path.exists(tmp_path / "m_frames")


def test_morph_model_size_must_match(tiny, tmp_path):
    with pytest.raises(SdanimError, match=r"model was built for 64x64.*Received: size=128x64"):
        _morph(tiny, tmp_path / "m.gif", settings=RenderSettings(height=64, width=128))


def test_generate_image_k_is_seed_plus_k_alone(tiny, tmp_path):
    s = RenderSettings(height=64, width=64, num_steps=2, batch_size=2, scheduler="euler_a")
    many = sdanim.generate("a cat", num_images=3, seed=10, settings=s, model=tiny, out_dir=str(tmp_path), progress=False)
    alone = sdanim.generate("a cat", num_images=1, seed=12, settings=s, model=tiny, out_dir=None, progress=False)
    assert many.seeds == [10, 11, 12]
    assert np.abs(many.images[2].astype(int) - alone.images[0].astype(int)).max() <= 1
    assert [os.path.basename(p) for p in many.paths] == [f"a-cat-seed{s}.png" for s in (10, 11, 12)]
    assert not np.array_equal(many.images[0], many.images[1])


def test_negative_prompt_changes_the_image(tiny):
    a = sdanim.generate("a cat", num_images=1, seed=1, settings=S, model=tiny, out_dir=None, progress=False)
    b = sdanim.generate("a cat", num_images=1, seed=1, settings=S, model=tiny, out_dir=None, negative_prompt="blurry", progress=False)
    assert np.abs(a.images[0].astype(int) - b.images[0].astype(int)).max() > 2


def test_prompts_are_encoded_once(tiny):
    from sdanim.model.stable_diffusion import prompt_encoder

    calls = []
    real = tiny.text_encoder

    def counting(inputs, training=False):
        calls.append(len(inputs[0]))
        return real(inputs, training=training)

    tiny.text_encoder = counting
    encoder = prompt_encoder(tiny)
    encoder.encode(["a", "b", "a"])
    encoder.encode(["b", "c"])
    assert calls == [2, 1]
