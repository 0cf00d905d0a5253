"""LoRA files: parsing, the refusals, and the CLI's one-line errors (no model needed).

Fidelity against diffusers + PEFT (both formats, the LCM end to end) is in
tests/test_heavy_checkpoints.py; the wrong-architecture refusal on the real SD 1.4
layers in tests/test_heavy.py."""

import os

import numpy as np
import pytest

from sdanim.frontends.cli import main
from sdanim.formats.lora_files import Lora, LoraError, as_loras, parse_lora_arg, read_lora


def _save(path, tensors):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path))
    return str(path)


def _kohya(rank=4):
    rng = np.random.default_rng(0)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    return {key + ".lora_down.weight": rng.normal(size=(rank, 320)), key + ".lora_up.weight": rng.normal(size=(320, rank)),
            key + ".alpha": np.array(2.0)}


def test_parse_lora_arg():
    assert parse_lora_arg("style.safetensors") == Lora("style.safetensors", 1.0)
    assert parse_lora_arg("style.safetensors:0.6") == Lora("style.safetensors", 0.6)
    assert parse_lora_arg("/a/b/lcm.safetensors:-1") == Lora("/a/b/lcm.safetensors", -1.0)
    assert parse_lora_arg(r"C:\loras\x.safetensors") == Lora(r"C:\loras\x.safetensors", 1.0)  # a drive, not a scale
    with pytest.raises(LoraError, match=r"lora must be FILE or FILE:SCALE with a number for SCALE\. Received: lora='x\.safetensors:abc'"):
        parse_lora_arg("x.safetensors:abc")
    with pytest.raises(LoraError, match=r"a LoRA scale \(of x\.safetensors\) must be a finite number\. Received: scale=nan"):
        Lora("x.safetensors", float("nan"))
    with pytest.raises(LoraError, match=r"loras must be files, 'FILE:SCALE' strings or \(file, scale\) pairs\. Received: 3"):
        as_loras([3])
    assert as_loras([("a.safetensors", 0.5), "b.safetensors:2", Lora("c.safetensors")]) == (
        Lora("a.safetensors", 0.5), Lora("b.safetensors", 2.0), Lora("c.safetensors", 1.0))


def test_read_kohya_and_peft_files(tmp_path):
    kohya = read_lora(_save(tmp_path / "k.safetensors", _kohya()))
    assert kohya.format == "kohya" and kohya.unknown == []
    (module,) = kohya.modules.values()
    assert module.rank == 4
    down, up = module.down.load(), module.up.load()
    np.testing.assert_allclose(module.delta(), 0.5 * up @ down, rtol=1e-6)  # alpha 2 / rank 4
    peft = read_lora(_save(tmp_path / "p.safetensors", {
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": np.ones((2, 768)),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": np.ones((1280, 2)),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 768)),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": np.ones((768, 2)),
    }))
    assert peft.format == "diffusers"
    assert sorted(peft.modules) == ["text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
                                    "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"]
    np.testing.assert_allclose(peft.modules[sorted(peft.modules)[0]].delta(), np.full((768, 768), 2.0))  # no alpha: scale 1


def test_bad_lora_files(tmp_path):
    with pytest.raises(LoraError, match=r"the LoRA file does not exist\. Received: lora='.*nope\.safetensors'"):
        read_lora(str(tmp_path / "nope.safetensors"))
    good = _save(tmp_path / "k.safetensors", _kohya())
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(open(good, "rb").read()[:-100])
    with pytest.raises(LoraError, match=r"not a readable \.safetensors file \(SafetensorError: .*file not fully covered\)\. Received: lora='.*cut\.safetensors'"):
        read_lora(str(cut))
    model = _save(tmp_path / "model.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": np.ones((320, 4, 3, 3))})
    with pytest.raises(LoraError, match=r"no LoRA tensors found \(1 tensors.*is this a checkpoint rather than a LoRA\?"):
        read_lora(model)
    loha = _save(tmp_path / "loha.safetensors", {"lora_unet_x.hada_w1_a": np.ones((2, 2)), "lora_unet_x.hada_w1_b": np.ones((2, 2))})
    with pytest.raises(LoraError, match=r"this is a LoHa \(LyCORIS\) file, which sdanim does not read \(2 such tensors"):
        read_lora(loha)
    odd = _save(tmp_path / "odd.safetensors", {"lora_unet_x.lora_down.weight": np.ones((4, 8)), "lora_unet_x.lora_up.weight": np.ones((8, 3))})
    with pytest.raises(LoraError, match=r"lora_unet_x: lora down \(4, 8\) and up \(8, 3\) do not make a low-rank pair"):
        read_lora(odd)
    text = tmp_path / "notes.txt"
    text.write_text("hi")
    with pytest.raises(LoraError, match=r"a LoRA file must end in \.safetensors, \.ckpt"):
        read_lora(str(text))


@pytest.mark.parametrize("lora, match", [
    ("{tmp}/x.safetensors:abc", "lora must be FILE or FILE:SCALE with a number for SCALE. Received: lora='{tmp}/x.safetensors:abc'"),
    ("{tmp}/missing.safetensors", "the LoRA file does not exist. Received: lora='{tmp}/missing.safetensors'"),
])
def test_cli_bad_lora_is_one_line_before_any_build(tmp_path, capsys, lora, match):
    import time

    start = time.perf_counter()
    out = str(tmp_path / "g")
    code = main(["generate", "a cat", "--weights", "random", "--size", "128x128", "--out", out,
                 "--lora", lora.format(tmp=tmp_path)])
    assert code == 2
    assert capsys.readouterr().err == f"sdanim: error: {match.format(tmp=tmp_path)}\n"
    assert time.perf_counter() - start < 20  # refused before the model build (30-90 s)
    assert not os.listdir(out) if os.path.exists(out) else True


def test_model_spec_hands_loras_to_load_model(monkeypatch):
    import sdanim
    from sdanim.model import spec as models

    seen = {}
    monkeypatch.setattr(models, "load_model", lambda **kw: seen.update(kw) or "model")
    spec = sdanim.ModelSpec(weights="random", loras=["a.safetensors:0.5", ("b.safetensors", 2)])
    assert spec.load(64, 64) == "model"
    assert seen["loras"] == (Lora("a.safetensors", 0.5), Lora("b.safetensors", 2.0))


def test_loras_gate_resume_and_name_themselves_in_each_png(tiny, tmp_path, monkeypatch):
    """The manifest's model record carries the LoRAs: a resume with other LoRAs is refused;
    every frame's PNG metadata names them."""
    import json

    from PIL import Image

    import sdanim
    from sdanim.config.errors import SdanimError

    settings = sdanim.RenderSettings(height=64, width=64, num_steps=2, batch_size=2)
    record = {"file": "style.safetensors", "size": 10, "sha256": "ab" * 32, "scale": 0.7}
    monkeypatch.setattr(tiny, "lora_records", [record], raising=False)
    describe = type(tiny).describe
    monkeypatch.setattr(type(tiny), "describe", lambda self: {**describe(self), "loras": list(self.lora_records)})
    out = str(tmp_path / "m.gif")
    result = sdanim.morph(["a", "b"], out=out, frames=3, settings=settings, model=tiny, progress=False)
    meta = json.loads(Image.open(os.path.join(result.frames_dir, "frame_00001.png")).text["sdanim"])
    assert meta["loras"] == [record]
    monkeypatch.setattr(tiny, "lora_records", [{**record, "scale": 0.9}], raising=False)
    with pytest.raises(SdanimError, match=r"belongs to another run \(model\.loras.*Received: out folder="):
        sdanim.morph(["a", "b"], out=out, frames=3, settings=settings, model=tiny, progress=False)


@pytest.mark.parametrize("scheduler", ["lcm"])  # tcd differs only in its step, tested against diffusers
def test_every_tool_runs_with_the_few_step_samplers(tiny, tmp_path, scheduler):
    """morph, walk/circle, generate, grid, img2img, inpaint, outpaint, image-morph and the
    step view with the consistency sampler (its defaults: 4 steps, guidance 1)."""
    import sdanim

    s = sdanim.RenderSettings(height=64, width=64, scheduler=scheduler, batch_size=2)
    assert (s.num_steps, s.guidance_scale) == (4, 1.0)
    kw = dict(settings=s, model=tiny, progress=False)
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[32:] = 255
    m = sdanim.morph(["a", "b"], out=str(tmp_path / "m.gif"), frames=4, **kw)
    c = sdanim.animate(sdanim.circle_walk("a", 1, 4), out=str(tmp_path / "c.gif"), **kw)
    g = sdanim.generate("a cat", num_images=2, seed=1, out_dir=None, **kw)
    grid = sdanim.grid(["a", "b"], seeds=[1, 2], out=None, **kw)
    i2i = sdanim.img2img(image, "a cat", strength=0.5, seed=1, out_dir=None, **kw)
    inp = sdanim.inpaint(image, mask, "a cat", seed=1, out_dir=None, **kw)
    outp = sdanim.outpaint(image[:, :32], "a cat", right=32, seed=1, out_dir=None, **kw)
    im = sdanim.image_morph(image, image[::-1], "a", out=str(tmp_path / "im.gif"), frames=3, **kw)
    st = sdanim.denoising_steps("a", seed=1, out=None, **kw)
    for images in (m.frames, c.frames, g.images, i2i.images, inp.images, outp.images, im.frames, st.images):
        assert images.dtype == np.uint8 and images.shape[1:] == (64, 64, 3) and images.std() > 0
    assert len(grid.cells) == 2 and st.steps == [1, 2, 3, 4]
    np.testing.assert_array_equal(inp.images[0][:32], image[:32])  # the kept half is the image itself


def test_pt_lora_is_read_through_the_restricted_unpickler(tmp_path):
    from conftest import require

    torch = require("torch")
    state = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in _kohya().items()}
    torch.save(state, str(tmp_path / "k.pt"))
    lora = read_lora(str(tmp_path / "k.pt"))
    assert lora.format == "kohya" and len(lora.modules) == 1
    np.testing.assert_allclose(next(iter(lora.modules.values())).delta(), read_lora(_save(tmp_path / "k.safetensors", _kohya()))
                               .modules[next(iter(lora.modules))].delta(), rtol=1e-6)
