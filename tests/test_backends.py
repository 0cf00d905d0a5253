"""The renderer on Keras's torch and JAX backends gives TensorFlow's frames for the same
weights (torch and JAX are test dependencies: CI runs both), and on every backend its one
compiled program gives the step-at-a-time loop's frames."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import require

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("other", ["torch", "jax"])
@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
def test_backend_matches_tensorflow(tmp_path, scheduler, other):
    require(other)
    from tiny import make_tiny_model

    model = make_tiny_model()
    weights = {f"unet_{i}": w for i, w in enumerate(model.diffusion_model.get_weights())}
    weights.update({f"dec_{i}": w for i, w in enumerate(model.decoder.get_weights())})
    np.savez(tmp_path / "w.npz", **weights)
    outs = {}
    for backend in ("tensorflow", other):
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
        out = tmp_path / f"{backend}.npy"
        proc = subprocess.run(
            [sys.executable, os.path.join(HERE, "backend_render.py"), str(tmp_path / "w.npz"), str(out), scheduler],
            capture_output=True, text=True, env=env,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        program, steps = np.load(out).astype(int)  # the one compiled program; the step loop
        diff = np.abs(program - steps).max()
        assert diff <= 1, f"{backend}: the compiled program and the step loop differ by {diff} levels"
        outs[backend] = program
    diff = np.abs(outs["tensorflow"] - outs[other]).max()
    assert diff <= 1, f"{other} and tensorflow frames differ by {diff} levels"
    assert outs[other].std() > 1
