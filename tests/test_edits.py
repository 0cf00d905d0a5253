"""Image-to-image, inpainting, outpainting, image morphs, mixes, grids and step views on
the tiny stand-in model: what each promises, and its bad input."""

import dataclasses
import os

import numpy as np
import pytest
from PIL import Image

import sdanim
from sdanim.frontends.cli import main
from sdanim.config.errors import SdanimError
from sdanim.config.choices import FLOW_SCHEDULERS, SCHEDULERS

NOISE_SCHEDULERS = [s for s in SCHEDULERS if s not in FLOW_SCHEDULERS]  # SD 1.x/2.x's (SD3's: test_sd3.py)
from sdanim.config.settings import RenderSettings

S = RenderSettings(height=64, width=64, num_steps=4, batch_size=2)


def _image(seed=0, h=64, w=64):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def _mask(h=64, w=64):
    mask = np.zeros((h, w), np.uint8)
    mask[16:40, 20:52] = 255
    return mask


def _read(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _frames(path):
    with Image.open(path) as im:
        return im.n_frames


def _max_diff(a, b):
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def _count_unet_calls(monkeypatch):
    """Counts UNet passes. Renderers run the step-at-a-time loop here, whose passes
    Python sees (the compiled program runs the same steps: tests/test_sampling.py
    checks that both loops give the same frames, image-to-image's included)."""
    from sdanim.render.sampling import Renderer

    calls = []
    original_eps, original_render = Renderer._step_eps, Renderer.render

    def counting(self, *args):
        eps = original_eps(self, *args)

        def count(*inputs):
            calls.append(1)
            return eps(*inputs)

        return count

    def stepwise(self, *args, **kwargs):
        self.loop = "steps"
        return original_render(self, *args, **kwargs)

    monkeypatch.setattr(Renderer, "_step_eps", counting)
    monkeypatch.setattr(Renderer, "render", stepwise)
    return calls


# Image-to-image ---------------------------------------------------------------------


def test_img2img_strength_0_returns_the_image_without_a_model(tmp_path):
    image = _image(h=80, w=100)
    result = sdanim.img2img(image, "a cat", strength=0, seed=1, settings=S, out_dir=str(tmp_path),
                            model=sdanim.ModelSpec(weights=str(tmp_path / "no-weights-here")), progress=False)
    # fit="crop": centre 80x80 of the 80x100 image, resized to 64x64
    expected = np.asarray(Image.fromarray(image[:, 10:90]).resize((64, 64), Image.LANCZOS))
    assert np.array_equal(result.images[0], expected)
    assert os.path.basename(result.paths[0]) == "img2img-a-cat-seed1.png"


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
def test_img2img_strength_1_is_text_to_image(tiny, scheduler):
    settings = RenderSettings(height=64, width=64, num_steps=4, batch_size=2, scheduler=scheduler)
    ours = sdanim.img2img(_image(), "a cat", strength=1, num_images=2, seed=5, settings=settings, model=tiny, out_dir=None, progress=False)
    reference = sdanim.generate("a cat", num_images=2, seed=5, settings=settings, model=tiny, out_dir=None, progress=False)
    assert np.array_equal(ours.images, reference.images)


@pytest.mark.parametrize("scheduler", NOISE_SCHEDULERS)
def test_img2img_runs_the_tail_of_every_schedule(tiny, monkeypatch, scheduler):
    settings = RenderSettings(height=64, width=64, num_steps=10, batch_size=1, scheduler=scheduler)
    calls = _count_unet_calls(monkeypatch)
    a = sdanim.img2img(_image(0), "a cat", strength=0.3, seed=2, settings=settings, model=tiny, out_dir=None, progress=False)
    assert len(calls) == 3  # round(0.3 * 10) steps, not 10
    b = sdanim.img2img(_image(1), "a cat", strength=0.3, seed=2, settings=settings, model=tiny, out_dir=None, progress=False)
    again = sdanim.img2img(_image(0), "a cat", strength=0.3, seed=2, settings=settings, model=tiny, out_dir=None, progress=False)
    assert _max_diff(a.images[0], b.images[0]) > 0  # the input image matters
    assert np.array_equal(a.images, again.images)  # and the result is deterministic


def test_img2img_batch_invariant(tiny):
    one = sdanim.img2img(_image(), "a cat", strength=0.5, num_images=3, seed=7, settings=RenderSettings(height=64, width=64, num_steps=4, batch_size=1), model=tiny, out_dir=None, progress=False)
    three = sdanim.img2img(_image(), "a cat", strength=0.5, num_images=3, seed=7, settings=RenderSettings(height=64, width=64, num_steps=4, batch_size=3), model=tiny, out_dir=None, progress=False)
    assert _max_diff(one.images, three.images) <= 1


def test_img2img_fit_resize_and_bad_input(tiny, tmp_path):
    image = _image(h=32, w=128)
    r = sdanim.img2img(image, "x", strength=0, fit="resize", settings=S, out_dir=None)
    assert np.array_equal(r.images[0], np.asarray(Image.fromarray(image).resize((64, 64), Image.LANCZOS)))
    with pytest.raises(SdanimError, match=r"strength must be in \[0, 1\].*Received: strength=1.5"):
        sdanim.img2img(image, "x", strength=1.5, settings=S, model=tiny, out_dir=None)
    with pytest.raises(SdanimError, match=r"fit must be one of crop, resize\. Received: fit='squash'"):
        sdanim.img2img(image, "x", strength=0, fit="squash", settings=S, out_dir=None)
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not a PNG")
    with pytest.raises(SdanimError, match=r"image is not a readable image .*Received: image='.*notes.png'"):
        sdanim.img2img(str(not_image), "x", strength=0.5, settings=S, model=tiny, out_dir=None)
    with pytest.raises(SdanimError, match=r"image is not a file\. Received: image='.*missing.png'"):
        sdanim.img2img(str(tmp_path / "missing.png"), "x", settings=S, model=tiny, out_dir=None)


# Inpainting -------------------------------------------------------------------------


def test_renderer_keeps_the_unmasked_latent_exactly(tiny):
    """The sampler-level invariant: after the last step, the latent outside the mask
    is the image's latent itself, for every scheduler."""
    from sdanim.render.jobs import make_renderer as _renderer
    from sdanim.render.jobs import encode_images
    from sdanim.core.pixels import latent_mask
    from tiny import random_inputs

    latent = encode_images(tiny, _image()[None])  # (1, 8, 8, 4)
    mask = latent_mask(_mask() >= 128)[None]  # (1, 8, 8, 1)
    contexts, noises = random_inputs(1, 64, 64)
    for scheduler in NOISE_SCHEDULERS:
        settings = RenderSettings(height=64, width=64, num_steps=4, scheduler=scheduler)
        out = np.asarray(_renderer(tiny, settings, None).sample_latents(contexts, noises, [1], latent, mask))
        keep = mask[..., 0] == 0
        assert np.array_equal(out[keep], latent[keep]), scheduler
        assert np.abs(out[~keep] - latent[~keep]).max() > 1e-3, scheduler


def test_inpaint_keeps_every_pixel_outside_the_mask(tiny, tmp_path):
    image = _image()
    Image.fromarray(image).save(tmp_path / "in.png")
    Image.fromarray(_mask()).save(tmp_path / "mask.png")
    r = sdanim.inpaint(str(tmp_path / "in.png"), str(tmp_path / "mask.png"), "a dog", num_images=2, seed=3,
                       feather=6, settings=S, model=tiny, out_dir=str(tmp_path), progress=False)
    outside = _mask() < 128
    for out in r.images:
        assert np.array_equal(out[outside], image[outside])
        assert _max_diff(out[~outside], image[~outside]) > 50  # the masked region was repainted
    assert [os.path.basename(p) for p in r.paths] == ["inpaint-a-dog-seed3.png", "inpaint-a-dog-seed4.png"]
    assert np.array_equal(_read(r.paths[0]), r.images[0])


def test_inpaint_bad_masks(tiny):
    image = _image()
    with pytest.raises(SdanimError, match=r"mask must have the image's size 64x64\. Received: mask of size 32x64"):
        sdanim.inpaint(image, np.zeros((64, 32), np.uint8), "x", settings=S, model=tiny, out_dir=None)
    with pytest.raises(SdanimError, match=r"mask is all black: nothing to repaint"):
        sdanim.inpaint(image, np.zeros((64, 64), np.uint8), "x", settings=S, model=tiny, out_dir=None)
    with pytest.warns(UserWarning, match="mask is all white: the whole image is repainted"):
        sdanim.inpaint(image, np.full((64, 64), 255, np.uint8), "x", settings=S, model=tiny, out_dir=None, progress=False)
    with pytest.raises(SdanimError, match=r"inpaint strength must be above 0.*Received: strength=0"):
        sdanim.inpaint(image, _mask(), "x", strength=0, settings=S, model=tiny, out_dir=None)


def test_outpaint_extends_and_keeps_the_original(tiny):
    image = _image(h=64, w=40)
    r = sdanim.outpaint(image, "a beach", left=8, right=16, seed=1, model=tiny, out_dir=None, progress=False,
                        settings=RenderSettings(height=64, width=64, num_steps=3))
    assert r.images.shape == (1, 64, 64, 3)
    assert np.array_equal(r.images[0][:, 8:48], image)
    assert r.mask[:, :8].all() and r.mask[:, 48:].all() and not r.mask[:, 8:48].any()
    with pytest.raises(SdanimError, match=r"multiples of 64 pixels a side.*Received: 50x64 \(left=10"):
        sdanim.outpaint(image, "x", left=10, model=tiny, out_dir=None)
    with pytest.raises(SdanimError, match=r"at least one of left, right, top, bottom"):
        sdanim.outpaint(image, "x", model=tiny, out_dir=None)


# Image morphs, mixes, grids, steps ----------------------------------------------------


def test_image_morph_frames_are_pure_and_end_at_the_images(tiny, tmp_path):
    a, b = _image(0), _image(1)
    kw = dict(prompt="a photo", frames=5, seed=4, strength=0.5, model=tiny, progress=False)
    r = sdanim.image_morph(a, b, out=str(tmp_path / "m.gif"), settings=RenderSettings(height=64, width=64, num_steps=4, batch_size=4), **kw)
    r1 = sdanim.image_morph(a, b, out=str(tmp_path / "m1.gif"), settings=RenderSettings(height=64, width=64, num_steps=4, batch_size=1), **kw)
    assert r.frames.shape == (5, 64, 64, 3) and _max_diff(r.frames, r1.frames) <= 1
    with Image.open(r.out) as gif:
        assert gif.n_frames == 5
    assert sorted(os.listdir(r.frames_dir))[:5] == [f"frame_{i:05d}.png" for i in range(5)]
    ends = [sdanim.img2img(x, "a photo", strength=0.5, seed=4, settings=RenderSettings(height=64, width=64, num_steps=4),
                           model=tiny, out_dir=None, progress=False).images[0] for x in (a, b)]
    assert _max_diff(r.frames[0], ends[0]) <= 1 and _max_diff(r.frames[-1], ends[1]) <= 1
    assert _max_diff(r.frames[2], r.frames[0]) > 0 and _max_diff(r.frames[2], r.frames[-1]) > 0
    with pytest.raises(SdanimError, match=r"image morph strength must be above 0\. Received: strength=0"):
        sdanim.image_morph(a, b, out=str(tmp_path / "z.gif"), strength=0, settings=S, model=tiny)


def test_mix_is_the_weighted_mean_of_embeddings(tiny):
    from sdanim.render.jobs import embed_prompt

    mixed = embed_prompt(tiny, {"a rabbit": 3.0, "a frog": 1.0})
    expected = 0.75 * embed_prompt(tiny, "a rabbit") + 0.25 * embed_prompt(tiny, "a frog")
    np.testing.assert_allclose(mixed, expected, atol=1e-6)
    pure = sdanim.generate({"a rabbit": 1.0}, num_images=1, seed=2, settings=S, model=tiny, out_dir=None, progress=False)
    plain = sdanim.generate("a rabbit", num_images=1, seed=2, settings=S, model=tiny, out_dir=None, progress=False)
    assert np.array_equal(pure.images, plain.images)
    with pytest.raises(SdanimError, match=r"weights must not sum to zero\. Received: prompt=\{'a': 1.0, 'b': -1.0\}"):
        sdanim.generate({"a": 1.0, "b": -1.0}, settings=S, model=tiny, out_dir=None)


def test_prompt_mix_syntax():
    from sdanim.core.keyframes import parse_prompt_text

    assert parse_prompt_text("a rabbit") == "a rabbit"
    assert parse_prompt_text("a rabbit:0.5 | a frog:0.5") == (("a rabbit", 0.5), ("a frog", 0.5))
    assert parse_prompt_text("style: ukiyo-e | a clock:2") == (("style: ukiyo-e", 1.0), ("a clock", 2.0))
    with pytest.raises(SdanimError, match="empty part"):
        parse_prompt_text("a cat | ")


def test_grid_cells_are_the_generated_images(tiny, tmp_path):
    S = RenderSettings(height=64, width=64, num_steps=4, batch_size=2, scheduler="euler_a")
    g = sdanim.grid(["a cat", "a dog"], seeds=[1, 2], guidance_scales=[1.0, 7.5], settings=S, model=tiny,
                    out=str(tmp_path / "grid.png"), progress=False)
    assert g.cells.shape == (2, 4, 64, 64, 3)
    assert g.columns == [(1, 1.0, 4), (2, 1.0, 4), (1, 7.5, 4), (2, 7.5, 4)]
    dog = sdanim.generate("a dog", num_images=2, seed=1, settings=RenderSettings(height=64, width=64, num_steps=4, guidance_scale=7.5, scheduler="euler_a"),
                          model=tiny, out_dir=None, progress=False)
    assert _max_diff(g.cells[1, 2], dog.images[0]) <= 1 and _max_diff(g.cells[1, 3], dog.images[1]) <= 1
    saved = _read(g.path)
    assert saved.shape == g.image.shape and saved.shape[0] > 2 * 64 and saved.shape[1] > 4 * 64  # labels add room


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
def test_denoising_steps_end_at_the_image(tiny, tmp_path, scheduler):
    settings = RenderSettings(height=64, width=64, num_steps=4, scheduler=scheduler)
    st = sdanim.denoising_steps("a cat", seed=3, show=[1, 2, 4], settings=settings, model=tiny, out=str(tmp_path / "s.gif"), progress=False)
    # The step view samples and decodes one image at a time: equal to generate at batch 1,
    # and within the 1 level that float rounding allows across batch sizes at batch 4.
    one = dataclasses.replace(settings, batch_size=1)
    gen = sdanim.generate("a cat", num_images=1, seed=3, settings=one, model=tiny, out_dir=None, progress=False)
    gen4 = sdanim.generate("a cat", num_images=1, seed=3, settings=settings, model=tiny, out_dir=None, progress=False)
    assert st.steps == [1, 2, 4] and st.images.shape == (3, 64, 64, 3)
    assert np.array_equal(st.images[-1], gen.images[0])
    assert _max_diff(st.images[-1], gen4.images[0]) <= 1
    assert _max_diff(st.images[0], st.images[-1]) > 0
    assert os.path.isfile(st.strip) and _frames(st.gif) == 3
    default = sdanim.denoising_steps("a cat", seed=3, settings=RenderSettings(height=64, width=64, num_steps=20), model=tiny, out=None, progress=False)
    assert len(default.steps) == 8 and default.steps[0] == 1 and default.steps[-1] == 20
    with pytest.raises(SdanimError, match=r"show must list step numbers from 1 to 4.*Received: show=\[0, 5\]"):
        sdanim.denoising_steps("a cat", show=[0, 5], settings=S, model=tiny, out=None)


# Command line -----------------------------------------------------------------------


@pytest.fixture
def cli_tiny(monkeypatch):
    from sdanim.frontends.cli import options as cli
    from tiny import make_tiny_model

    monkeypatch.setattr(cli, "model_for", lambda args, settings: make_tiny_model(settings.height, settings.width))


def test_cli_edit_commands_succeed(cli_tiny, tmp_path, capsys):
    Image.fromarray(_image(h=64, w=64)).save(tmp_path / "a.png")
    Image.fromarray(_image(1, h=64, w=64)).save(tmp_path / "b.png")
    Image.fromarray(_mask()).save(tmp_path / "m.png")
    q = ["--steps", "2", "--quiet"]
    out = str(tmp_path / "out")
    assert main(["img2img", str(tmp_path / "a.png"), "a carving", "--seed", "1", "--out", out, *q]) == 0
    assert main(["inpaint", str(tmp_path / "a.png"), str(tmp_path / "m.png"), "a cat:1 | a dog:1", "--seed", "2", "--out", out, *q]) == 0
    assert main(["outpaint", str(tmp_path / "a.png"), "sea", "--top", "64", "--seed", "3", "--out", out, *q]) == 0
    assert main(["mix", "a rabbit", "0.5", "a frog", "0.5", "--seed", "4", "--size", "64x64", "--out", out, *q]) == 0
    assert main(["grid", "a cat", "a dog", "--seeds", "1,2", "--size", "64x64", "--out", str(tmp_path / "g.png"), *q]) == 0
    assert main(["steps", "a cat", "--show", "1,2", "--size", "64x64", "--out", str(tmp_path / "s.gif"), *q]) == 0
    assert main(["image-morph", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--frames", "3", "--out", str(tmp_path / "im.gif"), *q]) == 0
    printed = capsys.readouterr().out
    assert "seed 1: " in printed and "inpaint-a-cat-a-dog-seed2.png" in printed
    assert sorted(os.listdir(out)) == sorted([
        "img2img-a-carving-seed1.png", "inpaint-a-cat-a-dog-seed2.png", "outpaint-sea-seed3.png", "a-rabbit-a-frog-seed4.png",
    ])
    assert _read(os.path.join(out, "outpaint-sea-seed3.png")).shape == (128, 64, 3)
    assert "(2 rows x 2 columns)" in printed and "steps 1, 2" in printed and "(3 frames at 12 fps)" in printed


@pytest.mark.parametrize(
    "argv, match",
    [
        (["img2img", "{a}", "x", "--strength", "2"], "strength must be in [0, 1] (0 keeps the image, 1 ignores it). Received: strength=2.0"),
        (["img2img", "{missing}", "x"], "image is not a file. Received: image="),
        (["img2img", "{text}", "x"], "image is not a readable image"),
        (["inpaint", "{a}", "{small}", "x"], "mask must have the image's size 64x64. Received: mask of size 32x32"),
        (["inpaint", "{a}", "{black}", "x"], "mask is all black: nothing to repaint"),
        (["outpaint", "{a}", "x", "--left", "10"], "multiples of 64 pixels a side"),
        (["outpaint", "{a}", "x", "--left", "64", "--size", "64x64"], "outpaint's size is the image's plus the borders, 128x64; leave out --size. Received: size=64x64"),
        (["mix", "a rabbit", "0.5", "a frog"], "mix takes prompts each followed by a weight"),
        (["mix", "a rabbit", "1", "a frog", "-1"], "mix weights must not sum to zero"),
        (["grid", "a cat", "--guidances", "-1"], "guidance must be >= 0"),
        (["steps", "a cat", "--steps", "4", "--show", "9"], "show must list step numbers from 1 to 4"),
    ],
)
def test_cli_edit_bad_input_one_line_exit_2(capsys, tmp_path, argv, match):
    Image.fromarray(_image()).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "small.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "black.png")
    (tmp_path / "text.png").write_text("not an image")
    names = {k: str(tmp_path / f"{k}.png") for k in ("a", "small", "black", "text", "missing")}
    argv = [a.format(**names) for a in argv]
    assert main(argv + ["--weights", str(tmp_path / "no-weights"), "--out", str(tmp_path / "o.gif" if argv[0] == "steps" else tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdanim: error: ") and match in err, err
    assert err.count("\n") == 1  # in-process: a traceback would have been raised, not printed


def test_bad_output_folder_fails_before_rendering(tiny, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    calls = _count_unet_calls(monkeypatch)
    with pytest.raises(SdanimError, match=r"cannot create the output folder.*Received: out="):
        sdanim.img2img(_image(), "x", strength=0.5, settings=S, model=tiny, out_dir=str(blocker / "sub"))
    with pytest.raises(SdanimError, match=r"cannot create the output folder"):
        sdanim.inpaint(_image(), _mask(), "x", settings=S, model=tiny, out_dir=str(blocker / "sub"))
    assert calls == []
