"""ControlNet at the real SD 1.5 shapes (SD 2.1's: tests/heavy_sd21.py) against diffusers'
ControlNetModel and UNet2DConditionModel holding the same random weights -- every
parameter drawn, the zero convolutions too -- on the real-architecture UNet at 64x64: the 13 residuals (from
lllyasviel's `control_model.*` layout), the UNet's output with them and guess mode's
weights; the compiled program with a net on JAX against TensorFlow; and a net on a Ray
worker.

The family tier (`python -m pytest -m family`, which .ci/run runs after the README's
command): a model family's real-shape parity runs once per CI, outside the README's
20-minute command; the quick tier checks the same code on tiny configurations
(tests/test_controlnet.py)."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest

from conftest import HEAVY_SIZE, require

torch = require("torch")
require("diffusers")

import sd_reference as ref  # noqa: E402
from test_distributed import ray_local  # noqa: E402,F401 - the module's fixture: one local Ray instance

pytestmark = [pytest.mark.heavy, pytest.mark.family]


def controlnet_parity(model, version: str, tmp_path, monkeypatch, capsys) -> None:
    """diffusers' ControlNet (SD `version`'s configuration) and a UNet with random
    weights; sdanim's net loaded from an original-layout file, the model's UNet bound to
    the reference UNet's weights (and given its own back after)."""
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    from sdanim.core.schedulers import timestep_embedding
    from sdanim.formats.checkpoints import Checkpoint
    from sdanim.formats.controlnet_files import inspect_controlnet
    from sdanim.formats.weight_map import bind, spec
    from sdanim.model.controlnet import controlled_unet, guess_scales, load_controlnet
    from sdanim.model.convert import write_keras_weights
    from test_controlnet import _lazy, randomize_everything

    ref.use_tanh_geglu(monkeypatch)
    dim = 1024 if version == "2.1" else 768
    # 1. The references: their outputs, then their memory freed.
    unet = ref.build(version, parts=("unet",), seed=5)["unet"]
    randomize_everything(unet, 6)
    config = {k: v for k, v in ref.unet_config(version).items()
              if k not in ("sample_size", "out_channels", "up_block_types")}
    net = ControlNetModel(**config).eval()
    randomize_everything(net, 7)
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((2, HEAVY_SIZE // 8, HEAVY_SIZE // 8, 4), dtype=np.float32)
    context = rng.standard_normal((2, 77, dim), dtype=np.float32)
    hint = rng.uniform(0, 1, (2, HEAVY_SIZE, HEAVY_SIZE, 3)).astype(np.float32)
    t = [801, 201]

    def nchw(x):
        return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))

    with torch.no_grad():
        down, mid = net(nchw(latent), torch.tensor(t), torch.from_numpy(context), nchw(hint), return_dict=False)
        eps = unet(nchw(latent), torch.tensor(t), torch.from_numpy(context), down_block_additional_residuals=down,
                   mid_block_additional_residual=mid).sample.permute(0, 2, 3, 1).numpy()
    residuals = [r.permute(0, 2, 3, 1).numpy() for r in (*down, mid)]
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    original = {}
    for leaf in spec("controlnet", version):
        d, o = leaf["diffusers"], leaf["original"]
        for dk, ok in zip(d.keys(d.bases[0]), o.keys(o.bases[0])):
            original["control_model." + ok] = state[dk]
    path = str(tmp_path / f"control_sd{version[0]}_test.safetensors")
    save_file(original, path)
    unet_tensors = _lazy(unet.state_dict(), "unet.")
    unet_state = {k: v.load() for k, v in unet_tensors.items()}  # numpy copies: the torch module can go
    del net, unet, state, original, down, mid
    gc.collect()

    # 2. sdanim: the model's UNet takes the reference's weights (its own saved first).
    own = tmp_path / "own"
    os.makedirs(own)
    written = write_keras_weights(model, str(own), parts=("diffusion_model",))
    lazy = {k: type(unet_tensors[k])(v.shape, lambda v=v: v) for k, v in unet_state.items()}
    bind(model.diffusion_model, Checkpoint("reference", "diffusers", version, lazy), "diffusion_model")
    try:
        file = inspect_controlnet(path)
        assert (file.layout, file.version, file.pooled) == ("original", version, False)
        loaded = load_controlnet(model.diffusion_model, file, version)
        t_emb = np.stack([timestep_embedding(v) for v in t]).astype(np.float32)
        ours = [np.asarray(r) for r in loaded.net([latent, t_emb, context, hint])]
        gaps = [float(np.abs(o - e).max() / np.abs(e).max()) for o, e in zip(ours, residuals)]
        ours_eps = np.asarray(controlled_unet(model.diffusion_model)([latent, t_emb, context, *ours]))
        eps_gap = float(np.abs(ours_eps - eps).max() / np.abs(eps).max())
        with capsys.disabled():
            print(f"\nControlNet SD {version} parity (max |diff| / max |ref|): residuals up to {max(gaps):.2e}, "
                  f"UNet with them {eps_gap:.2e}")
        assert max(gaps) < 2e-4 and eps_gap < 2e-4, (gaps, eps_gap)
        assert min(float(np.abs(r).max()) for r in residuals) > 1e-2  # no residual is ~0: the zero convs were drawn
        weights = guess_scales()  # diffusers' guess mode: logspace(-1, 0, 13)
        assert weights[0] == pytest.approx(0.1) and weights[-1] == pytest.approx(1.0) and len(weights) == len(ours)
    finally:
        for part, file_path in written.items():
            getattr(model, part).load_weights(file_path)  # the shared model's own weights, for the later tests
        model.invalidate()


def test_controlnet_matches_diffusers_at_sd15_shapes(sd_model, tmp_path, monkeypatch, capsys):
    controlnet_parity(sd_model, "1.4", tmp_path, monkeypatch, capsys)


@pytest.mark.own_process  # a Ray worker builds its own model: before this process holds the real one
def test_a_controlnet_on_workers_gives_the_frames_of_one_process(ray_local, tmp_path):
    """A ControlNet travels with the job (its spec and the frames' hints): a Ray worker
    builds the same net for its own (tiny) model, so the frames are the ones this process
    renders. (Here, not in the quick tier: the worker's model and net take about 100 s on
    one slow CPU.)"""
    from PIL import Image

    import sdanim
    from conftest import read_manifest
    from sdanim.config.control import ControlNetSpec
    from test_distributed import _morph, tiny_sd_model

    rng = np.random.default_rng(0)
    picture = tmp_path / "edges.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(picture)
    nets = [ControlNetSpec("random", image=str(picture), preprocess="canny", scale=0.8)]
    here = _morph(tmp_path, "cn_here", model=tiny_sd_model(), controlnets=nets)
    there = _morph(tmp_path, "cn_there", model=tiny_sd_model, controlnets=nets,
                   workers=sdanim.Workers(count=1, cpus_per_worker=1))
    gap = np.abs(there.frames.astype(int) - here.frames.astype(int))  # thread counts: see the AID test
    assert gap.max() <= 1 and (gap > 0).mean() < 1e-3, (gap.max(), (gap > 0).mean())
    assert read_manifest(tmp_path / "cn_there_frames")["controlnets"][0]["file"] == "random"


def test_the_compiled_program_with_a_controlnet_on_jax_and_torch_gives_tensorflows_frames(tmp_path):
    """The residuals inside the loop on JAX (one jax.jit per batch), torch (the Apple
    path's backend, eager) and TensorFlow: the program and the step loop agree on each,
    and JAX's and torch's frames are TensorFlow's within 1 level (the same weights)."""
    import subprocess
    import sys

    require("jax")
    require("torch")
    here = os.path.dirname(os.path.abspath(__file__))
    weights, frames = str(tmp_path / "weights.npz"), {}
    for backend in ("tensorflow", "jax", "torch"):  # TensorFlow first: it writes the weights the others read
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
        out = str(tmp_path / f"{backend}.npz")
        proc = subprocess.run([sys.executable, os.path.join(here, "backend_controlnet.py"), weights, out],
                              capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        with np.load(out) as data:
            frames[backend] = {k: data[k].astype(int) for k in data.files}
    for backend, f in frames.items():
        assert np.abs(f["program"] - f["steps"]).max() <= 1, backend
        assert np.abs(f["program"] - f["plain"]).max() > 10, backend  # the net acts
    for backend in ("jax", "torch"):
        gap = max(np.abs(frames[backend][k] - frames["tensorflow"][k]).max() for k in frames[backend])
        assert gap <= 1, f"{backend} and tensorflow ControlNet frames differ by {gap} levels"
