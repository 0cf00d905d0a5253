"""The renderer on Keras's torch and JAX backends gives TensorFlow's frames for the same
weights (torch and JAX are test dependencies: CI runs both), and on every backend its one
compiled program gives the step-at-a-time loop's frames (attention interpolation too)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import dtype_policy, require

HERE = os.path.dirname(os.path.abspath(__file__))


_OUTPUTS: dict = {}  # backend -> {scheduler: (program, steps) frames}: TensorFlow's made once


def _render(tmp_path_factory, backend: str) -> dict:
    if backend in _OUTPUTS:
        return _OUTPUTS[backend]
    from tiny import make_tiny_model

    folder = tmp_path_factory.getbasetemp() / "backends"
    folder.mkdir(exist_ok=True)
    weights = folder / "w.npz"
    if not weights.exists():
        model = make_tiny_model()
        arrays = {f"unet_{i}": w for i, w in enumerate(model.diffusion_model.get_weights())}
        arrays.update({f"dec_{i}": w for i, w in enumerate(model.decoder.get_weights())})
        aid_unet = make_tiny_model(attention=True).diffusion_model  # attention interpolation (AID)
        arrays.update({f"aunet_{i}": w for i, w in enumerate(aid_unet.get_weights())})
        np.savez(weights, **arrays)
    out = folder / f"{backend}.npz"
    import keras

    if backend == keras.backend.backend():  # this process's own: rendered here, in float32 whatever the policy
        import backend_render

        with dtype_policy("float32"):
            backend_render.main(str(weights), str(out))
    else:
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
        proc = subprocess.run([sys.executable, os.path.join(HERE, "backend_render.py"), str(weights), str(out)],
                              capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
    with np.load(out) as data:
        _OUTPUTS[backend] = {k: data[k].astype(int) for k in data.files}
    return _OUTPUTS[backend]


@pytest.mark.slow
@pytest.mark.parametrize("other", ["torch", "jax"])
def test_backend_matches_tensorflow(tmp_path_factory, other):
    require(other)
    outs = {backend: _render(tmp_path_factory, backend) for backend in ("tensorflow", other)}
    for scheduler in ("ddim", "euler_a"):
        for backend in ("tensorflow", other):
            program, steps = outs[backend][scheduler]  # the one compiled program; the step loop
            diff = np.abs(program - steps).max()
            assert diff <= 1, f"{backend}, {scheduler}: the compiled program and the step loop differ by {diff} levels"
        diff = np.abs(outs["tensorflow"][scheduler][0] - outs[other][scheduler][0]).max()
        assert diff <= 1, f"{other} and tensorflow frames differ by {diff} levels ({scheduler})"
        assert outs[other][scheduler][0].std() > 1


@pytest.mark.slow
@pytest.mark.once  # which tensors torch makes, not the CPU's rounding: once per CI
def test_no_float64_tensor_reaches_the_torch_backend(tmp_path):
    """Apple's MPS device crashes on any float64 tensor (keras-team/keras#23700). Every
    tool renders on the torch backend (on this CPU) under a guard that records each float64
    tensor torch makes (tests/backend_float64.py): there must be none."""
    require("torch")
    out = tmp_path / "float64.json"
    env = dict(os.environ, KERAS_BACKEND="torch", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "backend_float64.py"), str(tmp_path), str(out)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    report = json.loads(out.read_text())
    assert len(report["ran"]) >= 12, report["ran"]  # every sampler and every task ran
    assert report["float64"] == [], "\n".join(f"{s['op']} x{s['count']} at {s['where']}" for s in report["float64"])


def _write_post_files(folder) -> None:
    """The post networks' weight files, drawn with torch once: every backend reads them."""
    import torch
    from safetensors.torch import save_file

    from backend_post import FILES
    from test_rife import _reference as rife_net, _save as save_rife
    from test_upscale import _compact_state, _rrdb_state

    save_rife(rife_net(False), os.path.join(folder, FILES["rife"]))
    torch.save(_compact_state(num_feat=8, num_conv=2, scale=2), os.path.join(folder, FILES["compact"]))
    torch.save(_rrdb_state(num_block=1, num_feat=8, ups=1), os.path.join(folder, FILES["rrdb"]))
    diffusers = require("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderTiny().eval()
    with torch.no_grad():  # random init leaves biases at 0: give every tensor something to carry
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, os.path.join(folder, FILES["taesd"]))


@pytest.mark.slow
@pytest.mark.parametrize("other", ["torch", "jax"])
def test_post_networks_match_tensorflow(tmp_path_factory, other):
    """RIFE in-betweens, both Real-ESRGAN architectures (tiled) and the tiny decoder's
    decoder and encoder give TensorFlow's output on the other backend, from the same files:
    within 1 level for frames, 1e-4 of the scale for the decoder's floats."""
    require(other)
    require("torch")
    import backend_post

    folder = tmp_path_factory.getbasetemp() / "post"
    if not folder.exists():
        folder.mkdir()
        _write_post_files(str(folder))
        with dtype_policy("float32"):
            np.savez(folder / "tensorflow.npz", **backend_post.run(str(folder)))
    out = folder / f"{other}.npz"
    env = dict(os.environ, KERAS_BACKEND=other, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "backend_post.py"), str(folder), str(out)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with np.load(folder / "tensorflow.npz") as tf_out, np.load(out) as other_out:
        assert sorted(tf_out.files) == sorted(other_out.files) == ["compact", "rife", "rrdb", "taesd_decoder",
                                                                   "taesd_encoder"]
        for name in ("rife", "compact", "rrdb"):
            ours, theirs = tf_out[name].astype(int), other_out[name].astype(int)
            assert ours.shape == theirs.shape and ours.std() > 1, name
            assert np.abs(ours - theirs).max() <= 1, f"{name}: {other} and tensorflow differ by {np.abs(ours - theirs).max()} levels"
        for name in ("taesd_decoder", "taesd_encoder"):
            ours, theirs = tf_out[name], other_out[name]
            gap = float(np.abs(ours - theirs).max() / np.abs(ours).max())
            assert gap <= 1e-4, f"{name}: {other} and tensorflow differ by {gap:.2e} of the scale"


@pytest.mark.slow
@pytest.mark.parametrize("other", ["torch", "jax"])
def test_a_motion_morph_matches_tensorflow(tmp_path_factory, other):
    """Motion modules (frames denoised together in windows, prompt travel, guidance) give
    TensorFlow's frames on the other backend, within 1 level (tests/backend_motion.py)."""
    require(other)
    import backend_motion

    folder = tmp_path_factory.getbasetemp() / "motion_backends"
    weights = folder / "tiny.npz"
    if not folder.exists():
        folder.mkdir()
        (folder / "tensorflow").mkdir()
        with dtype_policy("float32"):
            np.save(folder / "tensorflow.npy", backend_motion.run(str(weights), str(folder / "tensorflow")))
    (folder / other).mkdir()
    env = dict(os.environ, KERAS_BACKEND=other, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "backend_motion.py"), str(weights), str(folder / other),
                           str(folder / f"{other}.npy")], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours, theirs = np.load(folder / "tensorflow.npy").astype(int), np.load(folder / f"{other}.npy").astype(int)
    assert ours.shape == theirs.shape == (6, 64, 64, 3) and ours.std() > 1
    assert np.abs(ours - theirs).max() <= 1, f"{other} and tensorflow motion frames differ by {np.abs(ours - theirs).max()} levels"
