"""A ControlNet batch with the tiny SD model on whatever KERAS_BACKEND is set, through the
one compiled program and the step loop (one net, a schedule ending at 2/3 of the steps,
two frames at their own scales), and the plain render: run by
tests/test_heavy_controlnet.py for TensorFlow, JAX and torch.

    python backend_controlnet.py WEIGHTS.npz OUT.npz   (WEIGHTS written by the first run)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import keras
import numpy as np

from tiny import make_tiny_sd_model, random_inputs, CONTEXT_DIM
from sdanim.config.settings import RenderSettings
from sdanim.model.controlnet import random_controlnet, ControlUnit
from sdanim.render.sampling import Renderer, ControlBatch
weights = sys.argv[1]
model = make_tiny_sd_model()
net = random_controlnet(model.diffusion_model, "1.4")
data = np.load(weights) if os.path.exists(weights) else None
if data is None:
    np.savez(weights, **{f"u{i}": w for i, w in enumerate(model.diffusion_model.get_weights())},
             **{f"n{i}": w for i, w in enumerate(net.net.get_weights())}, **{f"d{i}": w for i, w in enumerate(model.decoder.get_weights())})
else:
    model.diffusion_model.set_weights([data[f"u{i}"] for i in range(len(model.diffusion_model.weights))])
    net.net.set_weights([data[f"n{i}"] for i in range(len(net.net.weights))])
    model.decoder.set_weights([data[f"d{i}"] for i in range(len(model.decoder.weights))])
contexts, noises = random_inputs(2, 64, 64)
hints = np.random.default_rng(3).uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)
settings = RenderSettings(height=64, width=64, num_steps=3, batch_size=2, scheduler="ddim")
uncond = np.zeros((77, CONTEXT_DIM), np.float32)
out = {}
for loop in ("program", "steps"):
    r = Renderer(model.diffusion_model, model.decoder, settings, uncond, loop=loop, controls=[ControlUnit(net, False, 0.0, 0.67)])
    out[loop] = r.render(contexts, noises, [0, 1], control=ControlBatch((hints,), np.array([[0.9, 0.5]], np.float32)))
plain = Renderer(model.diffusion_model, model.decoder, settings, uncond, loop="program").render(contexts, noises, [0, 1])
np.savez(sys.argv[2], **out, plain=plain)
print(keras.backend.backend(), "program vs steps", np.abs(out["program"].astype(int) - out["steps"].astype(int)).max(),
      "control vs plain", np.abs(out["program"].astype(int) - plain.astype(int)).max())
