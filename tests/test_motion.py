"""AnimateDiff motion modules (sdanim.model.motion) against diffusers' UNetMotionModel
holding the same random weights, on a tiny UNet of SD 1.x's structure: every parameter
drawn first (the original modules' zero-initialised proj_out would make every module the
identity, and parity on that proves nothing). The weight layouts (guoyww's original
`.ckpt`, diffusers' MotionAdapter folder) load to the same modules, the original names
checked against diffusers' own single-file converter; versions are told from the tensors,
and anything else is refused in one line."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from conftest import relative_gap, require

torch = require("torch")
diffusers = require("diffusers")

from sdanim.config.errors import SdanimError  # noqa: E402
from sdanim.core.schedulers import timestep_embedding  # noqa: E402
from sdanim.formats.checkpoints import Checkpoint  # noqa: E402
from sdanim.formats.motion_files import inspect_motion_module  # noqa: E402
from sdanim.formats.tensors import CheckpointError  # noqa: E402
from sdanim.formats.weight_map import bind  # noqa: E402
from sdanim.model.motion import load_motion_modules, motion_unet, random_motion_modules  # noqa: E402
import sdanim  # noqa: E402
from test_controlnet import _configs, _lazy, _with_sd_time_embedding, randomize_everything  # noqa: E402
from tiny import TINY_SD, make_tiny_sd_model  # noqa: E402

FRAMES = 4


@pytest.fixture(autouse=True)
def _geglu(monkeypatch):
    """diffusers' GEGLU with KerasCV's tanh GELU in the spatial blocks (sdanim's UNet is
    KerasCV's); the motion modules keep the exact GELU (marked `_erf`), as sdanim's do."""
    import torch.nn.functional as F
    from diffusers.models import activations

    monkeypatch.setattr(activations.GEGLU, "gelu",
                        lambda self, gate: F.gelu(gate, approximate="none" if getattr(self, "_erf", False) else "tanh"))


class _PerFrameNorm(torch.nn.Module):
    """diffusers' motion GroupNorm (on (B, C, F, h, w)) taking each frame's statistics on
    its own: the original modules' normalisation, for the reference."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        b, c, f, h, w = x.shape
        flat = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        return self.norm(flat).reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)


def reference(mid: bool = True, positions: int = 32, seed: int = 0):
    """A tiny diffusers UNetMotionModel (SD 1.x's structure), every parameter random."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from diffusers.models.activations import GEGLU

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**_configs(False)[0])
    adapter = MotionAdapter(block_out_channels=TINY_SD["channels"], motion_layers_per_block=2,
                            motion_num_attention_heads=8, motion_norm_num_groups=32,
                            motion_max_seq_length=positions, use_motion_mid_block=mid)
    motion = _with_sd_time_embedding(UNetMotionModel.from_unet2d(unet, adapter)).eval()
    randomize_everything(motion, seed + 1)
    for name, module in motion.named_modules():
        if "motion_modules" in name and isinstance(module, GEGLU):
            module._erf = True
    return motion


def _original_names(state: dict) -> dict:
    """diffusers' motion module names -> guoyww's original layout (the positions under both
    attention blocks, as the original files store them)."""
    out = {}
    for key, value in state.items():
        block, rest = key.split(".motion_modules.", 1)
        index, rest = rest.split(".", 1)
        prefix = f"{block}.motion_modules.{index}.temporal_transformer."
        if rest.endswith("pos_embed.pe"):
            for k in (0, 1):
                out[prefix + f"transformer_blocks.0.attention_blocks.{k}.pos_encoder.pe"] = value
            continue
        for ours, theirs in ((".attn1.", ".attention_blocks.0."), (".attn2.", ".attention_blocks.1."),
                             (".norm1.", ".norms.0."), (".norm2.", ".norms.1."), (".norm3.", ".ff_norm.")):
            rest = rest.replace(ours, theirs)
        out[prefix + rest] = value
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The reference, sdanim's tiny model bound to its 2-D weights, and its motion modules
    written in both layouts."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("motion")
    motion = reference()
    state = {k: v.detach().contiguous() for k, v in motion.state_dict().items()}
    modules = {k: v for k, v in state.items() if ".motion_modules." in k}
    spatial = {k: v for k, v in state.items() if ".motion_modules." not in k}
    model = make_tiny_sd_model(context_dim=768)
    bind(model.diffusion_model, Checkpoint("reference", "diffusers", "1.4", _lazy(spatial, "unet.")), "diffusion_model")
    (folder / "adapter").mkdir()
    save_file(modules, str(folder / "adapter" / "diffusion_pytorch_model.safetensors"))
    torch.save({"state_dict": _original_names(modules)}, str(folder / "mm_sd_v15_v2.ckpt"))
    paths = {"diffusers": str(folder / "adapter"), "original": str(folder / "mm_sd_v15_v2.ckpt")}
    unet = model.diffusion_model
    return {"reference": motion, "model": model, "modules": modules, "folder": folder, "paths": paths,
            # diffusers' statistics over the window, and the original's per frame (the default),
            # each from one layout (both layouts give the same tensors: tested below)
            "window": load_motion_modules(unet, inspect_motion_module(paths["diffusers"]), norm="window"),
            "frame": load_motion_modules(unet, inspect_motion_module(paths["original"]))}


def _inputs(clips: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    rows = clips * FRAMES
    return {"latent": rng.standard_normal((rows, 8, 8, 4), dtype=np.float32),
            "context": rng.standard_normal((rows, 77, 768), dtype=np.float32),  # each frame its own prompt
            "t": 601}


def _reference_eps(motion, x: dict, clips: int) -> np.ndarray:
    latent = torch.from_numpy(x["latent"]).reshape(clips, FRAMES, 8, 8, 4).permute(0, 4, 1, 2, 3)
    with torch.no_grad():
        eps = motion(latent, torch.tensor(x["t"]), torch.from_numpy(x["context"])).sample  # (B, C, F, h, w)
    return eps.permute(0, 2, 3, 4, 1).reshape(clips * FRAMES, 8, 8, 4).numpy()


def _ours(pair, modules, x: dict, frames: int = FRAMES) -> np.ndarray:
    unet = motion_unet(pair["model"].diffusion_model, modules, frames)
    t_emb = np.repeat(timestep_embedding(x["t"])[None].astype(np.float32), len(x["latent"]), axis=0)
    return np.asarray(unet([x["latent"], t_emb, x["context"]]))


def test_motion_unet_matches_diffusers_with_its_norm_and_with_the_originals(pair):
    """diffusers' statistics over the window (norm="window") and the original's per frame
    (the default), two clips of 4 frames, each frame its own context: sdanim's eps is the
    reference's within 1e-4 of its scale."""
    x = _inputs(clips=2)
    theirs = _reference_eps(pair["reference"], x, clips=2)
    assert relative_gap(_ours(pair, pair["window"], x), theirs) < 1e-4
    per_frame = pair["frame"]
    assert per_frame.config.norm == "frame" and pair["window"].config.norm == "window"
    motion = pair["reference"]
    norms = [(m, m.norm) for name, m in motion.named_modules() if name.endswith(tuple(
        f"motion_modules.{j}" for j in range(3)))]
    try:
        for module, norm in norms:
            module.norm = _PerFrameNorm(norm)
        theirs_per_frame = _reference_eps(motion, x, clips=2)
    finally:
        for module, norm in norms:
            module.norm = norm
    assert relative_gap(_ours(pair, per_frame, x), theirs_per_frame) < 1e-4
    assert relative_gap(theirs_per_frame, theirs) > 1e-3  # the two norms differ: the choice matters


def test_frames_move_together_only_within_a_clip(pair):
    """A change to one frame's latent changes the other frames of its clip (temporal
    attention), never another clip's; without motion modules it changes no other frame."""
    unet = pair["model"].diffusion_model
    modules = pair["frame"]
    x = _inputs(clips=2, seed=3)
    changed = dict(x, latent=x["latent"].copy())
    changed["latent"][0] += 1.0
    before, after = _ours(pair, modules, x), _ours(pair, modules, changed)
    moved = [float(np.abs(after[i] - before[i]).max()) for i in range(2 * FRAMES)]
    assert min(moved[1:FRAMES]) > 1e-3 and max(moved[FRAMES:]) == 0.0, moved
    t_emb = np.repeat(timestep_embedding(x["t"])[None].astype(np.float32), 2 * FRAMES, axis=0)
    plain = [np.asarray(unet([v["latent"], t_emb, v["context"]])) for v in (x, changed)]
    assert max(float(np.abs(plain[1][i] - plain[0][i]).max()) for i in range(1, 2 * FRAMES)) < 1e-6


def test_both_layouts_give_the_same_modules_and_diffusers_reads_the_original_names(pair):
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    original = _original_names(pair["modules"])
    converted = convert_animatediff_checkpoint_to_diffusers(dict(original))
    expected = {k for k in pair["modules"] if not k.endswith(".pe")}
    assert set(converted) == expected  # diffusers' converter reads our original names as its own
    files = {layout: inspect_motion_module(path) for layout, path in pair["paths"].items()}
    assert {f.layout for f in files.values()} == {"original", "diffusers"}
    assert all((f.version, f.positions, f.mid) == ("v2", 32, True) for f in files.values())
    a, b = files["original"].tensors, files["diffusers"].tensors
    assert set(a) - {k for k in a if ".pe." in k} == set(b) - {k for k in b if ".pe." in k}
    assert all(np.array_equal(a[k].load(), b[k].load()) for k in b if ".pe." not in k)


def test_versions_are_told_from_the_tensors(pair, tmp_path):
    from safetensors.torch import save_file

    modules = pair["modules"]
    no_mid = {k: v for k, v in modules.items() if not k.startswith("mid_block.")}
    v1 = {k: (v[:, :24].contiguous() if k.endswith(".pe") else v) for k, v in no_mid.items()}
    lcm = {k: v for k, v in modules.items() if not k.endswith(".pe")}
    cases = {"v1": (v1, 24, False), "v3": (no_mid, 32, False), "animatelcm": (lcm, 32, True)}
    unet = pair["model"].diffusion_model
    for version, (state, positions, mid) in cases.items():
        path = str(tmp_path / f"{version}.safetensors")
        save_file(state, path)
        file = inspect_motion_module(path)
        assert (file.version, file.positions, file.mid) == (version, positions, mid), version
        loaded = load_motion_modules(unet, file)
        assert loaded.config.positions == positions
    with pytest.raises(SdanimError, match=r"context must be at most 24 frames .* Received: context=32"):
        motion_unet(unet, load_motion_modules(unet, inspect_motion_module(str(tmp_path / "v1.safetensors"))), 32)


def test_other_files_are_refused_in_one_line(pair, tmp_path):
    from safetensors.torch import save_file

    modules = pair["modules"]
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}
    save_file(lora, str(tmp_path / "lora.safetensors"))
    with pytest.raises(CheckpointError, match=r"^not an AnimateDiff motion module \(a LoRA\)\. Received: "
                                              r"motion_module='.*lora.safetensors'$"):
        inspect_motion_module(str(tmp_path / "lora.safetensors"))
    partial = {k: v for k, v in modules.items() if not k.startswith("up_blocks.3.")}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match=r"do not fit SD 1.x's UNet: 3 modules missing \(up_blocks.3.motion_modules.0\)"):
        inspect_motion_module(str(tmp_path / "partial.safetensors"))
    motion_lora = dict(modules)
    motion_lora["down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q.lora.down.weight"] = torch.zeros(4, 32)
    save_file(motion_lora, str(tmp_path / "motion_lora.safetensors"))
    with pytest.raises(CheckpointError, match=r"is not a temporal transformer \(has .*lora.*\); motion LoRAs"):
        inspect_motion_module(str(tmp_path / "motion_lora.safetensors"))
    with pytest.raises(CheckpointError, match=r"the motion module does not exist\. Received: motion_module="):
        inspect_motion_module(str(tmp_path / "nothing.ckpt"))
    with pytest.raises(SdanimError, match=r"^motion_norm must be one of frame, window\. Received: 'clip'$"):
        load_motion_modules(pair["model"].diffusion_model, inspect_motion_module(pair["paths"]["diffusers"]), "clip")


def test_random_modules_have_the_files_shapes_and_act(pair):
    """`random_motion_modules` (smoke runs) fits the UNet like a file and changes the
    output (no zero proj_out)."""
    unet = pair["model"].diffusion_model
    modules = random_motion_modules(unet, seed=1)
    loaded = load_motion_modules(unet, inspect_motion_module(pair["paths"]["diffusers"]))
    assert {n: sorted(w) for n, w in modules.weights.items()} == {n: sorted(w) for n, w in loaded.weights.items()}
    assert all(modules.weights[n][k].shape == loaded.weights[n][k].shape for n in loaded.weights for k in loaded.weights[n])
    x = _inputs(clips=1, seed=4)
    t_emb = np.repeat(timestep_embedding(x["t"])[None].astype(np.float32), FRAMES, axis=0)
    plain = np.asarray(unet([x["latent"], t_emb, x["context"]]))
    assert relative_gap(_ours(pair, modules, x), plain) > 1e-2


def test_an_sd2_unet_is_refused_with_the_reason(pair):
    import keras

    inputs = [keras.Input((8, 8, 4)), keras.Input((320,)), keras.Input((77, 1024))]  # SD 2.x's call signature
    sd2 = keras.Model(inputs, inputs[0] + keras.ops.mean(inputs[2]), name="sd2_unet")
    with pytest.raises(SdanimError, match=r"^motion modules are for SD 1.x \(no SD 2.x modules exist\); this UNet "
                                          r"takes a 1024-wide text context"):
        load_motion_modules(sd2, inspect_motion_module(pair["paths"]["diffusers"]))


def _pipeline(pair, context: int, stride: int):
    """diffusers' AnimateDiffPipeline around the reference UNet, FreeNoise on, Euler with
    trailing spacing on AnimateDiff's linear betas (Lightning's sampler)."""
    from diffusers import AnimateDiffPipeline, AutoencoderKL, EulerDiscreteScheduler, MotionAdapter
    from diffusers.models.activations import GEGLU

    adapter = MotionAdapter(block_out_channels=TINY_SD["channels"], motion_layers_per_block=2,
                            motion_num_attention_heads=8, motion_norm_num_groups=32, motion_max_seq_length=32,
                            use_motion_mid_block=True)
    vae = AutoencoderKL(block_out_channels=[32, 32, 32, 32], down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, norm_num_groups=32)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                                       timestep_spacing="trailing")
    pipe = AnimateDiffPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=copy.deepcopy(pair["reference"]),
                               motion_adapter=adapter, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_free_noise(context_length=context, context_stride=stride, weighting_scheme="pyramid")
    for name, module in pipe.unet.named_modules():  # FreeNoise's new blocks: the motion modules' exact GELU again
        if "motion_modules" in name and isinstance(module, GEGLU):
            module._erf = True
    return pipe


def _prompt_table(seed: int = 5) -> dict:
    """Stand-in prompt embeddings (text encoders are checked in test_models)."""
    rng = np.random.default_rng(seed)
    return {p: rng.standard_normal((77, 768)).astype(np.float32) for p in ("a", "b", "c", "n0", "n1")}


def _lerp_frames(keys: dict, table: dict, frames: int) -> np.ndarray:
    """Each frame's embedding, linear between keyframes (the last one held to the end)."""
    keys = dict(sorted(keys.items()))
    keys[frames - 1] = keys[list(keys)[-1]]
    marks = list(keys)
    out = np.zeros((frames, 77, 768), np.float32)
    for a, b in zip(marks[:-1], marks[1:]):
        for i in range(a, b + 1):
            t = (i - a) / (b - a)
            out[i] = (1 - t) * table[keys[a]] + t * table[keys[b]]
    return out


def test_a_prompt_travel_clip_ends_on_diffusers_freenoise_latents(pair, monkeypatch):
    """AnimateDiffPipeline with `enable_free_noise` (windows blended inside the motion
    modules' attention), prompt and negative-prompt dicts, the same full-length latents
    (its shuffle bypassed; the shuffle is tested below), 3 Euler-trailing steps on linear
    betas, guidance 7.5: sdanim's `sample_clip` with blend "attention" and the window norm
    ends on the same latents. 12 frames in windows of 8 every 2."""
    from sdanim.core.schedulers import make_scheduler
    from sdanim.core.windows import context_windows, fusion_weights
    from sdanim.render.motion import Clip, sample_clip

    frames, context, stride, steps = 12, 8, 2, 3
    pipe = _pipeline(pair, context, stride)
    table = _prompt_table()

    def encode_prompt(prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt=None,
                      **kwargs):
        positive = torch.from_numpy(np.stack([table.get(p, table["a"] * 0) for p in prompt]))
        negative = torch.from_numpy(np.stack([table[p] for p in negative_prompt])) if do_classifier_free_guidance else None
        return positive, negative

    monkeypatch.setattr(pipe, "encode_prompt", encode_prompt)
    prompts, negatives = {0: "a", 5: "b", 9: "c"}, {0: "n0", 11: "n1"}
    noise = np.random.default_rng(9).standard_normal((frames, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        theirs = pipe(prompt=prompts, negative_prompt=negatives, num_frames=frames, height=64, width=64,
                      num_inference_steps=steps, guidance_scale=7.5, output_type="latent",
                      latents=torch.from_numpy(noise).permute(3, 0, 1, 2)[None]).frames
    theirs = theirs[0].permute(1, 2, 3, 0).numpy()  # (F, h, w, C)

    windows = context_windows(frames, context, stride)
    assert len(windows) == 3
    fusion = fusion_weights(frames, windows, stride)
    unet = motion_unet(pair["model"].diffusion_model, pair["window"], frames, windows, fusion)
    clip = Clip(_lerp_frames(prompts, table, frames), _lerp_frames(negatives, table, frames), noise,
                [np.arange(frames)], "pyramid", 7.5, 0, "pipeline", windows, fusion)
    ours = sample_clip(lambda x, t, c, **_: np.asarray(unet([x, t, c])), clip, make_scheduler("euler_trailing", steps, "linear"))
    assert relative_gap(ours, theirs) < 1e-4, relative_gap(ours, theirs)  # 8.2e-6 here
    assert relative_gap(ours, noise * 14.0) > 0.1  # the steps went somewhere


def test_attention_windows_match_diffusers_freenoise_block_except_its_last_partial_window(pair):
    """One motion module with FreeNoise's fusion, 13 frames in windows of 8 every 3:
    (0, 8), (3, 11) and, the stride not landing on the end, (5, 13), which (diffusers'
    rule, kept) fills only frames 11 and 12. diffusers adds that window's weight for them
    as one number (`weights[:, -2]`, 2) where it weights their values by (2, 1): frame 12
    comes out at half its value. sdanim divides each frame by its own weights: frames
    0-11 agree within 1e-4, frame 12 differs (the divergence the README states)."""
    from sdanim.core.windows import context_windows, fusion_weights

    frames, context, stride = 13, 8, 3
    pipe = _pipeline(pair, context, stride)
    theirs_module = pipe.unet.down_blocks[0].motion_modules[0]
    windows = context_windows(frames, context, stride)
    fusion = fusion_weights(frames, windows, stride)
    assert list(fusion[-1]) == [0, 0, 0, 0, 0, 0, 2, 1]
    unet = motion_unet(pair["model"].diffusion_model, pair["window"], frames, windows, fusion)
    ours_module = unet.motion_layers[0]
    assert [(int(w[0]), int(w[-1]) + 1) for w in windows] == [(0, 8), (3, 11), (5, 13)]
    x = np.random.default_rng(2).standard_normal((frames, 8, 8, 32)).astype(np.float32)
    with torch.no_grad():
        theirs = theirs_module(torch.from_numpy(x).permute(0, 3, 1, 2), num_frames=frames)
    theirs = theirs.permute(0, 2, 3, 1).numpy()
    ours = np.asarray(ours_module(x))
    assert relative_gap(ours[:12] - x[:12], theirs[:12] - x[:12]) < 1e-4
    assert relative_gap(ours[12] - x[12], theirs[12] - x[12]) > 1e-2


def test_free_noise_shuffle_matches_diffusers_with_the_same_permutations(pair, monkeypatch):
    """FreeNoise's noise for 30 frames (windows of 8 every 3; a last run of 2 frames cut
    from 3): handed the first window's noise in place of its draw (the rest is written
    by the shuffle) and the permutations sdanim draws, diffusers'
    `_prepare_latents_free_noise` builds the same clip."""
    from diffusers.pipelines import free_noise_utils

    from sdanim.core.windows import free_noise

    frames, context, stride = 30, 8, 3
    pipe = _pipeline(pair, context, stride)
    drawn = []
    ours = free_noise(4, frames, context, stride, (8, 8, 4), on_permutation=drawn.append)
    handed = iter(drawn)
    monkeypatch.setattr(torch, "randperm", lambda n, generator=None: torch.from_numpy(next(handed)[:n]))
    first = np.concatenate([ours[:context], np.full((frames - context, 8, 8, 4), np.nan, np.float32)])
    monkeypatch.setattr(free_noise_utils, "randn_tensor",
                        lambda shape, **kw: torch.from_numpy(first).permute(3, 0, 1, 2)[None].clone())
    theirs = pipe._prepare_latents_free_noise(1, 4, frames, 64, 64, torch.float32, "cpu")
    assert np.array_equal(theirs[0].permute(1, 2, 3, 0).numpy(), ours)
    assert next(handed, None) is None and len(drawn) == 8


def test_controlnet_residuals_enter_the_motion_unet_where_diffusers_adds_them(pair):
    """The motion UNet with ControlNet's 13 residuals (random, at their real shapes) against
    UNetMotionModel's `down_block_additional_residuals` / `mid_block_additional_residual`:
    within 1e-4 of the output's scale, and the residuals change the output."""
    from sdanim.model.controlnet import residual_shapes

    unet = pair["model"].diffusion_model
    x = _inputs(clips=1, seed=6)
    rng = np.random.default_rng(7)
    residuals = [rng.standard_normal((FRAMES, *shape)).astype(np.float32) for shape in residual_shapes(unet)]
    ours = np.asarray(motion_unet(unet, pair["window"], FRAMES)([x["latent"], np.repeat(
        timestep_embedding(x["t"])[None].astype(np.float32), FRAMES, axis=0), x["context"], *residuals]))
    latent = torch.from_numpy(x["latent"]).reshape(1, FRAMES, 8, 8, 4).permute(0, 4, 1, 2, 3)
    as_torch = [torch.from_numpy(r).permute(0, 3, 1, 2) for r in residuals]
    with torch.no_grad():
        theirs = pair["reference"](latent, torch.tensor(x["t"]), torch.from_numpy(x["context"]),
                                   down_block_additional_residuals=as_torch[:12],
                                   mid_block_additional_residual=as_torch[12]).sample
    theirs = theirs.permute(0, 2, 3, 4, 1).reshape(FRAMES, 8, 8, 4).numpy()
    assert relative_gap(ours, theirs) < 1e-4
    assert relative_gap(ours, _ours(pair, pair["window"], x)) > 1e-2


def test_attention_windows_that_wrap_round_gather_and_scatter_their_frames(pair):
    """A looping walk's windows wrap round the end ([8, 9, 0, 1]): each window's frames
    attend among themselves in window order and their results land back on those frames,
    weighted: the module's fusion equals the fusion written out window by window."""
    from sdanim.core.windows import context_windows, fusion_weights

    frames = 10
    windows = context_windows(frames, 4, 2, closed=True)
    assert [list(map(int, w)) for w in windows][-1] == [8, 9, 0, 1]
    fusion = fusion_weights(frames, windows, 2)
    layer = motion_unet(pair["model"].diffusion_model, pair["window"], frames, windows, fusion).motion_layers[0]
    hidden = np.random.default_rng(3).standard_normal((6, frames, 32)).astype(np.float32)
    total, weight = np.zeros_like(hidden), np.zeros(frames, np.float32)
    for window, w in zip(windows, fusion):
        out = np.asarray(layer._attentions(hidden[:, window]))
        total[:, window] += out * w[None, :, None]  # a window holds each frame once
        np.add.at(weight, window, w)
    assert relative_gap(np.asarray(layer._windowed_attentions(hidden)), total / weight[None, :, None]) < 1e-5


def test_spatial_chunks_give_the_whole_windows_prediction(pair):
    """`spatial_chunk`: the UNet's own layers on 3 rows at a time (not a divisor of the 8
    rows: a short last chunk), the motion modules on every frame; the prediction is the
    unchunked one within rounding, with and without ControlNet's residuals, and frames
    still move together (the motion modules were not chunked)."""
    from sdanim.model.controlnet import residual_shapes

    unet = pair["model"].diffusion_model
    x = _inputs(clips=2, seed=8)
    rows = 2 * FRAMES
    t_emb = np.repeat(timestep_embedding(x["t"])[None].astype(np.float32), rows, axis=0)
    whole = motion_unet(unet, pair["frame"], FRAMES)
    chunked = motion_unet(unet, pair["frame"], FRAMES, spatial_chunk=3)
    assert chunked is not whole and chunked.spatial_chunk == 3
    expected = np.asarray(whole([x["latent"], t_emb, x["context"]]))
    assert relative_gap(np.asarray(chunked([x["latent"], t_emb, x["context"]])), expected) < 1e-5
    rng = np.random.default_rng(9)
    residuals = [rng.standard_normal((rows, *shape)).astype(np.float32) for shape in residual_shapes(unet)]
    controlled = np.asarray(whole([x["latent"], t_emb, x["context"], *residuals]))
    assert relative_gap(np.asarray(chunked([x["latent"], t_emb, x["context"], *residuals])), controlled) < 1e-5
    changed = x["latent"].copy()
    changed[0] += 1.0
    after = np.asarray(chunked([changed, t_emb, x["context"]]))
    assert np.abs(after[FRAMES - 1] - expected[FRAMES - 1]).max() > 1e-3  # frame 0's change reached frame 3
    with pytest.raises(SdanimError, match=r"spatial_chunk must be a whole number of rows >= 1, or None\. "
                                          r"Received: spatial_chunk=0"):
        sdanim.MotionSpec("random", spatial_chunk=0)
