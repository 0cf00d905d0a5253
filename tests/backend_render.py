"""Renders fixed inputs with the tiny models on whatever KERAS_BACKEND is set.

Run as a script by tests/test_backends.py for each other backend (the test process's own
backend calls `main`): python backend_render.py WEIGHTS.npz OUT.npz renders every sampler:
{scheduler: (2, N, H, W, 3) uint8, the compiled program's frames and the step loop's}.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


SCHEDULERS = ("ddim", "euler_a")


def _initialize_from_numpy() -> None:
    """JAX compiles one XLA program per initializer and shape (about 10 s for these
    models); every weight is replaced by the file's, so variables start as numpy zeros."""
    import keras

    if keras.backend.backend() != "jax":
        return
    from keras.src.backend.jax.core import Variable

    Variable._initialize_with_initializer = lambda self, initializer: self._initialize(np.zeros(self._shape, self._dtype))


def main(weights_path, out_path):
    _initialize_from_numpy()
    np.savez(out_path, **{scheduler: render(weights_path, scheduler) for scheduler in SCHEDULERS})


def render(weights_path, scheduler):
    from sdanim.model.attention_interp import AidBatch
    from sdanim.render.sampling import Renderer
    from sdanim.config.settings import RenderSettings
    from tiny import CONTEXT_DIM, make_tiny_model, random_inputs

    import keras

    from sdanim.model.layers import keep_conv_kernels_in_torch_layout

    model = make_tiny_model()
    if keras.backend.backend() == "torch":  # as load_model lays them out (weights assigned after: the layout stays)
        assert keep_conv_kernels_in_torch_layout(model.diffusion_model) > 0
        assert keep_conv_kernels_in_torch_layout(model.decoder) > 0
    data = np.load(weights_path)
    model.diffusion_model.set_weights([data[f"unet_{i}"] for i in range(len(model.diffusion_model.weights))])
    model.decoder.set_weights([data[f"dec_{i}"] for i in range(len(model.decoder.weights))])
    if keras.backend.backend() == "torch":  # the weights were copied in: still the layout conv2d reads
        import torch

        kernels = [w.value for w in model.diffusion_model.weights if len(w.shape) == 4]
        assert all(k.permute(3, 2, 0, 1).is_contiguous(memory_format=torch.channels_last) for k in kernels)
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
    if scheduler != "ddim":  # attention interpolation: once per backend is enough
        return np.stack([np.concatenate([images, edited]), np.concatenate([steps, edited_steps])])
    # Attention interpolation (AID) on the tiny UNet with KerasCV's attention layers: three
    # frames between keyframes A and B, the keyframes' helper rows after them.
    aid_model = make_tiny_model(attention=True)
    aid_model.diffusion_model.set_weights([data[f"aunet_{i}"] for i in range(len(aid_model.diffusion_model.weights))])
    aid_contexts, aid_noises = random_inputs(5, 64, 64, seed=2)
    aid_noises[:] = aid_noises[0]  # one fixed noise, as a morph has
    aid = AidBatch("fused", 0.5, 3, np.array([0.25, 0.5, 0.75, 0, 0], np.float32), np.array([3, 3, 3, 0, 0]),
                   np.array([4, 4, 4, 0, 0]), np.array([1, 1, 1, 0, 0], np.float32))
    interpolated = [Renderer(aid_model.diffusion_model, model.decoder, settings, uncond, loop=loop).render(
        aid_contexts, aid_noises, [0, 1, 2, 3, 4], aid=aid) for loop in ("program", "steps")]
    return np.stack([np.concatenate([images, edited, interpolated[0]]),
                     np.concatenate([steps, edited_steps, interpolated[1]])])


if __name__ == "__main__":
    main(*sys.argv[1:])
