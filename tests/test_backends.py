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
