"""ControlNet (sdanim.model.controlnet) against diffusers' ControlNetModel holding the same
random weights, on tiny UNets of SD 1.x's and 2.x's structure: the residuals, the UNet
with them, and a few-step StableDiffusionControlNetPipeline run (two nets, guess mode,
start/end) ending on the same latents. Every parameter is drawn at random first: a
fresh ControlNet's zero convolutions make every residual exactly 0, and parity on that
proves nothing. The weight layouts (a diffusers folder, lllyasviel's `control_model.*`,
bare original keys) load to one network; the original names are checked against
diffusers' own single-file converter. (The real SD 1.5 shapes: tests/test_heavy_controlnet.py.)"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import relative_gap, require

torch = require("torch")
diffusers = require("diffusers")

from sdanim.config.control import ControlNetSpec  # noqa: E402
from sdanim.config.errors import SdanimError  # noqa: E402
from sdanim.config.settings import RenderSettings  # noqa: E402
from sdanim.core.schedulers import timestep_embedding  # noqa: E402
from sdanim.formats.checkpoints import Checkpoint  # noqa: E402
from sdanim.formats.controlnet_files import inspect_controlnet  # noqa: E402
from sdanim.formats.tensors import CheckpointError, LazyTensor  # noqa: E402
from sdanim.formats.weight_map import bind, spec  # noqa: E402
from sdanim.model.controlnet import ControlUnit, controlled_unet, load_controlnet  # noqa: E402
from sdanim.render.sampling import ControlBatch, Renderer  # noqa: E402
from tiny import TINY_SD, make_tiny_sd_model  # noqa: E402

CONTEXT = {False: 768, True: 1024}  # SD 1.x and 2.x context widths (the tiny UNets take them too)


@pytest.fixture(autouse=True)
def _tanh_geglu(monkeypatch):
    """diffusers' GEGLU with the tanh GELU approximation KerasCV's uses."""
    import sd_reference

    sd_reference.use_tanh_geglu(monkeypatch)


def _configs(linear: bool) -> tuple:
    channels = TINY_SD["channels"]
    common = dict(in_channels=4, layers_per_block=2, block_out_channels=channels,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), norm_num_groups=32,
                  cross_attention_dim=CONTEXT[linear], attention_head_dim=TINY_SD["heads"][0],
                  use_linear_projection=linear)
    unet = dict(common, sample_size=8, out_channels=4, up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    return unet, common


def _with_sd_time_embedding(module):
    """The time embedding on SD's 320-wide sinusoid (what sdanim's UNets take: KerasCV's
    timestep embedding is 320 wide at any channel count), not the tiny channels' 32."""
    from diffusers.models.embeddings import Timesteps

    module.time_proj = Timesteps(320, flip_sin_to_cos=True, downscale_freq_shift=0)
    linear = module.time_embedding.linear_1
    module.time_embedding.linear_1 = torch.nn.Linear(320, linear.out_features)
    return module


def randomize_everything(module, seed: int) -> None:
    """Every parameter drawn at random, zero-initialised ones included: weights around
    1 / sqrt(fan-in), norm scales around 1, biases around 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                base = 1.0 if name.endswith("weight") and "norm" in name else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(fan_in))


def _lazy(state: dict, prefix: str = "") -> dict:
    return {prefix + k: LazyTensor(tuple(v.shape), lambda v=v: v.detach().float().numpy()) for k, v in state.items()}


def reference_models(linear: bool, nets: int = 2, seed: int = 0) -> tuple:
    """A tiny diffusers UNet and `nets` ControlNets of SD 1.x's (2.x's: linear) structure,
    every parameter random."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet_config, net_config = _configs(linear)
    torch.manual_seed(seed)
    unet = _with_sd_time_embedding(UNet2DConditionModel(**unet_config)).eval()
    randomize_everything(unet, seed + 1)
    controlnets = []
    for k in range(nets):
        net = _with_sd_time_embedding(ControlNetModel(**net_config)).eval()
        randomize_everything(net, seed + 10 + k)
        controlnets.append(net)
    return unet, controlnets


def keras_pair(unet, nets, folder, linear: bool) -> tuple:
    """sdanim's tiny model with the reference UNet's weights, and the nets saved as
    diffusers folders and loaded by sdanim: (model, paths, loaded nets)."""
    paths = []
    for k, net in enumerate(nets):
        net.save_pretrained(str(folder / f"net{k}"), safe_serialization=True)
        paths.append(str(folder / f"net{k}"))
    model = make_tiny_sd_model(linear=linear, context_dim=CONTEXT[linear])
    bind(model.diffusion_model, Checkpoint("reference", "diffusers", "1.4", _lazy(unet.state_dict(), "unet.")),
         "diffusion_model")
    loaded = [load_controlnet(model.diffusion_model, inspect_controlnet(p), model.version) for p in paths]
    return model, paths, loaded


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """SD 1.x's structure, tiny (SD 2.x's, and the real shapes: tests/test_heavy_controlnet.py)."""
    unet, nets = reference_models(linear=False)
    model, paths, loaded = keras_pair(unet, nets, tmp_path_factory.mktemp("controlnets"), linear=False)
    return {"unet": unet, "nets": nets, "paths": paths, "model": model, "loaded": loaded, "linear": False,
            "version": "1.4"}


def _inputs(batch: int, context_dim: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"latent": rng.standard_normal((batch, 8, 8, 4), dtype=np.float32),
            "context": rng.standard_normal((batch, 77, context_dim), dtype=np.float32),
            "hint": rng.uniform(0, 1, (batch, 64, 64, 3)).astype(np.float32),
            "t": [981, 499][:batch]}


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def test_residuals_and_the_unet_with_them_match_diffusers(pair):
    x = _inputs(2, CONTEXT[pair["linear"]])
    t_emb = np.stack([timestep_embedding(t) for t in x["t"]]).astype(np.float32)
    with torch.no_grad():
        down, mid = pair["nets"][0](_nchw(x["latent"]), torch.tensor(x["t"]), torch.from_numpy(x["context"]),
                                    _nchw(x["hint"]), return_dict=False)
        expected = [r.permute(0, 2, 3, 1).numpy() for r in (*down, mid)]
        eps = pair["unet"](_nchw(x["latent"]), torch.tensor(x["t"]), torch.from_numpy(x["context"]),
                           down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    ours = pair["loaded"][0].net([x["latent"], t_emb, x["context"], x["hint"]])
    assert len(ours) == 13
    gaps = [relative_gap(np.asarray(o), e) for o, e in zip(ours, expected)]
    assert max(gaps) < 1e-4, gaps
    assert min(float(np.abs(e).max()) for e in expected) > 1e-2  # random zero convs: no residual is ~0
    unet = controlled_unet(pair["model"].diffusion_model)
    ours_eps = np.asarray(unet([x["latent"], t_emb, x["context"], *[np.asarray(o) for o in ours]]))
    expected_eps = eps.permute(0, 2, 3, 1).numpy()
    assert relative_gap(ours_eps, expected_eps) < 1e-4
    plain = np.asarray(pair["model"].diffusion_model([x["latent"], t_emb, x["context"]]))
    assert relative_gap(plain, expected_eps) > 1e-2  # the residuals change the prediction


@pytest.mark.slow
def test_a_few_pipeline_steps_with_two_nets_end_on_diffusers_latents(pair):
    """StableDiffusionControlNetPipeline with both nets at their own scales, one net in
    a window of the steps, and guess mode; the same embeddings, hints and starting
    noise: the same final latents."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionControlNetPipeline
    from diffusers import MultiControlNetModel

    dim = CONTEXT[pair["linear"]]
    x = _inputs(2, dim, seed=3)
    hints = [x["hint"], np.random.default_rng(9).uniform(0, 1, x["hint"].shape).astype(np.float32)]
    negative = np.random.default_rng(4).standard_normal((77, dim), dtype=np.float32)
    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1).eval()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, timestep_spacing="linspace")
    pipe = StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=pair["unet"], controlnet=MultiControlNetModel(pair["nets"]),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    steps, scales, starts, ends = 4, (0.8, 0.5), (0.0, 0.25), (1.0, 0.75)
    results = {}
    for guess in (False, True):
        with torch.no_grad():
            expected = pipe(prompt_embeds=torch.from_numpy(x["context"]),
                            negative_prompt_embeds=torch.from_numpy(np.repeat(negative[None], 2, 0)),
                            image=[_nchw(h) for h in hints], latents=_nchw(x["latent"]), num_inference_steps=steps,
                            guidance_scale=7.5, controlnet_conditioning_scale=list(scales), guess_mode=guess,
                            control_guidance_start=list(starts), control_guidance_end=list(ends),
                            output_type="latent").images.permute(0, 2, 3, 1).numpy()
        settings = RenderSettings(height=64, width=64, num_steps=steps, guidance_scale=7.5, scheduler="euler")
        units = [ControlUnit(net, guess, s, e) for net, s, e in zip(pair["loaded"], starts, ends)]
        renderer = Renderer(pair["model"].diffusion_model, pair["model"].decoder, settings, negative, controls=units)
        control = ControlBatch(tuple(hints), np.array([[s, s] for s in scales], np.float32))
        ours = np.asarray(renderer.sample_latents(x["context"], x["latent"], [0, 1], control=control))
        assert relative_gap(ours, expected) < 1e-4, (guess, relative_gap(ours, expected))
        results[guess] = ours
    assert relative_gap(results[True], results[False]) > 1e-2  # guess mode changes the result


@pytest.mark.slow
def test_the_program_loop_gives_the_step_loops_frames_and_scale_zero_is_no_controlnet(pair):
    """Both nets (the pipeline test's step function, traced once), one compiled program
    and the step loop: within 1 level. Scale 0, and a schedule that never acts, give the
    plain render bit for bit."""
    model = pair["model"]
    x = _inputs(2, CONTEXT[pair["linear"]], seed=5)
    negative = np.zeros((77, CONTEXT[pair["linear"]]), np.float32)
    settings = RenderSettings(height=64, width=64, num_steps=3, guidance_scale=7.5, scheduler="ddim")
    hints = (x["hint"], x["hint"][::-1])

    def render(loop, scale, end=1.0, nets=2):
        units = [ControlUnit(net, False, 0.0, end) for net in pair["loaded"][:nets]]
        renderer = Renderer(model.diffusion_model, model.decoder, settings, negative, loop=loop, controls=units)
        control = ControlBatch(hints[:nets], np.full((nets, 2), scale, np.float32)) if nets else None
        return renderer.render(x["context"], x["latent"], [0, 1], control=control)

    steps, program = render("steps", 1.0), render("program", 1.0)
    assert np.abs(steps.astype(int) - program.astype(int)).max() <= 1
    plain = render("steps", 0.0, nets=0)
    assert np.abs(steps.astype(int) - plain.astype(int)).max() > 10
    assert np.array_equal(render("steps", 0.0), plain)  # scale 0: the plain render, bit for bit
    assert np.array_equal(render("program", 1.0, end=0.0), render("program", 0.0, nets=0))  # never acts: likewise


def _original_state(state: dict, version: str) -> dict:
    """diffusers' ControlNet names -> lllyasviel's (`control_model.*`), by sdanim's map."""
    out = {}
    for leaf in spec("controlnet", version):
        d, o = leaf["diffusers"], leaf["original"]
        for dk, ok in zip(d.keys(d.bases[0]), o.keys(o.bases[0])):
            out["control_model." + ok] = state[dk]
    assert len(out) == len(state)  # every tensor has an original name
    return out


def _bound(file) -> dict:
    """What binding a file would write into each leaf of the network: {leaf: arrays}."""
    out = {}
    for n, leaf in enumerate(spec("controlnet", file.version)):
        source = leaf[file.layout]
        out[n] = [file.tensors[k].load() for k in source.keys(source.bases[0])]
    return out


def test_every_layout_loads_to_one_network_and_original_names_match_diffusers_converter(pair, tmp_path):
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from safetensors.torch import save_file

    net = pair["nets"][1]
    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    original = _original_state(state, pair["version"])
    converted = convert_controlnet_checkpoint(dict(original), {"layers_per_block": 2})
    assert sorted(converted) == sorted(state)
    assert all(torch.equal(converted[k], state[k]) for k in state)  # diffusers reads our names as its own
    save_file(original, str(tmp_path / "control_v11p_sd15_test.safetensors"))
    torch.save({k[len("control_model."):]: v for k, v in original.items()}, str(tmp_path / "bare.pth"))
    save_file(state, str(tmp_path / "diffusers_named.safetensors"))
    reference = _bound(inspect_controlnet(pair["paths"][1]))
    for name in ("control_v11p_sd15_test.safetensors", "bare.pth", "diffusers_named.safetensors"):
        file = inspect_controlnet(str(tmp_path / name))
        assert (file.version, file.pooled, file.layout) == (pair["version"], False,
                                                            "diffusers" if "diffusers" in name else "original")
        bound = _bound(file)  # every leaf of the network gets the same values from each layout
        assert all(np.array_equal(a, b) for n in reference for a, b in zip(bound[n], reference[n])), name
    # The loaded network holds the folder's values (bound through the same map).
    weights = pair["loaded"][1].net
    from sdanim.formats.weight_map import _variables, keras_leaves

    values = [np.asarray(v) for layer in keras_leaves(weights) for v, _ in _variables(layer)]
    first = reference[0][0]  # time_embedding.linear_1.weight, (out, in): Keras holds it transposed
    assert np.array_equal(values[0], first.T)


def test_pooling_and_wrong_files_are_told_from_the_files(pair, tmp_path):
    import yaml
    from safetensors.numpy import save_file

    state = {k: v.detach().numpy() for k, v in pair["nets"][0].state_dict().items()}
    save_file(state, str(tmp_path / "control_v11e_sd15_shuffle.safetensors"))
    assert inspect_controlnet(str(tmp_path / "control_v11e_sd15_shuffle.safetensors")).pooled  # lllyasviel's name
    save_file(state, str(tmp_path / "mine.safetensors"))
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(
        {"model": {"params": {"control_stage_config": {"params": {"global_average_pooling": True}}}}}))
    assert inspect_controlnet(str(tmp_path / "mine.safetensors")).pooled
    save_file(state, str(tmp_path / "odd.safetensors"))
    for text, reason in (("model: {params: {}}\n", r"no model\.params\.control_stage_config\.params"),
                         ("model: [unclosed\n", r".+")):
        (tmp_path / "odd.yaml").write_text(text)  # a .yaml there says something: never ignored
        with pytest.raises(CheckpointError, match=rf"^the \.yaml beside the ControlNet is not a ControlNet config "
                                                  rf"\({reason}\); fix or remove .*odd\.yaml\. Received: controlnet="):
            inspect_controlnet(str(tmp_path / "odd.safetensors"))
    cases = {
        "lora.safetensors": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.zeros((4, 32), "f")},
                             r"not a ControlNet for SD 1\.x/2\.x .*a LoRA\)"),
        "model.safetensors": ({"model.diffusion_model.input_blocks.0.0.weight": np.zeros((320, 4, 3, 3), "f")},
                              r"a Stable Diffusion checkpoint"),
        "cut.safetensors": ({k: v for k, v in state.items() if "controlnet_down_blocks.3" not in k},
                            r"does not fit Stable Diffusion .*2 missing tensors \(controlnet_down_blocks\.3\.weight"),
    }
    for name, (tensors, match) in cases.items():
        save_file(tensors, str(tmp_path / name))
        with pytest.raises(SdanimError, match=match + r".*Received: controlnet='.*" + name.replace(".", r"\.")):
            inspect_controlnet(str(tmp_path / name))
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(SdanimError, match=r"Received: controlnet='.*photo\.png'"):
        inspect_controlnet(str(tmp_path / "photo.png"))
    other = "1.4" if pair["version"] == "2.1" else "2.1"
    with pytest.raises(SdanimError, match=rf"this ControlNet is for Stable Diffusion {pair['version'][0]}\.x and the "
                                          rf"model is {other[0]}\.x"):
        load_controlnet(pair["model"].diffusion_model, inspect_controlnet(pair["paths"][0]), other)
    with pytest.raises(SdanimError, match=r"control_end must be a fraction of the steps in \[0, 1\]"):
        ControlNetSpec(pair["paths"][0], end=1.5)


def _picture(seed: int, size: int = 64) -> np.ndarray:
    """Blocky shapes: edges for canny and line art to find."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
    return np.repeat(np.repeat(blocks, 16, 0), 16, 1)


@pytest.mark.slow
def test_morph_follows_a_folder_of_control_images_records_them_and_resumes(pair, tmp_path, monkeypatch, capsys):
    """Through the command line: each frame follows its own control image (frame i
    changes when only image i does), the manifest records the net and its hints, a rerun
    resumes, another scale is refused, and scale 0 is the render without ControlNet."""
    from PIL import Image

    from sdanim.frontends.cli import main, options

    from conftest import read_manifest

    monkeypatch.setattr(options, "model_for", lambda args, settings: pair["model"])
    folder = tmp_path / "video"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(_picture(i)).save(folder / f"f{i}.png")
    common = ["a red house", "a blue boat", "--frames", "4", "--size", "64x64", "--steps", "2", "--batch-size", "2",
              "--quiet", "--controlnet", pair["paths"][0], "--control-image", str(folder),
              "--control-preprocess", "canny"]
    def frames(name):  # the rendered PNGs (a GIF's palette is shared by its frames)
        return [np.asarray(Image.open(tmp_path / f"{name}_frames" / f"frame_{i:05d}.png")) for i in range(4)]

    assert main(["morph", *common, "--out", str(tmp_path / "a.gif")]) == 0
    first = frames("a")
    record = read_manifest(tmp_path / "a_frames")["controlnets"][0]
    assert record["file"] == "net0" and len(record["sha256"]) == 64 and record["preprocess"] == "canny"
    assert record["hints"]["count"] == 4 and record["hints"]["at"] == "frames"
    assert main(["morph", *common, "--out", str(tmp_path / "a.gif")]) == 0
    assert "0 rendered" in capsys.readouterr().out  # resumed: every frame on disk
    # Another scale for the same frames folder: refused in one line, nothing lost.
    assert main(["morph", *[a.replace(pair["paths"][0], pair["paths"][0] + ":0.5") for a in common],
                 "--out", str(tmp_path / "a.gif")]) == 2
    err = capsys.readouterr().err
    assert "belongs to another run (controlnets[0].scale: 1.0 on disk, 0.5 now)" in err, err
    assert err.count("\n") == 1, err
    # Only the third control image changes: only frame 2 changes.
    Image.fromarray(_picture(9)).save(folder / "f2.png")
    assert main(["morph", *common, "--out", str(tmp_path / "b.gif")]) == 0
    second = frames("b")
    changed = [int(np.abs(x.astype(int) - y.astype(int)).max()) for x, y in zip(first, second)]
    assert changed[2] > 0 and changed[0] == changed[1] == changed[3] == 0, changed
    # Scale 0: the frames of the same morph without a ControlNet, bit for bit.
    assert main(["morph", *common[:10], "--out", str(tmp_path / "plain.gif")]) == 0
    zero = [a.replace(pair["paths"][0], pair["paths"][0] + ":0") for a in common]
    assert main(["morph", *zero, "--out", str(tmp_path / "zero.gif")]) == 0
    assert all(np.array_equal(x, y) for x, y in zip(frames("plain"), frames("zero")))


def test_bad_controlnet_input_is_one_line_before_anything_renders(pair, tmp_path, monkeypatch, capsys):
    from PIL import Image
    from safetensors.numpy import save_file

    from sdanim.frontends.cli import main, options
    from sdanim.model import loading

    monkeypatch.setattr(options, "model_for", lambda args, settings: pair["model"])
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model was built"))
    Image.fromarray(_picture(1)).save(tmp_path / "photo.png")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.zeros((4, 32), "f")},
              str(tmp_path / "style.safetensors"))
    state = {k: v.detach().numpy() for k, v in reference_models(linear=True, nets=1, seed=3)[1][0].state_dict().items()}
    save_file(state, str(tmp_path / "sd21_net.safetensors"))
    photo = str(tmp_path / "photo.png")
    cases = [
        (["--controlnet", photo, "--control-image", photo], r"controlnet='.*photo\.png'"),
        (["--controlnet", str(tmp_path / "style.safetensors"), "--control-image", photo], r"a LoRA"),
        (["--controlnet", str(tmp_path / "sd21_net.safetensors"), "--control-image", photo],
         r"this ControlNet is for Stable Diffusion 2\.x and the model is 1\.x"),
        (["--controlnet", pair["paths"][0]], r"ControlNet 1 has no image: give --control-image"),
        (["--controlnet", pair["paths"][0], "--control-image", str(tmp_path / "missing.png")],
         r"control_image is not a file"),
        (["--control-image", photo], r"--control-image needs --controlnet FILE"),
        (["--controlnet", pair["paths"][0], "--control-image", photo, "--control-end", "2"],
         r"control_end must be a fraction of the steps in \[0, 1\]\. Received: control_end=2\.0"),
        (["--controlnet", pair["paths"][0], "--controlnet", pair["paths"][1], "--control-image", photo,
          "--control-start", "0", "--control-start", "0.1", "--control-start", "0.2"], r"is given 3 times for 2"),
    ]
    for extra, match in cases:
        out = tmp_path / "bad.gif"
        assert main(["morph", "a", "b", "--frames", "3", "--size", "64x64", "--quiet", "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("sdanim: error: ") and err.count("\n") == 1, err
        assert __import__("re").search(match, err), (match, err)
        assert not (tmp_path / "bad_frames" / "frame_00000.png").exists()


@pytest.mark.slow
def test_the_app_renders_with_an_offered_controlnet_and_refuses_any_other(pair, tmp_path):
    """A network app offers the operator's ControlNets by name; the Animate tab renders
    with one (the manifest records it), and a typed path is refused whether it exists or
    not; Generate takes a net too. The hint preview shows what the net follows."""
    from PIL import Image

    from conftest import free_port, read_manifest
    from test_ui import ARGS

    gr_client = require("gradio_client")
    import sdanim.ui as ui

    Image.fromarray(_picture(5)).save(tmp_path / "photo.png")
    app = ui.launch(model=pair["model"], out_dir=str(tmp_path / "out"), port=free_port(), listen=True, host="127.0.0.1",
                    controlnets=[pair["paths"][0]], limits=ui.Limits(max_frames=8), inline=False,
                    prevent_thread_lock=True)
    try:
        client = gr_client.Client(app.local_url, verbose=False)
        photo = gr_client.handle_file(str(tmp_path / "photo.png"))
        args = dict(ARGS, kf="a red house\na blue boat", frames=2, steps=2)
        control = ["net0", photo, "canny", 1.0, 0.0, 1.0, False]
        done = client.predict(*args.values(), *control, api_name="/render")
        assert done[-1].startswith("Done: 3 frames rendered"), done[-1]
        manifest = [p for p in done[5] if str(p.get("path", p) if isinstance(p, dict) else p).endswith("manifest.json")]
        record = read_manifest(manifest[0]["path"] if isinstance(manifest[0], dict) else manifest[0])["controlnets"][0]
        assert record["file"] == "net0" and record["preprocess"] == "canny"
        for typed in (pair["paths"][0], str(tmp_path / "missing")):
            with pytest.raises(gr_client.exceptions.AppError, match=r"not in the list of choices|this app offers"):
                client.predict(*args.values(), typed, photo, "canny", 1.0, 0.0, 1.0, False, api_name="/render")
        images = client.predict("a cat", "", 4, 1, "64x64", "ddim", 2, 0, 1, *control, api_name="/generate")
        assert len(images) == 1
        hint = client.predict(photo, "canny", api_name="/show_hint")
        with Image.open(hint) as im:
            assert im.size == (64, 64) and np.asarray(im).max() == 255  # white edges on black
    finally:
        app.close()


@pytest.mark.slow
def test_every_image_tool_takes_a_controlnet(pair, tmp_path):
    """img2img, inpaint (the inpaint preprocessor: the image with its masked pixels at -1,
    no image given), outpaint, grid, the step view and image-morph, with a net: each runs,
    follows it (differs from the render without) and records it."""
    import json

    from PIL import Image

    import sdanim

    model = pair["model"]
    settings = RenderSettings(height=64, width=64, num_steps=2, batch_size=2)
    photo = _picture(6)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    net = ControlNetSpec(pair["paths"][0], image=str(tmp_path / "photo.png"), preprocess="lineart")
    kw = dict(settings=settings, model=model, progress=False)
    edited = sdanim.img2img(photo, "a carving", strength=0.7, seed=1, out_dir=str(tmp_path), controlnets=[net], **kw)
    plain = sdanim.img2img(photo, "a carving", strength=0.7, seed=1, out_dir=None, **kw)
    assert np.abs(edited.images.astype(int) - plain.images.astype(int)).max() > 0  # one step at strength 0.7: a little
    record = json.loads(Image.open(edited.paths[0]).text["sdanim"])["controlnets"][0]
    assert record["preprocess"] == "lineart" and record["hints"]["count"] == 1
    mask = np.zeros((64, 64), bool)
    mask[32:] = True
    inpainted = sdanim.inpaint(photo, mask, "a red cube", seed=2, out_dir=None, **kw,
                               controlnets=[ControlNetSpec(pair["paths"][0], preprocess="inpaint")])
    assert np.array_equal(inpainted.images[0][:32], photo[:32])  # outside the mask: the input, exactly
    wide = sdanim.outpaint(photo[:, :48], "a field", right=16, seed=3, out_dir=None, model=model, progress=False,
                           settings=RenderSettings(height=64, width=64, num_steps=2), controlnets=[net])
    assert wide.images[0].shape == (64, 64, 3)
    grid = sdanim.grid(["a cat", "a dog"], seeds=[1, 2], out=None, controlnets=[net], **kw)
    assert grid.cells.shape[:2] == (2, 2)
    steps = sdanim.denoising_steps("a lighthouse", seed=4, show=[1, 2], out=None, controlnets=[net], **kw)
    assert len(steps.images) == 2
    morph = sdanim.image_morph(photo, _picture(7), "a photo", out=str(tmp_path / "im.gif"), frames=3,
                               strength=0.6, controlnets=[net], **kw)
    assert len(morph.frames) == 3


@pytest.mark.slow
def test_a_walk_schedules_images_and_scales_per_keyframe_and_aid_keeps_its_keyframes(pair, tmp_path):
    """A walk file's control_image and control_scale per keyframe: the frame between two
    keyframes takes the blend of their hints at the blended scale (a weight schedule is a
    walk); a keyframe whose scale is 0 is the render without the net. With attention
    interpolation the keyframes' helper rows get their hints: its keyframe frames are
    the plain render's (with the net) bit for bit."""
    from PIL import Image

    import sdanim

    from conftest import read_manifest

    Image.fromarray(_picture(1)).save(tmp_path / "a.png")
    Image.fromarray(_picture(2)).save(tmp_path / "b.png")
    (tmp_path / "walk.yaml").write_text(
        "keyframes:\n"
        "  - {prompt: a red house, seed: 3, frames: 2, control_image: a.png, control_scale: 1.0}\n"
        "  - {prompt: a blue boat, seed: 3, control_image: b.png, control_scale: 0.0}\n")
    walk = sdanim.load_walk(str(tmp_path / "walk.yaml"))
    settings = RenderSettings(height=64, width=64, num_steps=2, batch_size=2)
    net = ControlNetSpec(pair["paths"][0], preprocess="canny")
    kw = dict(settings=settings, model=pair["model"], progress=False)
    walked = sdanim.animate(walk, out=str(tmp_path / "w.gif"), controlnets=[net], **kw)
    plain = sdanim.animate(walk, out=str(tmp_path / "p.gif"), **kw)
    gaps = [int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(walked.frames, plain.frames)]
    assert gaps[0] > 10 and gaps[1] > 0 and gaps[2] == 0, gaps  # scale 1 -> 0.5 -> 0
    record = read_manifest(walked.frames_dir)["controlnets"][0]
    assert record["hints"]["at"] == "keyframes" and record["hints"]["count"] == 2
    assert read_manifest(walked.frames_dir)["walk"]["keyframes"][1]["control_scale"] == 0.0
    aid = sdanim.animate(dataclasses.replace(walk, attention="fused"), out=str(tmp_path / "aid.gif"),
                         controlnets=[net], **kw)
    assert np.array_equal(aid.frames[0], walked.frames[0]) and np.array_equal(aid.frames[2], walked.frames[2])
    assert np.abs(aid.frames[1].astype(int) - walked.frames[1].astype(int)).max() > 0  # the in-between attends
