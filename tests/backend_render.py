"""Renders fixed inputs with the tiny models on whatever KERAS_BACKEND is set.

Run as a script by tests/test_backends.py: python backend_render.py WEIGHTS.npz OUT.npy
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(weights_path, out_path, scheduler="ddim"):
    from sdanim.render.sampling import Renderer
    from sdanim.config.settings import RenderSettings
    from tiny import CONTEXT_DIM, make_tiny_model, random_inputs

    model = make_tiny_model()
    data = np.load(weights_path)
    model.diffusion_model.set_weights([data[f"unet_{i}"] for i in range(len(model.diffusion_model.weights))])
    model.decoder.set_weights([data[f"dec_{i}"] for i in range(len(model.decoder.weights))])
    contexts, noises = random_inputs(3, 64, 64)
    settings = RenderSettings(height=64, width=64, num_steps=4, batch_size=3, scheduler=scheduler)
    uncond = np.zeros((77, CONTEXT_DIM), np.float32)
    images = Renderer(model.diffusion_model, model.decoder, settings, uncond, loop="program").render(
        contexts, noises, [0, 1, 2])
    # The step-at-a-time loop, to compare with the one compiled program on this backend.
    steps = Renderer(model.diffusion_model, model.decoder, settings, uncond, loop="steps").render(
        contexts, noises, [0, 1, 2])
    # A second renderer of the same model (the compiled step is reused) on the
    # image-to-image + inpainting path: start half-way, keep the left half.
    init = np.random.default_rng(1).standard_normal(noises.shape).astype(np.float32)
    masks = np.zeros((*noises.shape[:3], 1), np.float32)
    masks[:, :, 4:] = 1.0
    edited = Renderer(model.diffusion_model, model.decoder, settings, uncond, strength=0.5, loop="program").render(
        contexts, noises, [0, 1, 2], init_latents=init, masks=masks)
    edited_steps = Renderer(model.diffusion_model, model.decoder, settings, uncond, strength=0.5, loop="steps").render(
        contexts, noises, [0, 1, 2], init_latents=init, masks=masks)
    np.save(out_path, np.stack([np.concatenate([images, edited]), np.concatenate([steps, edited_steps])]))


if __name__ == "__main__":
    main(*sys.argv[1:])
