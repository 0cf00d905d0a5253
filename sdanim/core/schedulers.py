"""Samplers: pure schedule math plus one `step` per family, on any Keras backend.

Every scheduler shares one signature (k-diffusion style):

    scheduler.timesteps[i]          -> the timestep the UNet is told at step i
    scheduler.input_scale(i)        -> c_in: the UNet sees x * c_in
    scheduler.init_noise_sigma      -> x_T = noise * init_noise_sigma
    scheduler.step(i, x, eps, prev_denoised, noise) -> (x_next, denoised)
    scheduler.noised(i, x0, noise)  -> the state x_i for a clean latent x0 (x_N = x0):
                                       where image-to-image starts and what
                                       inpainting puts back outside the mask

`eps` is the guided noise prediction, `denoised` the predicted clean latent x0 (step
views use it), `noise` the step's fresh noise for ancestral samplers (None otherwise).
Coefficients are Python floats computed once in float64; `x`, `eps` and `noise` are
backend tensors, so the update stays on the device.

Each is checked step by step against the matching diffusers scheduler in the tests.
"""

from __future__ import annotations

import math

import numpy as np

from sdanim.config.errors import check
from sdanim.config.choices import BETA_SCHEDULES, SCHEDULERS

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012


def timestep_embedding(timestep: float, dim: int = 320, max_period: float = 10000.0) -> np.ndarray:
    """Sinusoidal timestep embedding (Vaswani et al. 2017), [cos, sin] order, as
    KerasCV's `_get_timestep_embedding` computes it. Returns (dim,) float32."""
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(0, half, dtype=np.float32) / half).astype(np.float32)
    args = np.float32(timestep) * freqs
    return np.concatenate([np.cos(args), np.sin(args)]).astype(np.float32)


def check_betas(betas: str) -> None:
    check(betas in BETA_SCHEDULES,
          f"betas must be one of {', '.join(BETA_SCHEDULES)}. Received: betas={betas!r}")


def alphas_cumprod(betas: str = "scaled_linear") -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) (DDPM eq. 4) for SD's "scaled_linear"
    betas, linspace(sqrt(b0), sqrt(b1), 1000)**2, or the "linear" betas
    linspace(b0, b1, 1000) AnimateDiff's motion modules were trained on."""
    check_betas(betas)
    if betas == "linear":
        values = np.linspace(BETA_START, BETA_END, NUM_TRAIN_TIMESTEPS, dtype=np.float64)
    else:
        values = np.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=np.float64) ** 2
    return np.cumprod(1.0 - values)


def keras_cv_timesteps(num_steps: int) -> np.ndarray:
    """KerasCV's DDIM spacing, descending: round(arange(N) * 999 / (N - 1))."""
    ratio = (NUM_TRAIN_TIMESTEPS - 1) / (num_steps - 1) if num_steps > 1 else NUM_TRAIN_TIMESTEPS
    return (np.arange(num_steps) * ratio).round().astype(np.int64)[::-1].copy()


def leading_timesteps(num_steps: int, steps_offset: int = 1) -> np.ndarray:
    """diffusers' "leading" spacing (SD's default config), descending."""
    ratio = NUM_TRAIN_TIMESTEPS // num_steps
    return (np.arange(num_steps) * ratio).round().astype(np.int64)[::-1] + steps_offset


class Scheduler:
    """Base: holds the schedule; subclasses define `step`."""

    name = ""
    needs_noise = False
    init_noise_sigma = 1.0

    def __init__(self, num_steps: int, betas: str = "scaled_linear"):
        check(
            isinstance(num_steps, int) and num_steps >= 1,
            f"steps must be at least 1. Received: steps={num_steps}",
        )
        self.num_steps = num_steps
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod(betas)

    def input_scale(self, i: int) -> float:
        return 1.0

    def step(self, i, x, eps, prev_denoised=None, noise=None):  # pragma: no cover
        raise NotImplementedError

    def noise_levels(self, i: int) -> tuple[float, float]:
        """(a, b) with x_i = a * x0 + b * noise; (1, 0) at i = num_steps."""
        raise NotImplementedError  # pragma: no cover

    def noised(self, i: int, x0, noise):
        """x0 noised to the level the loop holds before step i (x0 itself at i = N)."""
        a, b = self.noise_levels(i)
        return x0 if b == 0.0 else a * x0 + b * noise

    def coefficients(self, start: int = 0) -> np.ndarray:
        """Every step as a table, for loops compiled as one program: (N, 6) float64 rows
        (d_x, d_eps, n_x, n_eps, n_prev, n_noise) with

            denoised = d_x * x + d_eps * eps
            x_next   = n_x * x + n_eps * eps + n_prev * prev_denoised + n_noise * noise

        Every sampler's step is linear in (x, eps, prev_denoised, noise), so the rows are
        read off `step` itself by feeding it unit inputs: the table cannot drift from
        the step it stands for. Row `start` is the first step a loop runs (image-to-image
        starts later), taken without a previous prediction as the loop's first step is.
        """
        rows = np.zeros((self.num_steps, 6))
        for i in range(self.num_steps):
            first = i == start
            x_only = self.step(i, 1.0, 0.0, None if first else 0.0, 0.0)
            eps_only = self.step(i, 0.0, 1.0, None if first else 0.0, 0.0)
            prev_only = (0.0, 0.0) if first else self.step(i, 0.0, 0.0, 1.0, 0.0)
            noise_only = self.step(i, 0.0, 0.0, None if first else 0.0, 1.0)
            rows[i] = (x_only[1], eps_only[1], x_only[0], eps_only[0], prev_only[0], noise_only[0])
        return rows


def steps_for_strength(strength: float, num_steps: int) -> int:
    """How many of `num_steps` an image-to-image run at `strength` takes: none at 0,
    all at 1, otherwise round(strength * N) but at least one."""
    check(
        isinstance(strength, (int, float)) and not isinstance(strength, bool) and 0.0 <= strength <= 1.0,
        f"strength must be in [0, 1] (0 keeps the image, 1 ignores it). Received: strength={strength!r}",
    )
    if strength == 0:
        return 0
    return min(num_steps, max(1, int(round(strength * num_steps))))


class DDIM(Scheduler):
    """DDIM with eta = 0 (Song et al. 2020, eq. 12).

    Args:
        num_steps: int. Number of steps.
        spacing: str. "keras-cv" (KerasCV's round(linspace) spacing, the previous
            alpha being the next timestep's and 1 after the last: bit-for-bit the
            schedule of KerasCV's generate_image) or "leading" (diffusers' SD
            config: t - 1000 // N, steps_offset 1, final alpha alpha_bar_0).
    """

    name = "ddim"

    def __init__(self, num_steps: int, spacing: str = "keras-cv", betas: str = "scaled_linear"):
        super().__init__(num_steps, betas)
        ac = self.alphas_cumprod
        if spacing == "keras-cv":
            self.timesteps = keras_cv_timesteps(num_steps)
            prev = [ac[t] for t in self.timesteps[1:]] + [1.0]
        elif spacing == "leading":
            self.timesteps = leading_timesteps(num_steps)
            ratio = NUM_TRAIN_TIMESTEPS // num_steps
            prev = [ac[t - ratio] if t - ratio >= 0 else ac[0] for t in self.timesteps]
        else:
            raise ValueError(f"spacing must be 'keras-cv' or 'leading'. Received: spacing={spacing!r}")
        self.alphas = np.array([ac[t] for t in self.timesteps])
        self.alphas_prev = np.array(prev)

    def noise_levels(self, i: int) -> tuple[float, float]:
        if i >= self.num_steps:
            return 1.0, 0.0
        a = float(self.alphas[i])  # DDPM eq. 4: x_t = sqrt(a) x0 + sqrt(1 - a) eps
        return math.sqrt(a), math.sqrt(1.0 - a)

    def step(self, i, x, eps, prev_denoised=None, noise=None):
        a, a_prev = float(self.alphas[i]), float(self.alphas_prev[i])
        # DDIM eq. 12 with sigma_t = 0: x0 = (x - sqrt(1-a) eps) / sqrt(a)
        denoised = (x - math.sqrt(1.0 - a) * eps) / math.sqrt(a)
        x_next = math.sqrt(a_prev) * denoised + math.sqrt(1.0 - a_prev) * eps
        return x_next, denoised


class DDPM(Scheduler):
    """Ancestral DDPM sampling (Ho et al. 2020, eqs. 6-7), "fixed_small" variance,
    on diffusers' leading spacing with steps_offset 1."""

    name = "ddpm"
    needs_noise = True

    def __init__(self, num_steps: int, betas: str = "scaled_linear"):
        super().__init__(num_steps, betas)
        ac = self.alphas_cumprod
        self.timesteps = leading_timesteps(num_steps)
        ratio = NUM_TRAIN_TIMESTEPS // num_steps
        self.alphas = np.array([ac[t] for t in self.timesteps])
        self.alphas_prev = np.array([ac[t - ratio] if t - ratio >= 0 else 1.0 for t in self.timesteps])

    noise_levels = DDIM.noise_levels

    def step(self, i, x, eps, prev_denoised=None, noise=None):
        a, a_prev = float(self.alphas[i]), float(self.alphas_prev[i])
        alpha_t = a / a_prev
        beta_t = 1.0 - alpha_t
        denoised = (x - math.sqrt(1.0 - a) * eps) / math.sqrt(a)
        # Posterior mean, DDPM eq. 7.
        coef_x0 = math.sqrt(a_prev) * beta_t / (1.0 - a)
        coef_xt = math.sqrt(alpha_t) * (1.0 - a_prev) / (1.0 - a)
        x_next = coef_x0 * denoised + coef_xt * x
        if int(self.timesteps[i]) > 0 and noise is not None:
            variance = max((1.0 - a_prev) / (1.0 - a) * beta_t, 1e-20)
            x_next = x_next + math.sqrt(variance) * noise
        return x_next, denoised


class _SigmaScheduler(Scheduler):
    """Schedules in sigma space, sigma = sqrt((1 - alpha_bar) / alpha_bar) (Karras et
    al. 2022), on diffusers' "linspace" spacing with sigmas interpolated at fractional
    timesteps (or "trailing": every 1000/N-th timestep counted down from 999, as
    few-step distilled models were trained to be sampled) and a final sigma of 0."""

    spacing = "linspace"

    def __init__(self, num_steps: int, betas: str = "scaled_linear"):
        super().__init__(num_steps, betas)
        ac = self.alphas_cumprod
        all_sigmas = np.sqrt((1.0 - ac) / ac)
        if self.spacing == "trailing":
            self.timesteps = np.arange(NUM_TRAIN_TIMESTEPS, 0, -NUM_TRAIN_TIMESTEPS / num_steps).round() - 1.0
        else:
            self.timesteps = np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, num_steps)[::-1].copy()
        sigmas = np.interp(self.timesteps, np.arange(NUM_TRAIN_TIMESTEPS), all_sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]])
        self.init_noise_sigma = float(self.sigmas.max())

    def input_scale(self, i: int) -> float:
        return 1.0 / math.sqrt(float(self.sigmas[i]) ** 2 + 1.0)

    def noise_levels(self, i: int) -> tuple[float, float]:
        return 1.0, float(self.sigmas[min(i, self.num_steps)])  # x = x0 + sigma * eps


class Euler(_SigmaScheduler):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 1)."""

    name = "euler"

    def step(self, i, x, eps, prev_denoised=None, noise=None):
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        denoised = x - sigma * eps
        return x + (sigma_next - sigma) * eps, denoised


class EulerTrailing(Euler):
    """Euler on "trailing" spacing (diffusers' EulerDiscreteScheduler with
    timestep_spacing="trailing"): what AnimateDiff-Lightning and other few-step distilled
    models are sampled with (1-8 steps, guidance 1)."""

    name = "euler_trailing"
    spacing = "trailing"


class EulerAncestral(_SigmaScheduler):
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise up to
    sigma_next (k-diffusion's sample_euler_ancestral, eta = 1)."""

    name = "euler_a"
    needs_noise = True

    def step(self, i, x, eps, prev_denoised=None, noise=None):
        s_from, s_to = float(self.sigmas[i]), float(self.sigmas[i + 1])
        s_up = math.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
        s_down = math.sqrt(s_to**2 - s_up**2)
        denoised = x - s_from * eps
        x_next = x + (s_down - s_from) * eps
        if noise is not None and s_up > 0:
            x_next = x_next + s_up * noise
        return x_next, denoised


class DPMSolverPP2M(Scheduler):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), data prediction, midpoint form,
    first order at the first and the last step (diffusers' defaults: linspace spacing
    over N + 1 points, final sigma 0)."""

    name = "dpmpp_2m"

    def __init__(self, num_steps: int, betas: str = "scaled_linear"):
        super().__init__(num_steps, betas)
        ac = self.alphas_cumprod
        all_sigmas = np.sqrt((1.0 - ac) / ac)
        t = np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, num_steps + 1).round()[::-1][:-1]
        self.timesteps = t.astype(np.int64).copy()
        sigmas = np.interp(self.timesteps, np.arange(NUM_TRAIN_TIMESTEPS), all_sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]])

    @staticmethod
    def _alpha_sigma(sigma: float) -> tuple[float, float]:
        alpha = 1.0 / math.sqrt(sigma**2 + 1.0)
        return alpha, sigma * alpha

    def noise_levels(self, i: int) -> tuple[float, float]:
        return self._alpha_sigma(float(self.sigmas[min(i, self.num_steps)]))  # VP form

    def step(self, i, x, eps, prev_denoised=None, noise=None):
        s0, s_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        alpha_s0, sigma_s0 = self._alpha_sigma(s0)
        denoised = (x - sigma_s0 * eps) / alpha_s0  # data prediction x0
        if s_next == 0.0:
            return denoised, denoised  # lambda_t = inf: the first-order update is x0
        alpha_t, sigma_t = self._alpha_sigma(s_next)
        lambda_t = math.log(alpha_t) - math.log(sigma_t)
        lambda_s0 = math.log(alpha_s0) - math.log(sigma_s0)
        h = lambda_t - lambda_s0
        phi = math.expm1(-h)  # exp(-h) - 1
        x_next = (sigma_t / sigma_s0) * x - (alpha_t * phi) * denoised
        if i == 0 or prev_denoised is None:
            return x_next, denoised  # DPM-Solver++(1S), i.e. DDIM in lambda
        alpha_s1, sigma_s1 = self._alpha_sigma(float(self.sigmas[i - 1]))
        h_0 = lambda_s0 - (math.log(alpha_s1) - math.log(sigma_s1))
        r0 = h_0 / h
        d1 = (1.0 / r0) * (denoised - prev_denoised)
        return x_next - (0.5 * alpha_t * phi) * d1, denoised


def consistency_timesteps(num_steps: int, original_steps: int = 50) -> np.ndarray:
    """LCM's and TCD's schedule (diffusers' LCMScheduler.set_timesteps): every k-th
    training timestep of the `original_steps`-step distillation schedule (k = 1000 //
    original_steps: 999, 979, ..., 19), then `num_steps` of them taken evenly by index
    ("skipping steps"). Descending."""
    check(
        isinstance(num_steps, int) and 1 <= num_steps <= original_steps,
        f"steps must be from 1 to {original_steps} with the lcm and tcd samplers (their "
        f"{original_steps}-step distillation schedule). Received: steps={num_steps}",
    )
    k = NUM_TRAIN_TIMESTEPS // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]  # (50,) 999 ... 19
    index = np.floor(np.linspace(0, original_steps, num_steps, endpoint=False)).astype(np.int64)
    return origin[index].copy()


class LCM(Scheduler):
    """Latent Consistency Model sampling (Luo et al. 2023, Alg. 1; diffusers'
    LCMScheduler): at each step the consistency function's answer
    f(x, t) = c_skip(t) x + c_out(t) x0(x, eps) (Song et al. 2023, eq. 7, sigma_data 0.5,
    t scaled by 10), then fresh noise back up to the next timestep; the last step's
    answer is the sample. Made for LCM-distilled weights (LCM-LoRA), 2-8 steps.
    """

    name = "lcm"
    needs_noise = True
    SIGMA_DATA = 0.5
    TIMESTEP_SCALING = 10.0

    def __init__(self, num_steps: int, betas: str = "scaled_linear"):
        super().__init__(num_steps, betas)
        ac = self.alphas_cumprod
        self.timesteps = consistency_timesteps(num_steps)
        self.alphas = np.array([ac[t] for t in self.timesteps])

    noise_levels = DDIM.noise_levels

    def boundary_scalings(self, i: int) -> tuple[float, float]:
        """(c_skip, c_out) at step i: c_skip -> 1 and c_out -> 0 as t -> 0 (eq. 7)."""
        st = float(self.timesteps[i]) * self.TIMESTEP_SCALING
        c_skip = self.SIGMA_DATA**2 / (st**2 + self.SIGMA_DATA**2)
        c_out = st / math.sqrt(st**2 + self.SIGMA_DATA**2)
        return c_skip, c_out

    def step(self, i, x, eps, prev_denoised=None, noise=None):
        a = float(self.alphas[i])
        x0 = (x - math.sqrt(1.0 - a) * eps) / math.sqrt(a)  # DDIM eq. 12's x0
        c_skip, c_out = self.boundary_scalings(i)
        denoised = c_out * x0 + c_skip * x
        if i == self.num_steps - 1:
            return denoised, denoised
        check(noise is not None, "the lcm sampler needs each step's noise")
        a_next = float(self.alphas[i + 1])  # forward process to the next timestep (DDPM eq. 4)
        return math.sqrt(a_next) * denoised + math.sqrt(1.0 - a_next) * noise, denoised


class TCD(Scheduler):
    """Trajectory Consistency Distillation's strategic stochastic sampling (Zheng et al.
    2024, eq. 11; diffusers' TCDScheduler): predict x0, go back along the trajectory to
    s = floor((1 - gamma) t_next) with the predicted noise, then forward to t_next with
    fresh noise. gamma = 0 is deterministic; diffusers' and the TCD authors' default is
    0.3. Made for TCD-distilled weights (TCD-LoRA), 2-8 steps.

    Args:
        num_steps: int. Number of steps (at most 50).
        gamma: float in [0, 1]. Stochasticity (diffusers' `eta`). Defaults to 0.3.
    """

    name = "tcd"
    needs_noise = True

    def __init__(self, num_steps: int, gamma: float = 0.3, betas: str = "scaled_linear"):
        super().__init__(num_steps, betas)
        check(0.0 <= gamma <= 1.0, f"gamma must be in [0, 1]. Received: gamma={gamma!r}")
        self.gamma = float(gamma)
        ac = self.alphas_cumprod
        self.timesteps = consistency_timesteps(num_steps)
        self.alphas = np.array([ac[t] for t in self.timesteps])
        nxt = np.append(self.timesteps[1:], 0)  # t_{i+1}; 0 after the last step
        # floor((1 - gamma) t_next), computed in float32 as diffusers computes it.
        self.s = np.floor(np.float32(1.0 - self.gamma) * nxt.astype(np.float32)).astype(np.int64)
        self.alphas_next = np.array([ac[t] for t in nxt])
        self.alphas_s = np.array([ac[t] for t in self.s])

    noise_levels = DDIM.noise_levels

    def step(self, i, x, eps, prev_denoised=None, noise=None):
        a, a_s, a_next = float(self.alphas[i]), float(self.alphas_s[i]), float(self.alphas_next[i])
        x0 = (x - math.sqrt(1.0 - a) * eps) / math.sqrt(a)
        noised = math.sqrt(a_s) * x0 + math.sqrt(1.0 - a_s) * eps  # back to s along the trajectory
        if self.gamma == 0.0 or i == self.num_steps - 1:
            return noised, x0
        check(noise is not None, "the tcd sampler needs each step's noise")
        ratio = a_next / a_s
        return math.sqrt(ratio) * noised + math.sqrt(1.0 - ratio) * noise, x0


class FlowEuler(Scheduler):
    """Euler on the rectified flow of SD3 (Esser et al. 2024): x_t = (1 - sigma) x0 +
    sigma noise, the model predicts the velocity v = noise - x0, and a step moves x along
    it, x_next = x + (sigma_next - sigma) v. The sigmas are diffusers'
    FlowMatchEulerDiscreteScheduler's (and KerasHub's): the training sigmas t / 1000
    shifted, sigma -> shift sigma / (1 + (shift - 1) sigma), N of them spaced evenly
    between the first and last of those, shifted once more, then 0. The model takes
    timestep = 1000 sigma.
    """

    name = "flow_euler"

    def __init__(self, num_steps: int, betas: str = "scaled_linear", shift: float = 3.0):
        super().__init__(num_steps, betas)
        self.shift = float(shift)
        train = self._shifted(np.arange(NUM_TRAIN_TIMESTEPS, 0, -1) / NUM_TRAIN_TIMESTEPS)
        spaced = np.linspace(train[0] * NUM_TRAIN_TIMESTEPS, train[-1] * NUM_TRAIN_TIMESTEPS, num_steps)
        sigmas = self._shifted(spaced / NUM_TRAIN_TIMESTEPS)
        self.timesteps = sigmas * NUM_TRAIN_TIMESTEPS
        self.sigmas = np.concatenate([sigmas, [0.0]])

    def _shifted(self, sigma):
        return self.shift * sigma / (1.0 + (self.shift - 1.0) * sigma)

    def noise_levels(self, i: int) -> tuple[float, float]:
        sigma = float(self.sigmas[min(i, self.num_steps)])
        return 1.0 - sigma, sigma

    def step(self, i, x, eps, prev_denoised=None, noise=None):
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        return x + (sigma_next - sigma) * eps, x - sigma * eps  # eps: the velocity


_REGISTRY = {
    "ddim": DDIM,
    "ddpm": DDPM,
    "euler": Euler,
    "euler_trailing": EulerTrailing,
    "euler_a": EulerAncestral,
    "dpmpp_2m": DPMSolverPP2M,
    "lcm": LCM,
    "tcd": TCD,
    "flow_euler": FlowEuler,
}
assert tuple(_REGISTRY) == SCHEDULERS


def make_scheduler(name: str, num_steps: int, betas: str = "scaled_linear") -> Scheduler:
    """The scheduler called `name` (one of `SCHEDULERS`) on SD's "scaled_linear" betas or
    the "linear" ones AnimateDiff's motion modules were trained on."""
    check(
        name in _REGISTRY,
        f"scheduler must be one of {', '.join(SCHEDULERS)}. Received: scheduler={name!r}",
    )
    check_betas(betas)
    return _REGISTRY[name](num_steps, betas=betas)
