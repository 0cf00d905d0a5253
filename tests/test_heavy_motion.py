"""AnimateDiff motion modules at the real SD 1.5 shapes against diffusers' UNetMotionModel
holding the same random weights -- every parameter drawn, the motion modules' proj_out
too -- on the real-architecture UNet at 64x64 (HEAVY_SIZE): a 16-frame clip (v2: a
mid-block module, 32 positions) with each frame's own context (diffusers' norm; the
per-frame norm is checked on the tiny configuration), with ControlNet-shaped residuals, and
20 frames in windows inside the attention (FreeNoise).

The family tier (`python -m pytest -m family`): a model family's real-shape parity runs
once per CI, outside the README's command; the quick tier checks the same code on a tiny
configuration (tests/test_motion.py)."""

from __future__ import annotations

import gc
import os
import re

import numpy as np
import pytest

from conftest import HEAVY_SIZE, relative_gap, require

torch = require("torch")
require("diffusers")

import sd_reference as ref  # noqa: E402

pytestmark = [pytest.mark.heavy, pytest.mark.family]


def _sd15_residual_shapes(size: int) -> list:
    """The 13 ControlNet residuals' shapes at a latent of size x size (SD 1.x's UNet)."""
    shapes = [(size, size, 320)] * 3 + [(size // 2, size // 2, 320)]
    shapes += [(size // 2, size // 2, 640)] * 2 + [(size // 4, size // 4, 640)]
    shapes += [(size // 4, size // 4, 1280)] * 2 + [(size // 8, size // 8, 1280)] * 3
    return shapes + [(size // 8, size // 8, 1280)]


def test_motion_modules_match_diffusers_at_sd15_shapes(tmp_path, monkeypatch, capsys):
    """The references first, their memory freed, then sdanim's model (not the `sd_model`
    fixture: built here, after the torch models are gone, so the two never share the
    machine's memory; freed after this test as the fixture's would be)."""
    from diffusers import MotionAdapter, UNetMotionModel
    from diffusers.models.activations import GEGLU
    from safetensors.torch import save_file

    from sdanim.core.schedulers import timestep_embedding
    from sdanim.core.windows import context_windows, fusion_weights
    from sdanim.formats.checkpoints import Checkpoint
    from sdanim.formats.motion_files import inspect_motion_module
    from sdanim.formats.weight_map import bind
    from sdanim.model.controlnet import residual_shapes
    from sdanim.model.convert import write_keras_weights
    from sdanim.model.motion import load_motion_modules, motion_unet
    from test_controlnet import _lazy, randomize_everything

    import torch.nn.functional as F
    from diffusers.models import activations

    # diffusers' GEGLU: KerasCV's tanh GELU in the spatial blocks, the motion modules' exact one.
    monkeypatch.setattr(activations.GEGLU, "gelu",
                        lambda self, gate: F.gelu(gate, approximate="none" if getattr(self, "_erf", False) else "tanh"))
    unet = ref.build("1.4", parts=("unet",), seed=5)["unet"]
    adapter = MotionAdapter(motion_max_seq_length=32, use_motion_mid_block=True)  # v2's configuration
    motion = UNetMotionModel.from_unet2d(unet, adapter).eval()
    randomize_everything(motion, 8)
    for name, module in motion.named_modules():
        if "motion_modules" in name and isinstance(module, GEGLU):
            module._erf = True
    frames, size = 16, HEAVY_SIZE // 8
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((frames, size, size, 4), dtype=np.float32)
    context = rng.standard_normal((frames, 77, 768), dtype=np.float32)
    residuals = [0.3 * rng.standard_normal((frames, *s), dtype=np.float32) for s in _sd15_residual_shapes(size)]
    t = 601

    def run(x=latent, model=motion, **kwargs):
        clip = torch.from_numpy(x).reshape(1, len(x), size, size, 4).permute(0, 4, 1, 2, 3)
        with torch.no_grad():
            eps = model(clip, torch.tensor(t), torch.from_numpy(context[:len(x)]), **kwargs).sample
        return eps.permute(0, 2, 3, 4, 1).reshape(len(x), size, size, 4).numpy()

    from conftest import _shared

    sd_model = None
    nchw = [torch.from_numpy(r).permute(0, 3, 1, 2) for r in residuals]
    expected = {"window": run(), "controlled": run(down_block_additional_residuals=nchw[:12],
                                                   mid_block_additional_residual=nchw[12])}
    norms = [name for name, _ in motion.named_modules()
             if re.fullmatch(r"(down_blocks\.\d|up_blocks\.\d|mid_block)\.motion_modules\.\d", name)]
    assert len(norms) == 21  # v2: a module after each resnet/attention pair and in the mid block
    long = rng.standard_normal((20, size, size, 4), dtype=np.float32)
    context = np.concatenate([context, rng.standard_normal((4, 77, 768), dtype=np.float32)])
    from diffusers import AnimateDiffPipeline

    pipe = AnimateDiffPipeline(vae=None, text_encoder=None, tokenizer=None, unet=motion, motion_adapter=adapter,
                               scheduler=None)
    pipe.enable_free_noise(context_length=16, context_stride=4)  # windows (0, 16), (4, 20)
    for name, module in motion.named_modules():
        if "motion_modules" in name and isinstance(module, GEGLU):
            module._erf = True
    expected["freenoise"] = run(long)
    state = {k: v.detach().contiguous() for k, v in motion.state_dict().items()}
    modules = {k: v for k, v in state.items() if ".motion_modules." in k}
    spatial = {k: v for k, v in state.items() if ".motion_modules." not in k}
    path = str(tmp_path / "mm_sd_v15_v2.safetensors")
    save_file(modules, path)
    del unet, adapter, motion, pipe, state, modules, run
    gc.collect()
    sd_model = _shared("sd_model", "1.4")
    assert [tuple(s) for s in residual_shapes(sd_model.diffusion_model)] == _sd15_residual_shapes(size)

    own = tmp_path / "own"
    os.makedirs(own)
    written = write_keras_weights(sd_model, str(own), parts=("diffusion_model",))
    bind(sd_model.diffusion_model, Checkpoint("reference", "diffusers", "1.4", _lazy(spatial, "unet.")),
         "diffusion_model")
    try:
        unet = sd_model.diffusion_model
        file = inspect_motion_module(path)
        assert (file.version, file.positions, file.mid) == ("v2", 32, True)
        t_emb = np.repeat(timestep_embedding(t)[None].astype(np.float32), frames, axis=0)
        ours, gaps = {}, {}
        window = load_motion_modules(unet, file, "window")
        ours["window"] = np.asarray(motion_unet(unet, window, frames)([latent, t_emb, context[:frames]]))
        ours["controlled"] = np.asarray(motion_unet(unet, window, frames)([latent, t_emb, context[:frames], *residuals]))
        windows = context_windows(20, 16, 4)
        ours["freenoise"] = np.asarray(motion_unet(unet, window, 20, windows, fusion_weights(20, windows, 4))(
            [long, np.repeat(t_emb[:1], 20, axis=0), context]))
        gaps = {k: relative_gap(ours[k], expected[k]) for k in expected}
        with capsys.disabled():
            print("\nmotion modules SD 1.5 shapes parity (max |diff| / max |ref|): "
                  + ", ".join(f"{k} {v:.2e}" for k, v in gaps.items()))
        assert max(gaps.values()) < 1e-4, gaps
    finally:
        for part, file_path in written.items():
            getattr(sd_model, part).load_weights(file_path)  # the shared model's own weights, for the later tests
        sd_model.invalidate()
