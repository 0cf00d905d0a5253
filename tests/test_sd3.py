"""Stable Diffusion 3 / 3.5 on KerasHub's pieces (`sdanim.model.sd3`), at tiny shapes.

Numerical truth is diffusers on the same random weights: its `SD3Transformer2DModel`
(the 3.0 layout, and 3.5 medium's MMDiT-X with RMS-normalised queries and keys) against
KerasHub's MMDiT read through sdanim's name map, its flow-matching scheduler against
sdanim's `flow_euler`, and a few steps of its `StableDiffusion3Pipeline` (no T5,
embeddings and latents given) against sdanim's renderer. Every parameter is drawn at
random before comparing (diffusers zero-initialises none here, but its modulation
order only shows when the halves differ). The rest is what a user of a morph would
notice: keyframes equal `generate`, frames do not depend on the batch size, and wrong
combinations are one line before anything is built.
"""

import os
import re

import numpy as np
import pytest

from conftest import require
from tiny import make_tiny_sd3_model, tiny_sd3_configs
from sdanim.frontends.cli import main
from sdanim.core.runtime import import_keras
from sdanim.model import sd3

TINY, TINY_35 = tiny_sd3_configs()  # SD3's layout; 3.5 medium's MMDiT-X
SIZE = 64
LATENT = SIZE // 8


def _randomize(module, torch):
    """Every parameter of a torch module drawn at random (norm scales around 1)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            spread = p[0].numel() ** -0.5 if p.ndim > 1 else 0.2
            p.copy_(torch.randn_like(p) * spread + (1.0 if "norm" in name and p.ndim == 1 else 0.0))
    return module.eval()


def _reference_transformer(config):
    """diffusers' SD3 transformer of `config`, every parameter (and the position grid)
    drawn at random, with scales that keep activations of order 1."""
    torch = require("torch")
    diffusers = require("diffusers")
    torch.manual_seed(0)
    ref = diffusers.SD3Transformer2DModel(
        sample_size=LATENT, patch_size=2, in_channels=16, out_channels=16, num_layers=config.num_layers,
        attention_head_dim=config.hidden_dim // config.num_heads, num_attention_heads=config.num_heads,
        joint_attention_dim=sd3.CONTEXT_WIDTH, caption_projection_dim=config.hidden_dim,
        pooled_projection_dim=config.clip_l.hidden_dim + config.clip_g.hidden_dim,
        pos_embed_max_size=config.position_size, dual_attention_layers=config.dual_attention,
        qk_norm=config.qk_norm)
    _randomize(ref, torch)
    with torch.no_grad():
        ref.pos_embed.pos_embed.copy_(torch.randn_like(ref.pos_embed.pos_embed))
    return ref


def _model_with(ref, config):
    """sdanim's SD3 model with the reference transformer's weights in its MMDiT."""
    return _model_with_state({k: v.detach().numpy() for k, v in ref.state_dict().items()}, config)


def _packed(seq, pooled):
    out = np.zeros((len(seq), sd3.CONTEXT_ROWS, sd3.CONTEXT_WIDTH), np.float32)
    out[:, : sd3.SEQUENCE_TOKENS] = seq
    out[:, sd3.SEQUENCE_TOKENS, : pooled.shape[1]] = pooled
    return out


@pytest.fixture(scope="module")
def tiny_model():
    """A tiny SD3 model with random weights (3.5's MMDiT-X layout), shared by the module."""
    return make_tiny_sd3_model(SIZE, SIZE)


def test_flow_euler_sigmas_and_steps_are_diffusers():
    torch = require("torch")
    diffusers = require("diffusers")
    from sdanim.core.schedulers import make_scheduler

    for steps in (1, 4, 28):
        ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
        ref.set_timesteps(steps)
        ours = make_scheduler("flow_euler", steps)
        np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-6)
        x, v = np.random.default_rng(steps).standard_normal((2, 5)).astype(np.float32)
        for i, t in enumerate(ref.timesteps[:2]):
            expected = ref.step(torch.from_numpy(v), t, torch.from_numpy(x)).prev_sample.numpy()
            np.testing.assert_allclose(ours.step(i, x, v)[0], expected, rtol=0, atol=1e-6)
    # image-to-image's noising: diffusers' scale_noise, (1 - sigma) x0 + sigma noise
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(10)
    x0, noise = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    expected = ref.scale_noise(torch.from_numpy(x0), ref.timesteps[3:4], torch.from_numpy(noise)).numpy()
    np.testing.assert_allclose(make_scheduler("flow_euler", 10).noised(3, x0, noise), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("config", [TINY, TINY_35], ids=["sd3", "sd3.5-mmdit-x"])
def test_mmdit_matches_diffusers_transformer(config):
    torch = require("torch")
    ref = _reference_transformer(config)
    model = _model_with(ref, config)
    rng = np.random.default_rng(1)
    latent = rng.standard_normal((2, LATENT, LATENT, 16)).astype(np.float32)
    seq = rng.standard_normal((2, sd3.SEQUENCE_TOKENS, sd3.CONTEXT_WIDTH)).astype(np.float32)
    pooled = rng.standard_normal((2, 80)).astype(np.float32)
    t = np.array([[700.0], [31.5]], np.float32)
    ours = np.asarray(model.diffusion_model([latent, t, _packed(seq, pooled)]))
    with torch.no_grad():
        expected = ref(hidden_states=torch.from_numpy(latent.transpose(0, 3, 1, 2)),
                       encoder_hidden_states=torch.from_numpy(seq), pooled_projections=torch.from_numpy(pooled),
                       timestep=torch.from_numpy(t[:, 0])).sample.numpy().transpose(0, 2, 3, 1)
    scale = np.abs(expected).max()
    assert scale > 1.0  # a live network, not a zero output
    assert np.abs(ours - expected).max() <= 1e-4 * scale


def test_a_few_steps_equal_diffusers_sd3_pipeline():
    """Flow-matching Euler with guidance, from the same latents and embeddings: the
    latents diffusers' pipeline (no T5, 77-token CLIP sequences padded to 154) ends on."""
    torch = require("torch")
    diffusers = require("diffusers")
    from sdanim.config.settings import RenderSettings
    from sdanim.render.jobs import make_renderer

    ref = _reference_transformer(TINY_35)
    model = _model_with(ref, TINY_35)
    rng = np.random.default_rng(2)
    noise = rng.standard_normal((2, LATENT, LATENT, 16)).astype(np.float32)
    seq = rng.standard_normal((2, sd3.SEQUENCE_TOKENS, sd3.CONTEXT_WIDTH)).astype(np.float32) * 0.5
    pooled = rng.standard_normal((2, 80)).astype(np.float32)
    seq[:, 77:] = 0.0  # the rows T5 would fill
    neg_seq, neg_pooled = seq[:1] * 0.3, pooled[:1] * -0.5
    settings = RenderSettings(height=SIZE, width=SIZE, scheduler="flow_euler", num_steps=3, guidance_scale=4.5)
    renderer = make_renderer(model, settings)
    renderer.unconditional_context = _packed(neg_seq, neg_pooled)[0]
    ours = np.asarray(renderer.sample_latents(_packed(seq, pooled), noise, seeds=[0, 1]))

    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=ref, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    with torch.no_grad():
        expected = pipe(
            prompt_embeds=torch.from_numpy(seq), pooled_prompt_embeds=torch.from_numpy(pooled),
            negative_prompt_embeds=torch.from_numpy(np.repeat(neg_seq, 2, 0)),
            negative_pooled_prompt_embeds=torch.from_numpy(np.repeat(neg_pooled, 2, 0)),
            latents=torch.from_numpy(noise.transpose(0, 3, 1, 2)), num_inference_steps=3, guidance_scale=4.5,
            height=SIZE, width=SIZE, output_type="latent", max_sequence_length=77).images.numpy().transpose(0, 2, 3, 1)
    scale = np.abs(expected).max()
    assert np.abs(expected - noise).max() > 0.1 * scale  # the steps moved the latents
    assert np.abs(ours - expected).max() <= 1e-4 * scale


def test_a_morphs_keyframes_are_generate_and_frames_do_not_depend_on_batch_size(tiny_model, tmp_path):
    import sdanim

    def morph(batch_size, name):
        settings = sdanim.RenderSettings(height=SIZE, width=SIZE, scheduler="flow_euler", num_steps=2,
                                         batch_size=batch_size)
        return sdanim.morph(["a red cube", "a blue sphere"], out=str(tmp_path / f"{name}.gif"), frames=4, seed=3,
                            model=tiny_model, settings=settings, progress=False).frames

    one, three = morph(1, "one"), morph(3, "three")
    assert one.shape == (4, SIZE, SIZE, 3) and one.std() > 5  # pictures, not a flat field
    assert np.abs(one.astype(int) - three.astype(int)).max() <= 1  # rounding of other batch shapes (as SD 1.x)
    assert np.abs(one[1].astype(int) - one[2].astype(int)).max() > 0  # the prompt travels
    settings = sdanim.RenderSettings(height=SIZE, width=SIZE, scheduler="flow_euler", num_steps=2)
    for k, prompt in ((0, "a red cube"), (3, "a blue sphere")):
        image = sdanim.generate(prompt, seed=3, model=tiny_model, settings=settings, progress=False).images[0]
        assert np.abs(image.astype(int) - one[k].astype(int)).max() <= 1


def test_a_looped_walk_file_resumes_exactly_and_its_manifest_names_the_sd3_model(tiny_model, tmp_path):
    """A walk file (a circle in noise space, a keyframe's own negative prompt) on SD3: the
    manifest records the model; frames deleted from the run folder are rendered again, and
    only they, equal to the first run's."""
    import dataclasses
    import json

    import sdanim

    walk_file = tmp_path / "walk.yaml"
    walk_file.write_text("loop: true\nnoise: circle\nkeyframes:\n"
                         "  - {prompt: a red cube, seed: 5, frames: 3, negative: blurry}\n"
                         "  - {prompt: a blue sphere, seed: 6, frames: 3}\n")
    settings = sdanim.RenderSettings(height=SIZE, width=SIZE, scheduler="flow_euler", num_steps=2, batch_size=2)
    walk = sdanim.load_walk(str(walk_file))
    first = sdanim.animate(walk, out=str(tmp_path / "walk.gif"), settings=settings, model=tiny_model, progress=False)
    assert first.frames.shape[0] == 6 and first.frames.std() > 5
    with open(os.path.join(first.frames_dir, "manifest.json"), encoding="utf-8") as f:
        recorded = json.load(f)
    assert recorded["model"]["version"] == tiny_model.version
    for k in (1, 4):
        os.remove(os.path.join(first.frames_dir, f"frame_{k:05d}.png"))
    again = sdanim.animate(walk, out=str(tmp_path / "walk.gif"), settings=dataclasses.replace(settings, batch_size=1),
                           model=tiny_model, progress=False)
    assert again.rendered == 2
    assert np.abs(again.frames.astype(int) - first.frames.astype(int)).max() <= 1


def test_the_text_encoder_packs_clip_l_g_and_the_pooled_row(tiny_model):
    """The packed context: CLIP-L then CLIP-G features, zeros to 4096 wide and where T5's
    77 rows would be, the pooled projections in the last row; CLIP-G reads "!" (id 0)
    after the end token, as SD3's second tokenizer pads."""
    from sdanim.model.stable_diffusion import prompt_encoder

    packed = prompt_encoder(tiny_model).encode(["a red cube", ""])
    assert packed.shape == (2, sd3.CONTEXT_ROWS, sd3.CONTEXT_WIDTH)
    l_g = TINY.clip_l.hidden_dim + TINY.clip_g.hidden_dim
    assert np.all(packed[:, :77, l_g:] == 0) and np.all(packed[:, 77:154] == 0)
    assert np.all(packed[:, 154, l_g:] == 0) and np.abs(packed[:, 154, :l_g]).min(axis=1).max() > 0
    tokens = np.array([[49406, 320, 49407] + [49407] * 74], np.int32)
    g_tokens = tokens.copy()
    g_tokens[0, 3:] = 0
    clip_g = tiny_model.backbone.clip_g({"token_ids": g_tokens})["intermediate_output"]
    np.testing.assert_allclose(np.asarray(tiny_model.text_encoder([tokens, tokens * 0]))[0, :77, 32:80],
                               np.asarray(clip_g)[0], atol=1e-5)


M3 = ["morph", "a cat", "a dog", "--weights", "random"]


@pytest.mark.parametrize("argv, match", [
    (M3 + ["--model", "sd3-medium", "--scheduler", "ddim"],
     "sd3-medium is a flow-matching model: its sampler is flow_euler. Received: scheduler='ddim'"),
    (M3 + ["--model", "1.4", "--scheduler", "flow_euler"],
     "the flow_euler sampler is for flow-matching models"),
    (M3 + ["--model", "sd3.5-large", "--decoder", "tiny"], "SD3's tiny decoder needs TAESD3 weights given with --taesd"),
    (M3 + ["--model", "sd3-medium", "--attention-interp", "inner"], "on SD3's joint attention it is not built yet"),
    (M3 + ["--model", "sd3-medium", "--lora", "x.safetensors"], "the LoRA file does not exist"),
    (M3 + ["--model", "sd3-medium", "--motion-module", "random"], "motion modules are for SD 1.x"),
    (M3 + ["--model", "sd3-medium", "--controlnet", "random"], "SD3's ControlNets (a transformer of their own)"),
])
def test_sd3_combinations_that_cannot_work_are_one_line(capsys, argv, match, tmp_path):
    assert main(argv + ["--out", str(tmp_path / "x.gif")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdanim: error: ") and match in err and err.count("\n") == 1


def test_weights_of_the_other_family_are_one_line(capsys, tmp_path):
    """An SD3 file given to an SD 1.x model, and an SD 1.x folder given to an SD3 model."""
    from safetensors.numpy import save_file

    sd3_file = str(tmp_path / "sd3_medium.safetensors")
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": np.zeros((6, 2), np.float32)},
              sd3_file)
    assert main(["morph", "a", "b", "--weights", sd3_file, "--out", str(tmp_path / "a.gif")]) == 2
    err = capsys.readouterr().err
    assert "is a Stable Diffusion 3 model" in err and "--model sd3-medium" in err and err.count("\n") == 1
    sd1 = tmp_path / "sd15"
    (sd1 / "unet").mkdir(parents=True)
    assert main(["morph", "a", "b", "--model", "sd3-medium", "--weights", str(sd1), "--out",
                 str(tmp_path / "b.gif")]) == 2
    err = capsys.readouterr().err
    assert "holds Stable Diffusion 1.x/2.x weights" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "a_frames") and not os.path.exists(tmp_path / "b_frames")


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    """A tiny SD3 in diffusers' layout, every parameter random, saved as a diffusers folder
    (transformer/, text_encoder/, text_encoder_2/, vae/), and sdanim's model read from it."""
    torch = require("torch")
    diffusers = require("diffusers")
    transformers = require("transformers")
    from sdanim.core.runtime import import_keras
    from sdanim.formats.sd3_files import read_sd3_folder

    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("sd3") / "tiny-sd3"
    refs = {"transformer": _reference_transformer(TINY_35)}
    for name, c in (("text_encoder", TINY_35.clip_l), ("text_encoder_2", TINY_35.clip_g)):
        config = transformers.CLIPTextConfig(
            vocab_size=c.vocabulary_size, hidden_size=c.hidden_dim, intermediate_size=c.intermediate_dim,
            num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, max_position_embeddings=77,
            hidden_act=c.activation, projection_dim=c.hidden_dim)
        refs[name] = _randomize(transformers.CLIPTextModelWithProjection(config), torch)
    refs["vae"] = _randomize(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=list(TINY_35.vae_filters),
        layers_per_block=TINY_35.vae_blocks, latent_channels=16, norm_num_groups=32, scaling_factor=1.5305,
        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False), torch)
    for name, module in refs.items():
        module.save_pretrained(folder / name)
    keras = import_keras()
    keras.utils.set_random_seed(5)
    backbone = sd3.build_backbone(TINY_35, SIZE, SIZE, "float32")
    sd3.load_diffusers(backbone, read_sd3_folder(str(folder)), TINY_35, str(folder))
    return folder, refs, sd3.wrap("sd3-medium", backbone, SIZE, SIZE, str(folder), "float32")


def _reference_text(refs, tokens, torch):
    """diffusers' SD3 prompt embeddings without T5 from token ids: CLIP-L's and CLIP-G's
    penultimate hidden states side by side, zero-padded to 4096 and by 77 rows; the
    pooled text embeddings side by side. CLIP-G's ids carry "!" (0) after the end token."""
    g_tokens = tokens.copy()
    for row in g_tokens:
        end = int(np.argmax(row == sd3.END_TOKEN))
        row[end + 1:] = 0
    seqs, pooled = [], []
    with torch.no_grad():
        for name, ids in (("text_encoder", tokens), ("text_encoder_2", g_tokens)):
            out = refs[name](torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
            seqs.append(out.hidden_states[-2].numpy())
            pooled.append(out.text_embeds.numpy())
    seq = np.concatenate(seqs, axis=-1)
    seq = np.pad(seq, [(0, 0), (0, 77), (0, sd3.CONTEXT_WIDTH - seq.shape[-1])])
    return seq, np.concatenate(pooled, axis=-1)


def test_a_diffusers_folders_clip_l_and_g_give_diffusers_embeddings(diffusers_folder):
    torch = require("torch")
    _, refs, model = diffusers_folder
    from sdanim.model.stable_diffusion import prompt_encoder

    encoder = prompt_encoder(model)
    tokens = np.array([encoder.tokenize(p) for p in ("a lighthouse at dawn", "")], np.int32)
    seq, pooled = _reference_text(refs, tokens, torch)
    ours = encoder.encode(["a lighthouse at dawn", ""])
    scale = max(np.abs(seq).max(), np.abs(pooled).max())
    assert np.abs(ours[:, :154] - seq).max() <= 1e-4 * scale
    assert np.abs(ours[:, 154, :80] - pooled).max() <= 1e-4 * scale


def test_a_diffusers_folders_vae_decodes_and_encodes_as_diffusers(diffusers_folder):
    torch = require("torch")
    _, refs, model = diffusers_folder
    vae = refs["vae"]
    keras = import_keras()
    if keras.backend.backend() == "tensorflow":  # the form a CPU runs: group norms reduced in two stages
        norms = [l for l in model.backbone.vae._flatten_layers() if isinstance(l, keras.layers.GroupNormalization)]
        assert norms and all("call" in l.__dict__ for l in norms)
    rng = np.random.default_rng(4)
    latent = rng.standard_normal((2, LATENT, LATENT, 16)).astype(np.float32)
    with torch.no_grad():
        expected = vae.decode(torch.from_numpy(latent.transpose(0, 3, 1, 2)) / 1.5305 + 0.0609).sample.numpy()
    ours = keras.ops.convert_to_numpy(model.decoder(latent))  # (any backend: torch's needs a detach)
    scale = np.abs(expected).max()
    assert np.abs(ours - expected.transpose(0, 2, 3, 1)).max() <= 1e-4 * scale
    image = rng.uniform(-1, 1, (1, SIZE, SIZE, 3)).astype(np.float32)
    with torch.no_grad():
        mean = vae.encode(torch.from_numpy(image.transpose(0, 3, 1, 2))).latent_dist.mode()
        expected = ((mean - 0.0609) * 1.5305).numpy().transpose(0, 2, 3, 1)
    ours = keras.ops.convert_to_numpy(model.image_encoder(image))
    assert np.abs(ours - expected).max() <= 1e-4 * np.abs(expected).max()


def test_a_diffusers_folder_renders_diffusers_pipelines_image(diffusers_folder):
    """The whole loop and the decode, from a diffusers folder: prompt -> the image
    `StableDiffusion3Pipeline` (no T5) makes from the same embeddings and latents."""
    torch = require("torch")
    diffusers = require("diffusers")
    import sdanim
    from sdanim.model.stable_diffusion import prompt_encoder

    _, refs, model = diffusers_folder
    encoder = prompt_encoder(model)
    tokens = np.array([encoder.tokenize(p) for p in ("a lighthouse at dawn", "")], np.int32)
    seq, pooled = _reference_text(refs, tokens, torch)
    settings = sdanim.RenderSettings(height=SIZE, width=SIZE, scheduler="flow_euler", num_steps=2, guidance_scale=5.0)
    result = sdanim.generate("a lighthouse at dawn", seed=11, model=model, settings=settings, progress=False)
    from sdanim.core.noise import seeded_noise

    noise = seeded_noise(11, (LATENT, LATENT, 16))[None]
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=refs["transformer"], scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=refs["vae"], text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None)
    with torch.no_grad():
        expected = pipe(prompt_embeds=torch.from_numpy(seq[:1]), pooled_prompt_embeds=torch.from_numpy(pooled[:1]),
                        negative_prompt_embeds=torch.from_numpy(seq[1:]),
                        negative_pooled_prompt_embeds=torch.from_numpy(pooled[1:]),
                        latents=torch.from_numpy(noise.transpose(0, 3, 1, 2)), num_inference_steps=2,
                        guidance_scale=5.0, height=SIZE, width=SIZE, output_type="np",
                        max_sequence_length=77).images
    expected = np.round(np.clip(expected[0], 0, 1) * 255)
    assert expected.std() > 5
    assert np.abs(result.images[0].astype(int) - expected.astype(int)).max() <= 1


def test_a_diffusers_folder_with_a_tensor_missing_or_extra_is_one_line(diffusers_folder, tmp_path):
    from safetensors.numpy import load_file, save_file

    from sdanim.config.errors import SdanimError
    from sdanim.formats.sd3_files import read_sd3_folder

    folder, _, _ = diffusers_folder
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(vae_file))
    backbone = sd3.build_backbone(TINY_35, SIZE, SIZE, "float32")
    for name, change in (("missing", lambda t: t.pop("decoder.conv_out.bias")),
                         ("extra", lambda t: t.update({"decoder.quant_conv.weight": np.zeros((2, 2), np.float32)}))):
        copy = tmp_path / name
        import shutil

        shutil.copytree(folder, copy)
        changed = dict(tensors)
        change(changed)
        save_file(changed, str(copy / "vae" / "diffusion_pytorch_model.safetensors"))
        with pytest.raises(SdanimError) as error:
            sd3.load_diffusers(backbone, read_sd3_folder(str(copy)), TINY_35, str(copy))
        message = str(error.value)
        assert "\n" not in message and "vae" in message
        assert ("decoder.conv_out.bias" in message) if name == "missing" else ("decoder.quant_conv.weight" in message)


def test_image_tools_run_on_sd3_and_keep_what_they_should(tiny_model, tmp_path):
    """img2img, inpainting, grids and step views ride the same loop: strength 0 keeps the
    image, inpainting keeps the unmasked half, a grid cell is that
    prompt and seed's image, a step view's last step is the generated image."""
    import sdanim

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    settings = sdanim.RenderSettings(height=SIZE, width=SIZE, scheduler="flow_euler", num_steps=3)
    common = dict(model=tiny_model, settings=settings, progress=False, out_dir=None)
    kept = sdanim.img2img(image, "a red cube", strength=0.0, seed=1, **common).images[0]
    np.testing.assert_array_equal(kept, image)  # strength 0 keeps the image
    changed = sdanim.img2img(image, "a red cube", strength=0.7, seed=1, **common).images[0]
    assert np.abs(changed.astype(int) - image.astype(int)).mean() > 2
    mask = np.zeros((SIZE, SIZE), bool)
    mask[:, : SIZE // 2] = True
    painted = sdanim.inpaint(image, mask, "a blue sphere", seed=2, **common).images[0]
    np.testing.assert_array_equal(painted[:, -SIZE // 4:], image[:, -SIZE // 4:])  # far from the mask's edge
    assert np.abs(painted.astype(int) - image.astype(int))[:, : SIZE // 4].mean() > 2
    cells = sdanim.grid(["a red cube", "a blue sphere"], seeds=(1, 2), model=tiny_model, settings=settings,
                        progress=False, out=None).cells
    generated = sdanim.generate("a blue sphere", seed=2, **common).images[0]
    assert np.abs(cells[1, 1].astype(int) - generated.astype(int)).max() <= 1
    views = sdanim.denoising_steps("a blue sphere", seed=2, model=tiny_model, settings=settings, progress=False,
                                   out=None)
    assert np.abs(views.images[-1].astype(int) - generated.astype(int)).max() <= 1


def test_the_sampler_keeps_the_unmasked_latent_exactly(tiny_model):
    """Inpainting's invariant under flow matching: after the last step the latent outside
    the mask is the image's latent itself ((1 - sigma) x0 + sigma noise reaches x0 at
    sigma 0), inside it the model painted."""
    import sdanim
    from sdanim.model.stable_diffusion import prompt_encoder
    from sdanim.render.jobs import encode_images, make_renderer

    rng = np.random.default_rng(5)
    latent = encode_images(tiny_model, rng.integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8))
    mask = np.zeros((1, LATENT, LATENT, 1), np.float32)
    mask[:, :, : LATENT // 2] = 1.0
    context = prompt_encoder(tiny_model).encode(["a blue sphere"])
    noise = rng.standard_normal((1, LATENT, LATENT, 16)).astype(np.float32)
    settings = sdanim.RenderSettings(height=SIZE, width=SIZE, scheduler="flow_euler", num_steps=4)
    out = np.asarray(make_renderer(tiny_model, settings).sample_latents(context, noise, [1], latent, mask))
    keep = mask[..., 0] == 0
    assert np.array_equal(out[keep], latent[keep])
    assert np.abs(out[~keep] - latent[~keep]).max() > 1e-3


def test_a_ray_worker_declares_the_memory_of_the_sd3_model_it_loads():
    """Ray must not pack two SD3 models into a node that holds one: each worker declares
    its model's float32 weights and 2 GB (sd3-medium measured 12.9 GiB at 128 px)."""
    import sdanim
    from sdanim.render.ray import MODEL_MEMORY_GB, model_memory_gb

    assert model_memory_gb(sdanim.ModelSpec()) == MODEL_MEMORY_GB
    assert 12.9 <= model_memory_gb(sdanim.ModelSpec(version="sd3-medium")) <= 14
    assert model_memory_gb(sdanim.ModelSpec(version="sd3.5-large")) > 33
    assert model_memory_gb(make_tiny_sd3_model) == 0.0  # a function's model: the caller's to size


def test_a_diffusers_folder_of_another_sd3_is_one_line_before_the_build(diffusers_folder, capsys, tmp_path):
    """A 3-layer folder given as sd3.5-medium: refused from its config, nothing built."""
    folder, _, _ = diffusers_folder
    assert main(["morph", "a", "b", "--model", "sd3.5-medium", "--weights", str(folder), "--out",
                 str(tmp_path / "x.gif")]) == 2
    err = capsys.readouterr().err
    assert "transformer has 3 layers" in err and "not sd3.5-medium's 24" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "x_frames")


def test_load_model_hands_an_sd3_version_to_the_sd3_loader():
    """`sdanim.load_model(version="sd3-medium", ...)` builds SD3 as `ModelSpec` does: its
    checks are the SD3 loader's, one line each, before anything is built."""
    import sdanim
    from sdanim.config.errors import SdanimError

    with pytest.raises(SdanimError, match=r"weights for an SD3 model must be .*Received: weights='/no/such.safetensors'$"):
        sdanim.load_model(version="sd3-medium", weights="/no/such.safetensors", height=64, width=64)
    with pytest.raises(SdanimError, match=r"^the LoRA file does not exist. Received: lora='x.safetensors'$"):
        sdanim.load_model(version="sd3-medium", weights="random", height=64, width=64, loras=["x.safetensors"])


def test_a_diffusers_folder_without_a_part_is_one_line(tmp_path):
    from sdanim.config.errors import SdanimError
    from sdanim.formats.sd3_files import read_sd3_folder

    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text("{}")
    with pytest.raises(SdanimError, match=r"^the diffusers SD3 folder lacks transformer/, text_encoder/, "
                                          r"text_encoder_2/, vae/ .*Received: weights="):
        read_sd3_folder(str(tmp_path))


def test_a_preset_that_cannot_be_fetched_and_a_missing_keras_hub_are_one_line(monkeypatch):
    """Offline, KerasHub's download fails: one line saying where the weights come from and
    what to pass instead; without KerasHub, one line naming the extra."""
    import importlib.util

    from sdanim.config.errors import SdanimError
    from sdanim.core import runtime

    _, backbone, _, _ = sd3._layers()

    def offline(*args, **kwargs):
        raise OSError("Temporary failure in name resolution\nmore")

    monkeypatch.setattr(backbone, "from_preset", offline)
    with pytest.raises(SdanimError) as error:
        sd3._from_preset(sd3.SD3_CONFIGS["sd3-medium"], 64, 64, "float32", "keras-hub")
    message = str(error.value)
    assert "\n" not in message and "stable_diffusion_3_medium preset could not be loaded" in message
    assert "Temporary failure in name resolution more" in message and message.endswith("weights='keras-hub'")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "keras_hub" else real(name, *a))
    with pytest.raises(SdanimError, match=r"pip install 'sdanim\[sd3\]'.*Received: keras_hub=None$"):
        runtime.import_keras_hub()


def test_weights_that_do_not_fit_the_architecture_are_one_line(tiny_model):
    from sdanim.config.errors import SdanimError

    projection = tiny_model.backbone.clip_l_projection
    with pytest.raises(SdanimError, match=r"^x does not match the architecture: 1 weight\(s\) missing .*Received: 0 tensors$"):
        sd3.assign(projection, {}, "x")
    with pytest.raises(SdanimError, match=r"^x: dense/kernel has shape \(3, 3\), the architecture's is \(32, 32\)\. "):
        sd3.assign(projection, {"dense/kernel": np.zeros((3, 3), np.float32)}, "x")


def _to_stability(refs, torch) -> dict:
    """The reference's tensors in a Stability single file's names and layout (the test's
    own inverse of diffusers' single-file conversion, checked against it below): the
    MMDiT's q/k/v fused, its AdaLayerNormContinuous halves in (shift, scale) order, the
    VAE in latent-diffusion's names with 1x1-conv attention, the CLIPs as transformers
    saves them, and a T5 tensor a file may carry."""
    state = {k: v.detach().clone() for k, v in refs["transformer"].state_dict().items()}
    layers = refs["transformer"].config.num_layers
    out = {}

    def put(name, source):
        for kind in ("weight", "bias"):
            if f"{source}.{kind}" in state:
                out[f"model.diffusion_model.{name}.{kind}"] = state.pop(f"{source}.{kind}")

    def fuse(name, sources):
        for kind in ("weight", "bias"):
            out[f"model.diffusion_model.{name}.{kind}"] = torch.cat([state.pop(f"{s}.{kind}") for s in sources])

    def swap(tensor):
        first, second = tensor.chunk(2, dim=0)
        return torch.cat([second, first])

    out["model.diffusion_model.pos_embed"] = state.pop("pos_embed.pos_embed")
    put("x_embedder.proj", "pos_embed.proj")
    put("context_embedder", "context_embedder")
    for k in (1, 2):
        put(f"t_embedder.mlp.{2 * k - 2}", f"time_text_embed.timestep_embedder.linear_{k}")
        put(f"y_embedder.mlp.{2 * k - 2}", f"time_text_embed.text_embedder.linear_{k}")
    for i in range(layers):
        b, x, c = f"transformer_blocks.{i}", f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
        fuse(f"{x}.attn.qkv", [f"{b}.attn.to_{p}" for p in "qkv"])
        fuse(f"{c}.attn.qkv", [f"{b}.attn.add_{p}_proj" for p in "qkv"])
        put(f"{x}.attn.proj", f"{b}.attn.to_out.0")
        put(f"{c}.attn.proj", f"{b}.attn.to_add_out")
        for ours, theirs in ((f"{x}.attn.ln_q", "norm_q"), (f"{x}.attn.ln_k", "norm_k"),
                             (f"{c}.attn.ln_q", "norm_added_q"), (f"{c}.attn.ln_k", "norm_added_k")):
            put(ours, f"{b}.attn.{theirs}")
        if f"{b}.attn2.to_q.weight" in state:
            fuse(f"{x}.attn2.qkv", [f"{b}.attn2.to_{p}" for p in "qkv"])
            put(f"{x}.attn2.proj", f"{b}.attn2.to_out.0")
            put(f"{x}.attn2.ln_q", f"{b}.attn2.norm_q")
            put(f"{x}.attn2.ln_k", f"{b}.attn2.norm_k")
        put(f"{x}.adaLN_modulation.1", f"{b}.norm1.linear")
        put(f"{c}.adaLN_modulation.1", f"{b}.norm1_context.linear")
        if i == layers - 1:
            for kind in ("weight", "bias"):
                key = f"model.diffusion_model.{c}.adaLN_modulation.1.{kind}"
                out[key] = swap(out[key])
        put(f"{x}.mlp.fc1", f"{b}.ff.net.0.proj")
        put(f"{x}.mlp.fc2", f"{b}.ff.net.2")
        put(f"{c}.mlp.fc1", f"{b}.ff_context.net.0.proj")
        put(f"{c}.mlp.fc2", f"{b}.ff_context.net.2")
    put("final_layer.linear", "proj_out")
    out["model.diffusion_model.final_layer.adaLN_modulation.1.weight"] = swap(state.pop("norm_out.linear.weight"))
    out["model.diffusion_model.final_layer.adaLN_modulation.1.bias"] = swap(state.pop("norm_out.linear.bias"))
    assert not state, sorted(state)[:3]

    vae = {k: v.detach().clone() for k, v in refs["vae"].state_dict().items()}
    levels = len(refs["vae"].config.block_out_channels)
    renames = [("conv_norm_out", "norm_out"), ("conv_shortcut", "nin_shortcut"), ("downsamplers.0", "downsample"),
               ("upsamplers.0", "upsample"), ("mid_block.resnets.0", "mid.block_1"),
               ("mid_block.resnets.1", "mid.block_2"), ("mid_block.attentions.0.group_norm", "mid.attn_1.norm"),
               ("mid_block.attentions.0.to_q", "mid.attn_1.q"), ("mid_block.attentions.0.to_k", "mid.attn_1.k"),
               ("mid_block.attentions.0.to_v", "mid.attn_1.v"), ("mid_block.attentions.0.to_out.0", "mid.attn_1.proj_out")]
    for key, value in vae.items():
        name = key
        for theirs, ours in renames:
            name = name.replace(theirs, ours)
        name = name.replace("down_blocks.", "down.").replace(".resnets.", ".block.")
        if name.startswith("decoder.up_blocks."):
            i, rest = name[len("decoder.up_blocks."):].split(".", 1)
            name = f"decoder.up.{levels - 1 - int(i)}.{rest}"
        if ".attn_1." in name and name.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the original's 1x1 convolutions
        out[f"first_stage_model.{name}"] = value
    for part, prefix in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
        for key, value in refs[part].state_dict().items():
            out[f"text_encoders.{prefix}.transformer.{key}"] = value.detach().clone()
    out["text_encoders.t5xxl.transformer.shared.weight"] = torch.zeros(4, 8)  # T5: carried, not read
    return out


@pytest.fixture(scope="module")
def stability_file(diffusers_folder):
    """The tiny SD3 saved as Stability's single .safetensors. Checked first: diffusers'
    own single-file conversion turns it back into the reference's every tensor."""
    torch = require("torch")
    from diffusers.loaders import single_file_utils as single
    from safetensors.torch import save_file

    folder, refs, _ = diffusers_folder
    tensors = _to_stability(refs, torch)
    mmdit = single.convert_sd3_transformer_checkpoint_to_diffusers(
        {k: v for k, v in tensors.items() if k.startswith("model.diffusion_model.")})
    vae = single.convert_ldm_vae_checkpoint({k: v for k, v in tensors.items() if k.startswith("first_stage_model.")},
                                            dict(refs["vae"].config))
    for converted, ref in ((mmdit, refs["transformer"]), (vae, refs["vae"])):
        expected = ref.state_dict()
        assert sorted(converted) == sorted(expected)
        assert all(torch.equal(converted[k].reshape(expected[k].shape), expected[k]) for k in expected)
    path = folder.parent / "sd3_tiny_incl_clips.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path, tensors


def test_a_stability_single_file_loads_the_network_its_diffusers_folder_does(diffusers_folder, stability_file):
    """The same random weights from Stability's single file and from the diffusers folder
    give KerasHub's backbone the same values, every weight (so every parity above holds
    for the file); T5's tensors are left unread."""
    from sdanim.core.runtime import import_keras
    from sdanim.formats.sd3_files import read_sd3_file, read_sd3_folder

    folder, _, _ = diffusers_folder
    path, _ = stability_file
    assert sd3.weight_kind(str(path)) == "stability"
    parts = read_sd3_file(str(path))
    assert parts.transformer_config == {"num_layers": TINY_35.num_layers,
                                        "dual_attention_layers": list(TINY_35.dual_attention),
                                        "qk_norm": TINY_35.qk_norm}
    keras = import_keras()
    backbones = []
    for seed, loaded in ((1, parts), (2, read_sd3_folder(str(folder)))):
        keras.utils.set_random_seed(seed)  # different random starts: every weight must be overwritten
        backbone = sd3.build_backbone(TINY_35, SIZE, SIZE, "float32")
        sd3.load_diffusers(backbone, loaded, TINY_35, str(path))
        backbones.append(backbone)
    ours, theirs = ([w.path, np.asarray(w)] for w in backbones[0].weights), list(backbones[1].weights)
    pairs = list(zip(ours, theirs))
    assert len(pairs) == len(backbones[0].weights) == len(backbones[1].weights) > 100
    for (name, value), other in pairs:
        assert np.array_equal(value, np.asarray(other)), name


def test_a_single_file_without_its_text_encoders_or_with_a_stray_tensor_is_one_line(stability_file, tmp_path,
                                                                                    capsys):
    torch = require("torch")
    from safetensors.torch import save_file

    _, tensors = stability_file
    without = tmp_path / "sd3.5_medium.safetensors"  # as Stability ships 3.5: no CLIPs in the file
    save_file({k: v.contiguous() for k, v in tensors.items() if not k.startswith("text_encoders.")}, str(without))
    assert main(["morph", "a", "b", "--model", "sd3.5-medium", "--weights", str(without), "--out",
                 str(tmp_path / "a.gif")]) == 2
    err = capsys.readouterr().err
    assert "lacks CLIP-L (text_encoders.clip_l.*), CLIP-G (text_encoders.clip_g.*)" in err and err.count("\n") == 1
    stray = tmp_path / "stray.safetensors"
    save_file({**{k: v.contiguous() for k, v in tensors.items()}, "model_ema.decay": torch.ones(1)},
              str(stray))
    assert main(["morph", "a", "b", "--model", "sd3.5-medium", "--weights", str(stray), "--out",
                 str(tmp_path / "b.gif")]) == 2
    err = capsys.readouterr().err
    assert "'model_ema.decay'" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "a_frames") and not os.path.exists(tmp_path / "b_frames")


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "net.0.proj", "net.2", "linear", "context_embedder", "proj_out", "linear_1", "linear_2"]


def _reference_with_lora(config, rank=4, alpha=8.0):
    """The reference transformer with a PEFT LoRA on every kind of linear layer its
    trainers adapt (attention, feed-forward, the modulations, embedders, the output),
    its A and B drawn at random (PEFT starts B at zero: a LoRA that changes nothing)."""
    torch = require("torch")
    peft = require("peft")
    ref = _reference_transformer(config)
    base = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    ref.add_adapter(peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5 * 0.5)
    return ref, base


def _diffusers_lora_file(ref, path, rank, alpha):
    """What diffusers' `save_lora_weights` writes (`transformer.` + PEFT's names), plus
    each module's alpha (files without one take alpha = rank)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = {f"transformer.{k}": v.contiguous() for k, v in get_peft_model_state_dict(ref).items()}
    for key in [k for k in state if k.endswith(".lora_A.weight")]:
        state[key.replace(".lora_A.weight", ".alpha")] = require("torch").tensor(alpha)
    save_file(state, str(path))
    return state


def _kohya_lora_file(state, path, layers, rank, alpha):
    """The same LoRA as a kohya SD3 file names it (sd-scripts: Stability's modules,
    `lora_unet_joint_blocks_N_x_block_attn_qkv`): each q/k/v triple one LoRA of rank 3r on
    the fused qkv (downs stacked, ups block-diagonal), the (scale, shift) modulations'
    ups in Stability's (shift, scale) order."""
    torch = require("torch")
    from safetensors.torch import save_file

    lora = {k[len("transformer."):]: v for k, v in state.items() if not k.endswith(".alpha")}
    out = {}

    def put(ours, theirs, swap=False):
        down, up = lora.pop(f"{theirs}.lora_A.weight"), lora.pop(f"{theirs}.lora_B.weight")
        if swap:
            up = torch.cat(up.chunk(2)[::-1])
        name = "lora_unet_" + ours.replace(".", "_")
        out.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                    f"{name}.alpha": torch.tensor(alpha)})

    def fuse(ours, theirs):
        downs = [lora.pop(f"{t}.lora_A.weight") for t in theirs]
        ups = [lora.pop(f"{t}.lora_B.weight") for t in theirs]
        name = "lora_unet_" + ours.replace(".", "_")
        out.update({f"{name}.lora_down.weight": torch.cat(downs), f"{name}.lora_up.weight": torch.block_diag(*ups),
                    f"{name}.alpha": torch.tensor(3 * alpha)})  # (alpha / rank) kept: 3 alpha / 3 r

    put("context_embedder", "context_embedder")
    for k in (1, 2):
        put(f"t_embedder.mlp.{2 * k - 2}", f"time_text_embed.timestep_embedder.linear_{k}")
        put(f"y_embedder.mlp.{2 * k - 2}", f"time_text_embed.text_embedder.linear_{k}")
    for i in range(layers):
        b, x, c = f"transformer_blocks.{i}", f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
        fuse(f"{x}.attn.qkv", [f"{b}.attn.to_{p}" for p in "qkv"])
        fuse(f"{c}.attn.qkv", [f"{b}.attn.add_{p}_proj" for p in "qkv"])
        if f"{b}.attn2.to_q.lora_A.weight" in lora:
            fuse(f"{x}.attn2.qkv", [f"{b}.attn2.to_{p}" for p in "qkv"])
            put(f"{x}.attn2.proj", f"{b}.attn2.to_out.0")
        put(f"{x}.attn.proj", f"{b}.attn.to_out.0")
        put(f"{x}.adaLN_modulation.1", f"{b}.norm1.linear")
        put(f"{c}.adaLN_modulation.1", f"{b}.norm1_context.linear", swap=i == layers - 1)
        put(f"{x}.mlp.fc1", f"{b}.ff.net.0.proj")
        put(f"{x}.mlp.fc2", f"{b}.ff.net.2")
        if i < layers - 1:
            put(f"{c}.attn.proj", f"{b}.attn.to_add_out")
            put(f"{c}.mlp.fc1", f"{b}.ff_context.net.0.proj")
            put(f"{c}.mlp.fc2", f"{b}.ff_context.net.2")
    put("final_layer.linear", "proj_out")
    put("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    assert not lora, sorted(lora)[:3]
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))


def _call(model_or_ref, inputs, torch=None):
    latent, t, seq, pooled = inputs
    if torch is None:
        return np.asarray(model_or_ref.diffusion_model([latent, t, _packed(seq, pooled)]))
    with torch.no_grad():
        return model_or_ref(hidden_states=torch.from_numpy(latent.transpose(0, 3, 1, 2)),
                            encoder_hidden_states=torch.from_numpy(seq), pooled_projections=torch.from_numpy(pooled),
                            timestep=torch.from_numpy(t[:, 0])).sample.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("config", [TINY, TINY_35], ids=["sd3", "sd3.5-mmdit-x"])
def test_sd3_loras_in_diffusers_and_kohya_names_give_diffusers_output(config, tmp_path):
    """A PEFT LoRA on every linear kind of the MMDiT, as diffusers saves it and as a kohya
    SD3 file names it (fused qkv), merged by sdanim: the reference transformer's output
    with the adapter on; removed, the base weights come back bit for bit."""
    torch = require("torch")
    rank, alpha = 4, 8.0
    ref, base = _reference_with_lora(config, rank, alpha)
    model = _model_with_state(base, config)
    rng = np.random.default_rng(2)
    inputs = (rng.standard_normal((2, LATENT, LATENT, 16)).astype(np.float32), np.array([[700.0], [31.5]], np.float32),
              rng.standard_normal((2, sd3.SEQUENCE_TOKENS, sd3.CONTEXT_WIDTH)).astype(np.float32),
              rng.standard_normal((2, 80)).astype(np.float32))
    before = _call(model, inputs)
    expected = _call(ref, inputs, torch)
    ref.disable_adapters()
    without = _call(ref, inputs, torch)
    scale = np.abs(expected).max()
    assert np.abs(expected - without).max() > 0.05 * scale  # the LoRA changes the output
    state = _diffusers_lora_file(ref, tmp_path / "pytorch_lora_weights.safetensors", rank, alpha)
    _kohya_lora_file(state, tmp_path / "kohya.safetensors", config.num_layers, rank, alpha)
    weights_before = [np.array(v.numpy()) for v in model.backbone.diffuser.weights]
    for name in ("pytorch_lora_weights.safetensors", "kohya.safetensors"):
        model.set_loras([str(tmp_path / name)])
        assert np.abs(_call(model, inputs) - expected).max() <= 1e-4 * scale, name
        assert model.lora_records[0]["file"] == name
    model.set_loras([])
    assert all(np.array_equal(np.array(v.numpy()), w) for v, w in zip(model.backbone.diffuser.weights, weights_before))
    assert np.array_equal(_call(model, inputs), before)


def _model_with_state(state, config):
    """sdanim's SD3 model with a diffusers transformer's tensors (`state`) in its MMDiT."""
    from sdanim.core.runtime import import_keras
    from sdanim.formats.sd3_files import mmdit_weights

    import_keras().utils.set_random_seed(0)
    backbone = sd3.build_backbone(config, SIZE, SIZE, "float32")
    sd3.assign(backbone.diffuser, mmdit_weights(state, config.num_layers, config.dual_attention, config.qk_norm),
               "the reference transformer")
    return sd3.wrap("sd3-medium", backbone, SIZE, SIZE, "random", "float32")


def test_an_sd3_lora_that_does_not_fit_is_one_line_and_changes_nothing(tiny_model, tmp_path):
    """An SD 1.x LoRA, and one of another width: one line each, the weights as they were."""
    from safetensors.numpy import save_file
    from sdanim.formats.lora_files import LoraError

    r = np.ones((4, 8), np.float32)
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": r,
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": r.T.copy()},
              str(tmp_path / "sd1.safetensors"))
    save_file({"transformer.proj_out.lora_A.weight": np.ones((4, 7), np.float32),
               "transformer.proj_out.lora_B.weight": np.ones((64, 4), np.float32)}, str(tmp_path / "wide.safetensors"))
    weights = [np.array(v.numpy()) for v in tiny_model.backbone.diffuser.weights]
    for name, match in (("sd1", "1 with no matching layer (lora_unet_down_blocks_0_attentions_0_proj_in)"),
                        ("wide", "1 of the wrong shape (transformer.proj_out (64, 7))")):
        with pytest.raises(LoraError, match=re.escape(match)) as error:
            tiny_model.set_loras([str(tmp_path / f"{name}.safetensors")])
        assert "\n" not in str(error.value) and str(error.value).endswith(f"{name}.safetensors'")
    assert all(np.array_equal(np.array(v.numpy()), w) for v, w in zip(tiny_model.backbone.diffuser.weights, weights))


def test_sd3_loras_of_clip_l_and_g_give_transformers_embeddings(diffusers_folder, tmp_path):
    """A PEFT LoRA on CLIP-L's and CLIP-G's attention and MLP layers, as diffusers saves
    it (`text_encoder.`, `text_encoder_2.`) and as kohya names it (`lora_te1_`, `lora_te2_`):
    the prompt embeddings of the reference encoders with the adapters on."""
    import copy

    torch = require("torch")
    peft = require("peft")
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    from sdanim.model.stable_diffusion import prompt_encoder

    _, refs, model = diffusers_folder
    refs = dict(refs)
    diffusers_file, kohya_file = {}, {}
    gen = torch.Generator().manual_seed(4)
    for name, kohya in (("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        refs[name] = copy.deepcopy(refs[name])
        peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=4, target_modules=[
            "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]), refs[name])
        with torch.no_grad():
            for p_name, p in refs[name].named_parameters():
                if "lora_" in p_name:
                    p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
        for key, value in get_peft_model_state_dict(refs[name]).items():
            diffusers_file[f"{name}.{key}"] = value.contiguous()
            module, kind = key.rsplit(".lora_", 1)
            kohya_key = kohya + module.replace(".", "_") + (".lora_down.weight" if kind == "A.weight" else ".lora_up.weight")
            kohya_file[kohya_key] = value.contiguous()
            kohya_file[kohya + module.replace(".", "_") + ".alpha"] = torch.tensor(4.0)
    save_file(diffusers_file, str(tmp_path / "te.safetensors"))
    save_file(kohya_file, str(tmp_path / "te_kohya.safetensors"))
    prompts = ["a lighthouse at dawn", ""]
    encoder = prompt_encoder(model)
    tokens = np.array([encoder.tokenize(p) for p in prompts], np.int32)
    seq, pooled = _reference_text(refs, tokens, torch)
    base_seq, _ = _reference_text({k: v for k, v in diffusers_folder[1].items()}, tokens, torch)
    scale = max(np.abs(seq).max(), np.abs(pooled).max())
    assert np.abs(seq - base_seq).max() > 0.05 * scale  # the LoRA changes the embeddings
    try:
        for name in ("te.safetensors", "te_kohya.safetensors"):
            model.set_loras([str(tmp_path / name)])
            ours = prompt_encoder(model).encode(prompts)
            assert np.abs(ours[:, :154] - seq).max() <= 1e-4 * scale, name
            assert np.abs(ours[:, 154, :80] - pooled).max() <= 1e-4 * scale, name
    finally:
        model.set_loras([])
    ours = prompt_encoder(model).encode(prompts)
    assert np.abs(ours[:, :154] - base_seq).max() <= 1e-4 * scale  # removed: the base encoders again


@pytest.fixture(scope="module")
def taesd3(tmp_path_factory):
    """diffusers' AutoencoderTiny with 16 latent channels (TAESD3's shape), every weight
    random, and its decoder saved as madebyollin/taesd's taesd3_decoder.pth."""
    torch = require("torch")
    diffusers = require("diffusers")
    from test_taesd import _original, _write

    torch.manual_seed(7)
    vae = diffusers.AutoencoderTiny(latent_channels=16).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return vae, _write(tmp_path_factory.mktemp("taesd3") / "taesd3_decoder.pth", _original(vae.state_dict(), "decoder"))


def test_the_tiny_decoder_taesd3_decodes_the_samplers_latents_as_autoencoder_tiny(tiny_model, taesd3):
    """--decoder tiny on SD3: the renderer hands TAESD3 the latents it sampled (the space
    ComfyUI feeds taesd3: SD3's VAE latent minus 0.0609, times 1.5305), and the frames are
    diffusers' AutoencoderTiny(latent_channels=16) decode of them, within 1 level."""
    torch = require("torch")
    import sdanim
    from sdanim.model.stable_diffusion import prompt_encoder
    from sdanim.render.jobs import make_renderer

    vae, path = taesd3
    settings = sdanim.RenderSettings(height=SIZE, width=SIZE, scheduler="flow_euler", num_steps=2, decoder="tiny")
    tiny_model.taesd = path
    try:
        renderer = make_renderer(tiny_model, settings)
        contexts = prompt_encoder(tiny_model).encode(["a red cube", "a blue sphere"])
        noises = np.random.default_rng(3).standard_normal((2, LATENT, LATENT, 16)).astype(np.float32)
        latents = np.array(renderer.sample_latents(contexts, noises, [1, 2]))
        images = renderer.render(contexts, noises, [1, 2])
    finally:
        tiny_model.taesd, tiny_model._tiny_decoder = None, None
    with torch.no_grad():
        decoded = vae.decode(torch.from_numpy(latents).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
    expected = np.clip(np.round((decoded + 1) * 127.5), 0, 255)
    assert images.shape == (2, SIZE, SIZE, 3) and expected.std() > 5  # a picture, not a flat field
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1


def test_taesd3_weights_that_do_not_fit_are_one_line(taesd3, tmp_path):
    """SD 1.x's TAESD given to SD3 (by its name, or by its 4 channels under another name),
    and no TAESD3 at all: one line naming the file."""
    from sdanim.config.errors import SdanimError
    from sdanim.model.taesd import SD3_LATENT_CHANNELS, check_taesd
    from test_taesd import _original, _write

    torch = require("torch")
    diffusers = require("diffusers")
    torch.manual_seed(0)
    four = _original(diffusers.AutoencoderTiny().state_dict(), "decoder")
    for name, match in (("taesd_decoder.pth", r"for other latents \(SD 1\.x/2\.x, SDXL, FLUX, Sana\), not SD3"),
                        ("mine.pth", r"latents with 4 channels \(SD 1\.x/2\.x or SDXL\), not SD3's 16")):
        with pytest.raises(SdanimError, match=match + r".*Received: taesd='.*" + re.escape(name) + "'$"):
            check_taesd(_write(tmp_path / name, four), channels=SD3_LATENT_CHANNELS)
    with pytest.raises(SdanimError, match=r"^SD3's tiny decoder needs TAESD3 weights given with --taesd .*"
                                          r"Received: taesd=None$"):
        check_taesd(None, channels=SD3_LATENT_CHANNELS)
    assert check_taesd(taesd3[1], channels=SD3_LATENT_CHANNELS).record()["decoder"]["file"] == "taesd3_decoder.pth"
