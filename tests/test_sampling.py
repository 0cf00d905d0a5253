"""Batched sampling on tiny models: batch invariance, padding, guidance, OOM fallback."""

import numpy as np
import pytest

from sdanim.plan import FramePlan
from sdanim.sampling import Renderer, batches, render_frames, timestep_embedding
from sdanim.settings import RenderSettings
from tiny import CONTEXT_DIM, random_inputs


def _settings(**kw):
    base = dict(height=64, width=64, num_steps=3, guidance_scale=7.5, batch_size=4)
    base.update(kw)
    return RenderSettings(**base)


def _renderer(tiny, **kw):
    uncond = np.zeros((77, CONTEXT_DIM), np.float32)
    return Renderer(tiny.diffusion_model, tiny.decoder, _settings(**kw), uncond)


def _plan(n=7):
    contexts, noises = random_inputs(n, 64, 64)
    return FramePlan(contexts, noises, tuple(range(n)), np.arange(n, dtype=np.float64), noise_mode="slerp")


def test_timestep_embedding_matches_keras_cv_formula():
    emb = timestep_embedding(999)
    assert emb.shape == (320,) and emb.dtype == np.float32
    freqs = np.exp(-np.log(10000) * np.arange(160) / 160)
    np.testing.assert_allclose(emb[:160], np.cos(999 * freqs), atol=2e-4)
    np.testing.assert_allclose(emb[160:], np.sin(999 * freqs), atol=2e-4)


def test_batches_keep_the_last_short_batch():
    assert batches(range(7), 3) == [[0, 1, 2], [3, 4, 5], [6]]


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpmpp_2m", "lcm", "tcd"])
def test_frames_do_not_depend_on_batch_size(tiny, scheduler):
    plan = _plan(7)
    one = render_frames(_renderer(tiny, scheduler=scheduler), plan, range(7), 1, progress=False)
    four = render_frames(_renderer(tiny, scheduler=scheduler), plan, range(7), 4, progress=False)
    for i in range(7):
        diff = np.abs(one[i].astype(int) - four[i].astype(int)).max()
        assert diff <= 1, f"frame {i} differs by {diff} levels between batch 1 and 4"
    # Different frames are different images (the test would pass on a constant model).
    assert np.abs(one[0].astype(int) - one[6].astype(int)).max() > 5


@pytest.mark.parametrize("scheduler", ["lcm", "tcd"])
def test_consistency_samplers_default_to_four_conditional_passes(tiny, scheduler):
    """lcm/tcd without steps or guidance: 4 steps at guidance 1, i.e. 4 UNet calls on
    the batch itself (no unconditional half), and the sampler's noise changes the image."""
    from sdanim.settings import RenderSettings

    settings = RenderSettings(height=64, width=64, scheduler=scheduler)
    assert (settings.num_steps, settings.guidance_scale) == (4, 1.0)
    batches_seen = []
    unet = tiny.diffusion_model
    original = unet.call

    def spy(inputs, *args, **kwargs):
        batches_seen.append(int(inputs[0].shape[0]))
        return original(inputs, *args, **kwargs)

    unet.call = spy
    try:
        contexts, noises = random_inputs(3, 64, 64)
        uncond = np.zeros((77, CONTEXT_DIM), np.float32)
        images = Renderer(unet, tiny.decoder, settings, uncond).render(contexts, noises, [0, 1, 2])
    finally:
        unet.call = original
    assert batches_seen and set(batches_seen) == {3}  # (B, ...), never (2B, ...)
    assert images.shape == (3, 64, 64, 3)
    ddim = Renderer(unet, tiny.decoder, RenderSettings(height=64, width=64, num_steps=4, guidance_scale=1.0), uncond)
    assert np.abs(ddim.render(contexts, noises, [0, 1, 2]).astype(int) - images.astype(int)).max() > 5


def test_same_seed_same_frames(tiny):
    plan = _plan(3)
    a = render_frames(_renderer(tiny), plan, range(3), 2, progress=False)
    b = render_frames(_renderer(tiny), plan, range(3), 2, progress=False)
    for i in range(3):
        np.testing.assert_array_equal(a[i], b[i])


def test_guidance_one_equals_conditional_only(tiny):
    contexts, noises = random_inputs(2, 64, 64)
    fused = _renderer(tiny, guidance_scale=1.0 + 1e-7).sample_latents(contexts, noises, [0, 1])
    cond_only = _renderer(tiny, guidance_scale=1.0).sample_latents(contexts, noises, [0, 1])
    np.testing.assert_allclose(np.asarray(fused), np.asarray(cond_only), atol=1e-4)


def test_guidance_changes_the_image(tiny):
    contexts, noises = random_inputs(1, 64, 64)
    a = _renderer(tiny, guidance_scale=1.0).render(contexts, noises, [0])
    b = _renderer(tiny, guidance_scale=9.0).render(contexts, noises, [0])
    assert np.abs(a.astype(int) - b.astype(int)).max() > 5


def test_padding_keeps_model_shapes_constant(tiny):
    seen = []
    renderer = _renderer(tiny)
    original = renderer.render

    def spy(contexts, noises, seeds):
        seen.append(len(contexts))
        return original(contexts, noises, seeds)

    renderer.render = spy
    out = render_frames(renderer, _plan(7), range(7), 3, progress=False)
    assert sorted(out) == list(range(7))
    assert seen == [3, 3, 3]


def test_out_of_memory_halves_the_batch_and_keeps_frames(tiny):
    renderer = _renderer(tiny)
    original = renderer.render
    calls, written = [], []

    def flaky(contexts, noises, seeds):
        calls.append(len(contexts))
        if len(contexts) > 2:
            import tensorflow as tf

            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[8,320,16,16]")
        return original(contexts, noises, seeds)

    renderer.render = flaky
    with pytest.warns(UserWarning, match="out of device memory; batch_size lowered to 2"):
        out = render_frames(renderer, _plan(5), range(5), 4, on_batch=lambda idx, imgs: written.extend(idx), progress=False)
    assert sorted(out) == list(range(5)) and sorted(written) == list(range(5))
    assert calls[0] == 4 and set(calls[1:]) == {2}


def test_other_errors_are_not_swallowed(tiny):
    renderer = _renderer(tiny)

    def broken(*a):
        raise KeyError("bug")

    renderer.render = broken
    with pytest.raises(KeyError):
        render_frames(renderer, _plan(2), range(2), 2, progress=False)


def test_renderers_of_one_model_share_the_compiled_step(tiny):
    """A second generate / grid column / img2img call must not trace the UNet again,
    and the cache must not keep a dropped model alive."""
    import gc
    import weakref

    from sdanim.sampling import forget_compiled

    uncond = np.zeros((77, 16), np.float32)
    a = Renderer(tiny.diffusion_model, tiny.decoder, RenderSettings(height=64, width=64, num_steps=2), uncond)
    b = Renderer(tiny.diffusion_model, tiny.decoder, RenderSettings(height=64, width=64, num_steps=5, guidance_scale=3.0), uncond)
    assert a._eps_fn is b._eps_fn and a._decode_fn is b._decode_fn
    forget_compiled(tiny.diffusion_model)
    c = Renderer(tiny.diffusion_model, tiny.decoder, RenderSettings(height=64, width=64, num_steps=2), uncond)
    assert c._eps_fn is not a._eps_fn and c._decode_fn is a._decode_fn

    from tiny import make_tiny_model

    other = make_tiny_model()
    r = Renderer(other.diffusion_model, other.decoder, RenderSettings(height=64, width=64, num_steps=2), uncond)
    contexts, noises = random_inputs(1, 64, 64)
    r.render(contexts, noises, [0])
    gone = weakref.ref(other.diffusion_model)
    del other, r
    gc.collect()
    assert gone() is None
