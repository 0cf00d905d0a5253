"""The real KerasCV SD 1.4 architecture with seeded random weights, at 64x64 (HEAVY_SIZE).

Parity with KerasCV's own generate_image, batch invariance, and the CLI end to end.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import HEAVY_LATENT, HEAVY_SIZE, keras_cv_layers, require
from PIL import Image

from sdanim.model.stable_diffusion import prompt_encoder
from sdanim.core.noise import seeded_noise
from sdanim.render.sampling import Renderer
from sdanim.config.settings import RenderSettings
from sdanim.core.runtime import START_UP_LINES

pytestmark = pytest.mark.heavy
PROMPTS = ["a ford truck on a dirt road", "an electric car in a city"]


def test_text_embeddings_match_keras_cv(sd_model):
    from sdanim.model.reference import keras_cv_pipeline

    pipeline = keras_cv_pipeline(sd_model)
    ours = prompt_encoder(sd_model).encode(PROMPTS)
    for k, prompt in enumerate(PROMPTS):
        theirs = np.asarray(pipeline.encode_text(prompt))[0]
        np.testing.assert_allclose(ours[k], theirs, atol=1e-4)


def test_frames_match_keras_cv_generate_image(sd_model):
    """Same weights, embeddings and noise: sdanim's fused loop (its CPU layer forms, the
    context projected once per batch) == KerasCV's loop on KerasCV's layers. Run
    as one compiled program (the step loop, TensorFlow's default on CPU, renders every
    other real-architecture test)."""
    from sdanim.model.reference import keras_cv_pipeline

    pipeline = keras_cv_pipeline(sd_model)
    encoder = prompt_encoder(sd_model)
    contexts = encoder.encode(PROMPTS)  # (2, 77, 768)
    noises = np.stack([seeded_noise(s, HEAVY_LATENT) for s in (1, 2)])  # (2, 8, 8, 4)
    with keras_cv_layers(sd_model):  # the reference: KerasCV's loop on KerasCV's own layers
        theirs = pipeline.generate_image(
            contexts, batch_size=2, num_steps=3, unconditional_guidance_scale=7.5, diffusion_noise=noises
        )
    settings = RenderSettings(height=HEAVY_SIZE, width=HEAVY_SIZE, num_steps=3, guidance_scale=7.5, batch_size=2)
    ours = Renderer(sd_model.diffusion_model, sd_model.decoder, settings, encoder.encode_one(""),
                    loop="program").render(contexts, noises, [1, 2])
    diff = np.abs(ours.astype(int) - np.asarray(theirs).astype(int))
    assert diff.max() <= 2, f"max difference {diff.max()} uint8 levels"
    assert ours.std() > 1  # not a blank image


def test_batch_size_does_not_change_frames(sd_model):
    import sdanim

    s1 = RenderSettings(height=HEAVY_SIZE, width=HEAVY_SIZE, num_steps=2, batch_size=1)
    s4 = RenderSettings(height=HEAVY_SIZE, width=HEAVY_SIZE, num_steps=2, batch_size=4)
    a = sdanim.generate("a red barn", num_images=3, seed=7, settings=s1, model=sd_model, out_dir=None, progress=False)
    b = sdanim.generate("a red barn", num_images=3, seed=7, settings=s4, model=sd_model, out_dir=None, progress=False)
    diff = np.abs(a.images.astype(int) - b.images.astype(int)).max()
    assert diff <= 1, f"batch 1 vs 4 differ by {diff} levels"
    assert not np.array_equal(a.images[0], a.images[1])


SMOKE = ["--weights", "random", "--size", f"{HEAVY_SIZE}x{HEAVY_SIZE}", "--steps", "2", "--batch-size", "4", "--quiet"]


@pytest.mark.own_process
def test_cli_morph_end_to_end(tmp_path, capsys):
    """The one real `python -m sdanim morph --weights random` process, on a Ray worker (the
    CLI starts its own local Ray; the worker builds the real architecture; the driver
    builds none). Run as a user would, without TF_CPP_MIN_LOG_LEVEL, and with TensorFlow's
    oneDNN kernels forced on (TF_ENABLE_ONEDNN_OPTS=1, what x86 CPUs with AVX512_VNNI,
    AVX512_BF16 or AMX get by default), so TensorFlow's start-up lines -- "oneDNN custom
    operations are on" through Abseil's pre-init logging among them -- would show from the
    driver or the worker if sdanim did not silence them."""
    require("psutil")
    require("ray")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["TF_ENABLE_ONEDNN_OPTS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "sdanim", "morph", *PROMPTS, "--frames", "8", "--fps", "4", "--seed", "42",
         "--out", "outputs/morph.gif", "--sheet", *SMOKE, "--workers", "1"],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [line for line in proc.stderr.splitlines() if any(s in line for s in START_UP_LINES)], proc.stderr[-2000:]
    gif = tmp_path / "outputs" / "morph.gif"
    with Image.open(gif) as im:
        assert im.n_frames == 8 and im.size == (64, 64)
        assert im.info["duration"] == 250 and im.info["loop"] == 0
    frames_dir = tmp_path / "outputs" / "morph_frames"
    names = sorted(p.name for p in frames_dir.iterdir())
    assert names == [f"frame_{i:05d}.png" for i in range(8)] + ["manifest.json"]  # no probe, no temp file
    first = np.asarray(Image.open(frames_dir / names[0]))
    last = np.asarray(Image.open(frames_dir / names[7]))
    assert first.shape == (64, 64, 3) and np.abs(first.astype(int) - last.astype(int)).max() > 0
    manifest = json.loads((frames_dir / "manifest.json").read_text())
    assert [k["prompt"] for k in manifest["walk"]["keyframes"]] == PROMPTS
    assert manifest["model"]["weights"] == "random" and manifest["model"]["version"] == "1.4"
    assert manifest["render"]["num_steps"] == 2
    assert (tmp_path / "outputs" / "morph_sheet.png").is_file()
    assert not list((tmp_path / "outputs").glob(".*partial*"))
    assert "wrote outputs/morph.gif (8 frames at 4 fps" in proc.stdout


@pytest.fixture
def cli_on_shared_model(sd_model, monkeypatch):
    """The CLI in this process, its model load answered by the shared model (after
    checking that the CLI asked for what the shared model is)."""
    from sdanim.frontends.cli import options as cli

    asked = []

    def load(args, settings):
        asked.append((args.weights, settings.height, settings.width))
        assert (args.weights, settings.height, settings.width) == ("random", HEAVY_SIZE, HEAVY_SIZE)
        return sd_model

    monkeypatch.setattr(cli, "model_for", load)
    return asked


def test_cli_morph_mp4_and_generate(cli_on_shared_model, tmp_path, monkeypatch, capsys):
    import imageio.v2 as imageio

    from sdanim.frontends.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["morph", *PROMPTS, "a bicycle", "--frames", "4", "--fps", "10", "--out", "outputs/walk.mp4", *SMOKE]) == 0
    reader = imageio.get_reader(str(tmp_path / "outputs" / "walk.mp4"), format="FFMPEG")
    assert abs(reader.get_meta_data()["fps"] - 10) < 1e-6
    frames = [f for f in reader]
    reader.close()
    assert len(frames) == 4 and frames[0].shape == (HEAVY_SIZE, HEAVY_SIZE, 3)  # one batch of 4
    assert "wrote outputs/walk.mp4 (4 frames at 10 fps; 4 rendered" in capsys.readouterr().out

    assert main(["generate", PROMPTS[0], "--num-images", "3", "--seed", "4", "--out", "outputs/gen", *SMOKE[:-3],
                 "--batch-size", "3", "--quiet"]) == 0
    names = sorted(p.name for p in (tmp_path / "outputs" / "gen").glob("*.png"))
    assert names == [f"a-ford-truck-on-a-dirt-road-seed{s}.png" for s in (4, 5, 6)]
    assert "seed 4: outputs/gen/a-ford-truck-on-a-dirt-road-seed4.png" in capsys.readouterr().out
    assert len(cli_on_shared_model) == 2  # each command loaded (was handed) the model once


def _unet_inputs(seed: int):
    """A UNet call's inputs at HEAVY_SIZE, batch 2: latent, timestep embeddings, context."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((2, *HEAVY_LATENT)).astype("float32")
    t_emb = np.stack([np.full(320, 0.3, "float32"), np.full(320, -0.2, "float32")])
    context = rng.standard_normal((2, 77, 768)).astype("float32")
    return latent, t_emb, context


def test_fused_attention_matches_keras_cv_attention(sd_model):
    from sdanim.model.layers import use_fused_attention

    latent, t_emb, context = _unet_inputs(seed=0)
    unet, dec = sd_model.diffusion_model, sd_model.decoder
    ref_eps = np.asarray(unet([latent, t_emb, context]))
    ref_img = np.asarray(dec(latent))
    try:
        assert use_fused_attention(unet) == 32  # 16 transformer blocks x (self, cross)
        assert use_fused_attention(dec) == 1
        fused_eps = np.asarray(unet([latent, t_emb, context]))
        fused_img = np.asarray(dec(latent))
    finally:
        use_fused_attention(unet, enabled=False)
        use_fused_attention(dec, enabled=False)
    scale = np.abs(ref_eps).max()
    assert np.abs(fused_eps - ref_eps).max() < 1e-4 * max(scale, 1)
    assert np.abs(fused_img - ref_img).max() < 1e-4
    np.testing.assert_allclose(np.asarray(unet([latent, t_emb, context])), ref_eps, atol=1e-6)  # restored


def test_uniform_spacing_on_the_real_architecture(sd_model, tmp_path):
    """Uniform spacing, with its default preview (a quarter of the steps, at least 2),
    lowers the spread of consecutive-frame distances on the random-weight model
    compared with linear spacing (both figures printed)."""
    import sdanim

    # One batch per pass; guidance 1 (one UNet row per frame): spacing does not depend on it.
    s = RenderSettings(height=HEAVY_SIZE, width=HEAVY_SIZE, num_steps=4, guidance_scale=1.0, batch_size=6)
    prompts = ["a ford truck on a dirt road", "an electric car in a city"]
    kw = dict(frames=6, settings=s, model=sd_model, progress=False, noise="slerp", seeds=[1, 2])
    lin = sdanim.morph(prompts, out=str(tmp_path / "lin.gif"), **kw)
    uni = sdanim.morph(prompts, out=str(tmp_path / "uni.gif"), spacing="uniform", **kw)  # preview: 2 of 4 steps
    with open(os.path.join(uni.frames_dir, "manifest.json")) as f:
        assert json.load(f)["timing"]["preview_steps"] == 2
    print(f"\nreal architecture, 6 frames: linear 1-Gini {lin.smoothness['one_minus_gini']:.3f} "
          f"variance {lin.smoothness['variance']:.3e}; uniform 1-Gini {uni.smoothness['one_minus_gini']:.3f} "
          f"variance {uni.smoothness['variance']:.3e}")
    assert uni.smoothness["variance"] < lin.smoothness["variance"]


@pytest.mark.own_process
@pytest.mark.family
def test_sd21_in_its_own_process():
    """The SD 2.1 tests (tests/heavy_sd21.py: KerasCV V2 loop parity, checkpoint import,
    ControlNet parity) run in a child pytest, in the family tier (`-m family`: SD 2.1's
    real shapes, once per CI run, outside the README's command). TensorFlow keeps the weights that traced functions captured
    after a model is dropped (about 3.5 GB of the SD 1.4 UNet here), so a second
    architecture in this process would push the suite past 12 GB; the child's memory
    goes back when it exits."""
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-m", "pytest", os.path.join(here, "heavy_sd21.py"), "-p", "no:cacheprovider",
                           "-q", "-s"], capture_output=True, text=True)
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "3 passed" in proc.stdout and "SD 2.x parity" in proc.stdout and "sd2.1 max pixel diff" in proc.stdout
    assert "ControlNet SD 2.1 parity" in proc.stdout
    assert "still referenced" not in proc.stdout


def test_lora_for_another_architecture_is_refused_untouched(sd_model, tmp_path):
    """An SD 2.x LoRA (1024-wide text and cross-attention) and an SDXL one (other names)
    on the SD 1.4 layers: refused by name with the count, no weight changed, not even
    the layer the file does fit."""
    from safetensors.numpy import save_file

    from sdanim.formats.lora_files import LoraError
    from sdanim.model.lora import _targets

    rng = np.random.default_rng(0)

    def pair(name, down, up):
        return {f"{name}.lora_down.weight": rng.normal(size=down).astype(np.float32),
                f"{name}.lora_up.weight": rng.normal(size=up).astype(np.float32)}

    fits = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    _, layer = _targets(sd_model)[fits]
    before = np.array(layer.kernel.numpy())
    sd2 = {**pair(fits, (4, 320), (320, 4)),
           **pair("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k", (4, 1024), (1280, 4)),
           **pair("lora_te_text_model_encoder_layers_0_self_attn_q_proj", (4, 1024), (1024, 4))}
    save_file(sd2, str(tmp_path / "sd2.safetensors"))
    with pytest.raises(LoraError, match=r"the LoRA does not fit this Stable Diffusion 1\.x model: of its 3 modules, "
                       r"2 of the wrong shape \(.*attn2_to_k \(1280, 1024\).*another architecture.*Received: lora='.*sd2\.safetensors'"):
        sd_model.set_loras([str(tmp_path / "sd2.safetensors")])
    sdxl = {**pair(fits, (4, 320), (320, 4)),
            **pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", (4, 768), (768, 4)),
            **pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", (4, 640), (640, 4))}
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(LoraError, match=r"of its 3 modules, 2 with no matching layer \(.*lora_te1_.*SDXL\?\)"):
        sd_model.set_loras([str(tmp_path / "sdxl.safetensors")])
    np.testing.assert_array_equal(layer.kernel.numpy(), before)
    assert sd_model.loras == () and "loras" not in sd_model.describe()


def test_cpu_layer_forms_and_context_cache_match_keras_cv_layers(sd_model):
    """load_model's GroupNormalization and padded-convolution forms (TensorFlow on a CPU)
    and the UNet's context model (the cross-attentions' keys and values once per batch)
    compute what KerasCV's layers compute."""
    from sdanim.model import context_cache

    latent, t_emb, context = _unet_inputs(seed=1)
    unet, dec = sd_model.diffusion_model, sd_model.decoder
    fast_eps = np.asarray(unet([latent, t_emb, context]))
    fast_img = np.asarray(dec(latent))
    projections = context_cache.context_model(unet)(context)
    assert len(projections) == 32  # 16 transformer blocks x (keys, values)
    with context_cache.reuse(unet, projections):
        reused_eps = np.asarray(unet([latent, t_emb, context]))
    with keras_cv_layers(sd_model) as restored:
        assert restored == (156, 70), restored  # what load_model switched on this CPU
        ref_eps = np.asarray(unet([latent, t_emb, context]))
        ref_img = np.asarray(dec(latent))
    np.testing.assert_array_equal(np.asarray(unet([latent, t_emb, context])), fast_eps)  # switched back
    scale = np.abs(ref_eps).max()
    assert np.abs(fast_eps - ref_eps).max() < 1e-4 * max(scale, 1)
    assert np.abs(fast_img - ref_img).max() < 1e-4
    np.testing.assert_allclose(reused_eps, fast_eps, atol=1e-6 * max(scale, 1))
