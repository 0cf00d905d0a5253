"""Batched sampling on tiny models: batch invariance, padding, guidance, OOM fallback."""

import numpy as np
import pytest

from sdanim.core.plan import FramePlan
from sdanim.render.sampling import Renderer, batches, render_frames, slots
from sdanim.core.schedulers import timestep_embedding
from conftest import dtype_policy
from sdanim.config.settings import RenderSettings
from tiny import CONTEXT_DIM, make_tiny_model, random_inputs


def _settings(**kw):
    base = dict(height=64, width=64, num_steps=3, guidance_scale=7.5, batch_size=4)
    base.update(kw)
    return RenderSettings(**base)


def _renderer(tiny, loop="auto", **kw):
    uncond = np.zeros((77, CONTEXT_DIM), np.float32)
    return Renderer(tiny.diffusion_model, tiny.decoder, _settings(**kw), uncond, loop=loop)


def _plan(n=7):
    contexts, noises = random_inputs(n, 64, 64)
    return FramePlan(contexts, noises, tuple(range(n)), np.arange(n, dtype=np.float64), noise_mode="slerp")


def test_timestep_embedding_matches_keras_cv_formula():
    emb = timestep_embedding(999)
    assert emb.shape == (320,) and emb.dtype == np.float32
    freqs = np.exp(-np.log(10000) * np.arange(160) / 160)
    np.testing.assert_allclose(emb[:160], np.cos(999 * freqs), atol=2e-4)
    np.testing.assert_allclose(emb[160:], np.sin(999 * freqs), atol=2e-4)


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "euler", "euler_a", "dpmpp_2m", "lcm", "tcd"])
@pytest.mark.parametrize("start", [0, 2])
def test_coefficient_tables_are_the_samplers_steps(scheduler, start):
    """The compiled loop updates x with `Scheduler.coefficients`; every row must be the
    step itself (the first step run taken without a previous prediction)."""
    from sdanim.core.schedulers import make_scheduler

    sched = make_scheduler(scheduler, 6)
    table = sched.coefficients(start)
    rng = np.random.default_rng(0)
    prev = None
    for i in range(start, 6):
        x, eps, noise = rng.standard_normal((3, 8))
        x_next, denoised = sched.step(i, x, eps, prev, noise)
        d_x, d_eps, n_x, n_eps, n_prev, n_noise = table[i]
        np.testing.assert_allclose(d_x * x + d_eps * eps, denoised, rtol=1e-9, atol=1e-9)
        kept = 0.0 if prev is None else n_prev * prev
        np.testing.assert_allclose(n_x * x + n_eps * eps + kept + n_noise * noise, x_next, rtol=1e-9, atol=1e-9)
        prev = denoised
    assert np.any(table[:, 5] != 0) == sched.needs_noise


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "euler", "euler_a", "dpmpp_2m", "lcm", "tcd"])
def test_one_compiled_program_gives_the_step_loops_frames(tiny, scheduler):
    """render() runs the loop and the decode as one program; its frames are the
    step-at-a-time loop's within 1 uint8 level, guided or not, from noise, from an
    image (a later first step) and with a kept region (inpainting)."""
    contexts, noises = random_inputs(3, 64, 64)
    init = np.random.default_rng(1).standard_normal(noises.shape).astype(np.float32)
    masks = np.zeros((*noises.shape[:3], 1), np.float32)
    masks[:, :, 4:] = 1.0
    uncond = np.zeros((77, CONTEXT_DIM), np.float32)
    cases = [(7.5, 1.0, {}), (1.0, 1.0, {}), (7.5, 0.5, {"init_latents": init}),
             (7.5, 0.6, {"init_latents": init, "masks": masks}),
             (7.5, 0.5, {})]  # a renderer with a strength but no image starts from noise
    for guidance, strength, extra in cases:
        settings = _settings(num_steps=5, guidance_scale=guidance, scheduler=scheduler)
        args = (tiny.diffusion_model, tiny.decoder, settings, uncond)
        program = Renderer(*args, strength=strength, loop="program").render(contexts, noises, [0, 1, 2], **extra)
        steps = Renderer(*args, strength=strength, loop="steps").render(contexts, noises, [0, 1, 2], **extra)
        diff = np.abs(program.astype(int) - steps.astype(int)).max()
        assert diff <= 1, f"{guidance=} {strength=} {list(extra)}: the loops differ by {diff} levels"
        assert program.std() > 20 and np.abs(program[0].astype(int) - program[1].astype(int)).max() > 5


def test_one_program_under_xla(tiny):
    """loop="auto" with XLA (the CUDA default) runs the program compiled by XLA as a
    whole: the same frames as the step loop without XLA, inpainting included."""
    contexts, noises = random_inputs(2, 64, 64)
    init = np.random.default_rng(1).standard_normal(noises.shape).astype(np.float32)
    masks = np.zeros((*noises.shape[:3], 1), np.float32)
    masks[:, :, 4:] = 1.0
    uncond = np.zeros((77, CONTEXT_DIM), np.float32)
    settings = _settings(num_steps=4, scheduler="dpmpp_2m", batch_size=2)
    xla = Renderer(tiny.diffusion_model, tiny.decoder, settings, uncond, jit_compile=True, strength=0.5)
    assert xla.loop == "program"
    ours = xla.render(contexts, noises, [0, 1], init_latents=init, masks=masks)
    steps = Renderer(tiny.diffusion_model, tiny.decoder, settings, uncond, strength=0.5, loop="steps").render(
        contexts, noises, [0, 1], init_latents=init, masks=masks)
    assert np.abs(ours.astype(int) - steps.astype(int)).max() <= 1 and ours.std() > 20


def test_one_program_per_kind_of_batch(tiny):
    """The sampler's tables and the first step are inputs of the program, not constants
    in it: renderers that differ only in sampler or strength reuse one trace
    (TensorFlow's count)."""
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("counts TensorFlow traces")
    from sdanim.model.compiled import _COMPILED, forget_compiled

    forget_compiled(tiny.diffusion_model)
    contexts, noises = random_inputs(2, 64, 64)
    uncond = np.zeros((77, CONTEXT_DIM), np.float32)
    for scheduler in ("ddim", "euler", "dpmpp_2m"):
        Renderer(tiny.diffusion_model, tiny.decoder, _settings(num_steps=4, scheduler=scheduler), uncond,
                 loop="program").render(contexts, noises, [0, 1])
    init = np.zeros_like(noises)
    for strength in (0.25, 0.75):
        Renderer(tiny.diffusion_model, tiny.decoder, _settings(num_steps=4), uncond, strength=strength,
                 loop="program").render(contexts, noises, [0, 1], init_latents=init)
    programs = {key[0]: compiled for key, (compiled, _) in _COMPILED[tiny.diffusion_model].items()
                if key[0].startswith("program")}
    assert programs["program_1000"].experimental_get_tracing_count() == 1
    with pytest.raises(ValueError, match=r"loop must be one of auto, program, steps\. Received: loop='fast'"):
        Renderer(tiny.diffusion_model, tiny.decoder, _settings(), uncond, loop="fast")
    # auto: the program under XLA (and on JAX), the step loop on TensorFlow without XLA.
    assert Renderer(tiny.diffusion_model, tiny.decoder, _settings(), uncond, jit_compile=True).loop == "program"
    assert Renderer(tiny.diffusion_model, tiny.decoder, _settings(), uncond).loop == "steps"


def test_batches_keep_the_last_short_batch():
    assert batches(range(7), 3) == [[0, 1, 2], [3, 4, 5], [6]]


@pytest.mark.parametrize("loop", ["steps", "program"])
@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpmpp_2m", "lcm", "tcd"])
def test_frames_do_not_depend_on_batch_size(tiny, scheduler, loop):
    plan = _plan(7)
    one = render_frames(_renderer(tiny, scheduler=scheduler, loop=loop), plan, range(7), 1, progress=False)
    four = render_frames(_renderer(tiny, scheduler=scheduler, loop=loop), plan, range(7), 4, progress=False)
    for i in range(7):
        diff = np.abs(one[i].astype(int) - four[i].astype(int)).max()
        assert diff <= 1, f"frame {i} differs by {diff} levels between batch 1 and 4"
    # Different frames are different images (the test would pass on a constant model).
    assert np.abs(one[0].astype(int) - one[6].astype(int)).max() > 5


def test_every_frame_is_rendered_in_its_uninterrupted_batch_and_slot():
    """Whatever subset of frames is rendered (a resume, a retry), frame i goes to the model
    in a batch of B at slot i % B, beside frames of its own window (i // B)."""
    assert batches([1, 2, 5, 9, 10], 4) == [[1, 2], [5], [9, 10]]
    assert slots([1, 2], 4) == [2, 1, 2, 2] and slots([9, 10], 4) == [10, 9, 10, 10]
    seen = []

    class Recorder:
        def render(self, contexts, noises, seeds, **kw):
            seen.append(list(seeds))
            return np.array([np.full((8, 8, 3), s % 251, np.uint8) for s in seeds])

    plan = _plan(11)
    out = render_frames(Recorder(), plan, [10, 2, 1, 5, 9], 4, progress=False)
    seeds = [plan.frame(i).seed for i in range(11)]
    for call in seen:
        frames = [seeds.index(s) for s in call]
        window = frames[0] // 4
        assert all(f // 4 == window for f in frames) and all(call[f % 4] == seeds[f] for f in frames)
    assert sorted(out) == [1, 2, 5, 9, 10] and all(out[i][0, 0, 0] == seeds[i] % 251 for i in out)


def test_aligned_batches_make_resume_and_retries_exact_under_bfloat16():
    """Under mixed_bfloat16 (what precision "auto" picks on CPUs with bfloat16 in hardware)
    a kernel's rounding can depend on the batch: frame i is always rendered in the batch an
    uninterrupted run puts it in, at the same slot (batch i // B, slot i % B), so a resumed
    run (some frames missing) and a retried frame are the uninterrupted run's images, bit
    for bit. Between batch sizes frames may move within the documented bound."""
    from tiny import make_tiny_model

    with dtype_policy("mixed_bfloat16"):
        model = make_tiny_model(seed=3)
    assert model.diffusion_model.layers[1].compute_dtype == "bfloat16"
    plan = _plan(7)
    full = render_frames(_renderer(model), plan, range(7), 3, progress=False)
    resumed = render_frames(_renderer(model), plan, [1, 2, 4], 3, progress=False)
    retried = {i: render_frames(_renderer(model), plan, [i], 3, progress=False)[i] for i in (5, 6)}
    for i, image in {**resumed, **retried}.items():
        assert np.array_equal(image, full[i]), f"frame {i} is not the uninterrupted run's"
    one = render_frames(_renderer(model), plan, range(7), 1, progress=False)
    diffs = np.stack([np.abs(one[i].astype(int) - full[i].astype(int)) for i in range(7)])
    # README's bound for mixed_bfloat16 across batch sizes (measured worst: max 14, mean 1.1
    # levels on an AMX CPU, random SD weights, 2 steps); 0 on AVX512_BF16 CPUs seen so far.
    assert diffs.mean() <= 2 and diffs.max() <= 32
    assert np.abs(full[0].astype(int) - full[6].astype(int)).max() > 5  # distinct frames


@pytest.mark.parametrize("scheduler", ["lcm", "tcd"])
def test_consistency_samplers_default_to_four_conditional_passes(tiny, scheduler):
    """lcm/tcd without steps or guidance: 4 steps at guidance 1, i.e. 4 UNet calls on
    the batch itself (no unconditional half), and the sampler's noise changes the image."""
    from sdanim.config.settings import RenderSettings

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

    from sdanim.model.compiled import forget_compiled

    uncond = np.zeros((77, 16), np.float32)
    a = Renderer(tiny.diffusion_model, tiny.decoder, RenderSettings(height=64, width=64, num_steps=2), uncond)
    b = Renderer(tiny.diffusion_model, tiny.decoder, RenderSettings(height=64, width=64, num_steps=5, guidance_scale=3.0), uncond)
    assert a._step_eps(False) is b._step_eps(False) and a._decode_fn is b._decode_fn
    forget_compiled(tiny.diffusion_model)
    c = Renderer(tiny.diffusion_model, tiny.decoder, RenderSettings(height=64, width=64, num_steps=2), uncond)
    assert c._step_eps(False) is not a._step_eps(False) and c._decode_fn is a._decode_fn

    from tiny import make_tiny_model

    other = make_tiny_model()
    r = Renderer(other.diffusion_model, other.decoder, RenderSettings(height=64, width=64, num_steps=2), uncond)
    contexts, noises = random_inputs(1, 64, 64)
    r.render(contexts, noises, [0])
    gone = weakref.ref(other.diffusion_model)
    del other, r
    gc.collect()
    assert gone() is None


@pytest.mark.parametrize("loop", ["steps", "program"])
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_context_projections_made_once_give_the_same_frames(loop, guidance):
    """With a context model (sdanim.context_cache) the context's projections are made
    once per batch instead of at every step; the frames must be those of the UNet
    projecting the context itself at every step."""
    from sdanim.model import context_cache
    from tiny import attach_context_cache, make_tiny_model

    model = make_tiny_model(context_cache=False)
    contexts, noises = random_inputs(2, 64, 64)
    uncond = np.random.default_rng(5).standard_normal((77, CONTEXT_DIM)).astype(np.float32)
    settings = _settings(guidance_scale=guidance, num_steps=4, scheduler="euler_a")
    plain = Renderer(model.diffusion_model, model.decoder, settings, uncond, loop=loop)
    assert plain._kv_fn is None
    expected = plain.render(contexts, noises, [3, 4])
    attach_context_cache(model.diffusion_model)
    cached = Renderer(model.diffusion_model, model.decoder, settings, uncond, loop=loop)
    assert cached._kv_fn is not None and context_cache.context_model(model.diffusion_model) is not None
    assert np.abs(cached.render(contexts, noises, [3, 4]).astype(int) - expected).max() <= 1
    if loop == "steps":
        np.testing.assert_allclose(
            np.asarray(cached.sample_latents(contexts, noises, [3, 4])),
            np.asarray(plain.sample_latents(contexts, noises, [3, 4])), atol=1e-5)
    context_cache.detach(model.diffusion_model)  # a renderer made before still renders right
    assert context_cache.context_model(model.diffusion_model) is None
    assert np.abs(cached.render(contexts, noises, [3, 4]).astype(int) - expected).max() <= 1


def test_a_unet_call_in_reuse_reads_the_given_projections(tiny):
    """Inside `reuse` the UNet takes its context projections from the tensors given (so
    a render that passed stale ones would show); outside it projects again."""
    from keras import ops

    from sdanim.model import context_cache

    unet = tiny.diffusion_model
    contexts, noises = random_inputs(2, 64, 64)
    inputs = [noises, np.ones((2, 320), np.float32), contexts]
    own = ops.convert_to_numpy(unet(inputs))
    projections = [context_cache.context_model(unet)(contexts)]  # one projection layer
    with context_cache.reuse(unet, projections):
        same = ops.convert_to_numpy(unet(inputs))
    with context_cache.reuse(unet, [ops.zeros_like(p) for p in projections]):
        zeroed = ops.convert_to_numpy(unet(inputs))
    np.testing.assert_allclose(same, own, atol=1e-6)
    assert np.abs(zeroed - own).max() > 1e-3
    np.testing.assert_allclose(ops.convert_to_numpy(unet(inputs)), own, atol=1e-6)  # not left behind


def test_many_models_render_without_tensorflow_retracing_warnings(caplog):
    """Each model's compiled function is its own: TensorFlow must not see a new model
    (another upscaler tile size, another renderer's model) as a retrace and warn."""
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("a TensorFlow warning")
    contexts, noises = random_inputs(1, 64, 64)
    uncond = np.zeros((77, CONTEXT_DIM), np.float32)
    with caplog.at_level("WARNING", logger="tensorflow"):
        for seed in range(7):
            model = make_tiny_model(seed=seed)
            Renderer(model.diffusion_model, model.decoder, _settings(num_steps=2, batch_size=1), uncond).render(
                contexts, noises, [1])
    assert not [r for r in caplog.records if "retracing" in r.getMessage()]
