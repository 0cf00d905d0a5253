"""Each sampler against the diffusers scheduler users trust, step by step.

A deterministic stand-in model gives both loops the same noise predictions; the
latents must agree after every step within 2e-5 of their scale (max |latent|, at least
1): float32 rounding relative to the values compared, whatever torch version computes
the reference (an absolute 1e-4 failed on latents of scale 10 with torch 2.14).
Ancestral samplers get the same per-step noise (diffusers' randn_tensor is patched to
hand it over).
"""

import numpy as np
import pytest

from conftest import require  # noqa: E402

torch = require("torch")
diffusers = require("diffusers")

from sdanim.core.schedulers import DDIM, alphas_cumprod, keras_cv_timesteps, make_scheduler  # noqa: E402

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
SHAPE = (2, 4, 8, 8)


def _reference(name, betas="scaled_linear"):
    d = diffusers
    SD = dict(globals()["SD"], beta_schedule=betas)
    if name == "ddim":
        return d.DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    if name == "ddpm":
        return d.DDPMScheduler(**SD, clip_sample=False, variance_type="fixed_small", steps_offset=1, timestep_spacing="leading")
    if name == "euler":
        return d.EulerDiscreteScheduler(**SD, timestep_spacing="linspace")
    if name == "euler_trailing":  # AnimateDiff-Lightning's card: trailing spacing on linear betas
        return d.EulerDiscreteScheduler(**SD, timestep_spacing="trailing")
    if name == "euler_a":
        return d.EulerAncestralDiscreteScheduler(**SD, timestep_spacing="linspace")
    if name == "lcm":  # LCMScheduler.from_config(SD's scheduler config), as LCM-LoRA's card loads it
        return d.LCMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if name == "tcd":
        return d.TCDScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if name == "dpmpp_2m":
        return d.DPMSolverMultistepScheduler(
            **SD, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="linspace",
            lower_order_final=True, final_sigmas_type="zero",
        )
    raise KeyError(name)


def _ours(name, n, betas="scaled_linear"):
    return DDIM(n, spacing="leading", betas=betas) if name == "ddim" else make_scheduler(name, n, betas)


def _model(x, t):
    """A smooth, input- and time-dependent stand-in for the UNet's noise prediction."""
    t = float(t)
    return 0.3 * x * np.cos(t / 250.0) + 0.2 * np.sin(x + t / 100.0)


ALL = ["ddim", "ddpm", "euler", "euler_trailing", "euler_a", "dpmpp_2m", "lcm", "tcd"]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("num_steps", [4, 20])
def test_matches_diffusers_step_by_step(name, num_steps, monkeypatch):
    _step_by_step(name, num_steps, "scaled_linear", monkeypatch)


@pytest.mark.parametrize("name", ALL)
def test_animatediffs_linear_betas_match_diffusers(name, monkeypatch):
    """The "linear" betas motion modules were trained on, with every sampler."""
    assert np.abs(alphas_cumprod("linear") - alphas_cumprod()).max() > 1e-3  # not the same schedule
    _step_by_step(name, 6, "linear", monkeypatch)


def _step_by_step(name, num_steps, betas, monkeypatch):
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    step_noises = rng.standard_normal((num_steps, *SHAPE)).astype(np.float32)

    ref = _reference(name, betas)
    ref.set_timesteps(num_steps)
    ours = _ours(name, num_steps, betas)
    np.testing.assert_allclose(np.asarray(ref.timesteps, np.float64), ours.timesteps, atol=1e-4)
    assert abs(float(ref.init_noise_sigma) - ours.init_noise_sigma) < 1e-4

    handed = iter(step_noises)
    module = __import__(type(ref).__module__, fromlist=["randn_tensor"])
    if hasattr(module, "randn_tensor"):
        monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: torch.from_numpy(next(handed)))

    x_ref = torch.from_numpy(noise) * ref.init_noise_sigma
    x_ours = noise * ours.init_noise_sigma
    prev = None
    for i, t in enumerate(ref.timesteps):
        eps_ref = torch.from_numpy(_model(ref.scale_model_input(x_ref, t).numpy(), t).astype(np.float32))
        x_ref = ref.step(eps_ref, t, x_ref).prev_sample

        eps = _model(x_ours * ours.input_scale(i), ours.timesteps[i]).astype(np.float32)
        x_ours, prev = ours.step(i, x_ours, eps, prev, step_noises[i] if ours.needs_noise else None)
        diff = np.abs(x_ref.numpy() - x_ours).max()
        scale = max(1.0, float(np.abs(x_ref.numpy()).max()))
        assert diff < 2e-5 * scale, f"{name}: step {i} (t={float(t)}) differs by {diff} (scale {scale:.2f})"
    # The run went somewhere: the last latent is far from the starting noise.
    assert np.abs(x_ours - noise * ours.init_noise_sigma).max() > 0.1


def test_schedule_matches_keras_cv_constants():
    from keras_cv.src.models.stable_diffusion.constants import _ALPHAS_CUMPROD

    np.testing.assert_allclose(alphas_cumprod(), np.array(_ALPHAS_CUMPROD), atol=1e-6)


def test_keras_cv_ddim_spacing():
    # KerasCV: round(arange(N) * 999 / (N - 1)), walked backwards; final alpha 1.
    np.testing.assert_array_equal(keras_cv_timesteps(5), [999, 749, 500, 250, 0])
    sched = DDIM(5)
    assert sched.alphas_prev[-1] == 1.0
    np.testing.assert_allclose(sched.alphas_prev[:-1], sched.alphas[1:])


def test_unknown_scheduler():
    from sdanim.config.errors import SdanimError

    with pytest.raises(SdanimError, match=r"scheduler must be one of .*Received: scheduler='lms'"):
        make_scheduler("lms", 10)


@pytest.mark.parametrize("name", ALL)
def test_noised_matches_diffusers_add_noise(name):
    """Where image-to-image starts and what inpainting restores: x0 noised to step i,
    as diffusers' add_noise puts it (img2img/inpaint pipelines call exactly that)."""
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    ref = _reference(name)
    ref.set_timesteps(10)
    ours = _ours(name, 10)
    for i in (0, 3, 9):
        t = ref.timesteps[i : i + 1]
        if hasattr(ref, "sigmas"):
            ref._step_index = None
            ref._begin_index = None
        expected = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t).numpy()
        got = ours.noised(i, x0, noise)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=f"{name}: step {i}")
    assert ours.noised(10, x0, noise) is x0  # after the last step: the clean latent itself


def test_steps_for_strength():
    from sdanim.config.errors import SdanimError
    from sdanim.core.schedulers import steps_for_strength

    assert [steps_for_strength(s, 10) for s in (0, 0.01, 0.5, 0.74, 1)] == [0, 1, 5, 7, 10]
    for bad in (-0.1, 1.5, "0.5", True):
        with pytest.raises(SdanimError, match="strength must be in"):
            steps_for_strength(bad, 10)


def test_consistency_sampler_errors():
    from sdanim.config.errors import SdanimError
    from sdanim.core.schedulers import LCM, TCD

    with pytest.raises(SdanimError, match=r"steps must be from 1 to 50 with the lcm and tcd samplers.*Received: steps=60"):
        make_scheduler("lcm", 60)
    with pytest.raises(SdanimError, match=r"gamma must be in \[0, 1\]\. Received: gamma=1\.5"):
        TCD(4, gamma=1.5)
    x = np.ones(SHAPE, np.float32)
    with pytest.raises(SdanimError, match="the lcm sampler needs each step's noise"):
        LCM(4).step(0, x, x, None, None)
    with pytest.raises(SdanimError, match="the tcd sampler needs each step's noise"):
        TCD(4).step(0, x, x, None, None)
