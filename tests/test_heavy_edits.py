"""The editing tools on the real KerasCV SD 1.4 architecture (random weights, HEAVY_SIZE):
the real VAE encoder, the inpainting invariant, strength 0 and 1, step views."""

import numpy as np
import pytest

import sdanim
from conftest import HEAVY_LATENT, HEAVY_SIZE
from sdanim.config.settings import RenderSettings

pytestmark = pytest.mark.heavy
SETTINGS = RenderSettings(height=HEAVY_SIZE, width=HEAVY_SIZE, num_steps=2, batch_size=1)


def _photo():
    """A smooth picture (the VAE's kind of input), not white noise."""
    y, x = np.mgrid[0:HEAVY_SIZE, 0:HEAVY_SIZE] / (HEAVY_SIZE - 1.0)
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], axis=-1)
    return (rgb * 255).astype(np.uint8)


def test_real_vae_encoder_input_range_and_batching(sd_model):
    """sdanim hands KerasCV's VAE encoder pixels in [-1, 1] (0 -> -1, 255 -> 1), and the
    batch size does not change a latent. (Its numerics against diffusers' VAE are in
    test_heavy_checkpoints.)"""
    from sdanim.render.jobs import encode_images

    photos = np.stack([_photo(), _photo()[::-1]])
    together = encode_images(sd_model, photos, batch_size=2)
    alone = np.concatenate([encode_images(sd_model, photos[k : k + 1]) for k in range(2)])
    assert together.shape == (2, *HEAVY_LATENT)
    scale = np.abs(alone).max()
    assert np.abs(together - alone).max() <= 1e-4 * scale  # float32 rounding of batched convolutions
    assert np.abs(alone[0] - alone[1]).max() > 1e-2 * scale  # the two pictures differ
    # encode_images runs the encoder compiled (predict_on_batch), the reference eagerly: with
    # TensorFlow's oneDNN kernels on (x86 CPUs with AVX512_VNNI/BF16/AMX) the two sum the
    # 4608-term convolutions of ~20 layers in other orders, measured 6e-5 of the scale apart;
    # 5e-4 of the scale absorbs that and is still 20x below the 1e-2 two pictures differ by.
    for level, value in ((255, 1.0), (0, -1.0)):
        flat = np.full((1, HEAVY_SIZE, HEAVY_SIZE, 3), level, np.uint8)
        direct = np.asarray(sd_model.image_encoder(np.full((1, HEAVY_SIZE, HEAVY_SIZE, 3), value, np.float32)))
        assert np.abs(encode_images(sd_model, flat) - direct).max() <= 5e-4 * scale


def test_inpaint_keeps_unmasked_pixels_on_the_real_architecture(sd_model):
    image = _photo()
    mask = np.zeros((HEAVY_SIZE, HEAVY_SIZE), np.uint8)
    mask[HEAVY_SIZE * 5 // 16 : HEAVY_SIZE * 11 // 16, HEAVY_SIZE // 4 : HEAVY_SIZE * 13 // 16] = 255
    r = sdanim.inpaint(image, mask, "a red armchair", seed=3, settings=SETTINGS, model=sd_model, out_dir=None, progress=False)
    outside = mask < 128
    assert np.array_equal(r.images[0][outside], image[outside])
    assert np.abs(r.images[0][~outside].astype(int) - image[~outside].astype(int)).max() > 20


def test_strength_edges_and_step_view_on_the_real_architecture(sd_model):
    image = _photo()
    keep = sdanim.img2img(image, "a wooden carving", strength=0, seed=5, settings=SETTINGS, model=sd_model, out_dir=None)
    assert np.array_equal(keep.images[0], image)
    ignore = sdanim.img2img(image, "a wooden carving", strength=1, seed=5, settings=SETTINGS, model=sd_model, out_dir=None, progress=False)
    text = sdanim.generate("a wooden carving", num_images=1, seed=5, settings=SETTINGS, model=sd_model, out_dir=None, progress=False)
    assert np.array_equal(ignore.images, text.images)
    half = sdanim.img2img(image, "a wooden carving", strength=0.5, seed=5, settings=SETTINGS, model=sd_model, out_dir=None, progress=False)
    assert np.abs(half.images[0].astype(int) - text.images[0].astype(int)).max() > 0
    steps = sdanim.denoising_steps("a wooden carving", seed=5, settings=SETTINGS, model=sd_model, out=None, progress=False)
    assert steps.steps == [1, 2] and np.array_equal(steps.images[-1], text.images[0])
