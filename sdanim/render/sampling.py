"""Frame plan -> images: batched sampling with one fused UNet call per step.

KerasCV's generate_image calls the UNet twice per step (unconditional, then
conditional, each at batch B) through predict_on_batch. Here:

1. the unconditional (or negative-prompt) context is encoded once per run;
2. the timestep embeddings of every step are computed once, on the host;
3. each step makes one UNet call on the concatenated (uncond, cond) batch of 2B;
4. ancestral noise for all steps is drawn from each frame's own seed before the loop;
5. every cross-attention's projections of the text context (keys, values) are made
   once per batch, not at every step, where the UNet has a context model
   (`sdanim.model.context_cache`);
6. the decoder runs once per batch;
7. all of it -- every step's UNet call, guidance, the sampler's update (as a table of
   coefficients, `Scheduler.coefficients`), inpainting's reset and the decode -- is one
   compiled program per batch shape: a `fori_loop` inside one tf.function (TensorFlow)
   or one jax.jit (JAX), XLA where asked; torch runs the same loop eagerly. The
   step-at-a-time loop (`sample_latents`) stays for callers that look at every step.

Shapes stay constant: the caller pads the last short batch (see `render_frames`).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from sdanim.config.choices import LOOPS
from sdanim.config.errors import check
from sdanim.config.settings import RenderSettings
from sdanim.core.noise import step_noise
from sdanim.core.runtime import import_keras, keras_ops
from sdanim.core.schedulers import make_scheduler, steps_for_strength, timestep_embedding
from sdanim.model import attention_interp, context_cache
from sdanim.model.controlnet import controlled_unet, guess_scales
from sdanim.model.compiled import compiled


def _context_kv(call, context, uncond=None):
    """A context model's projections (`context_cache`) for the context its model will
    see: (uncond, context) concatenated when guided, else the context. call: the context
    model, or None (no context model: None)."""
    if call is None:
        return None
    ops = keras_ops()
    if uncond is not None:
        context = ops.concatenate([uncond, context], axis=0)  # (B, 77, D) -> (2B, 77, D)
    projections = call(context)
    return list(projections) if isinstance(projections, (list, tuple)) else [projections]


def _guided_eps(m, latent, t_emb, context, uncond, guidance, kv=None):
    """One UNet call on the concatenated batch, then classifier-free guidance.

    m: the calls by name ("unet", ...); latent (B, h, w, 4), t_emb (B, 320), context and
    uncond (B, 77, D), guidance (); kv: `_context_kv(..., context, uncond)`, or None to
    project the context here.
    """
    ops = keras_ops()
    call = m["unet"]

    x2 = ops.concatenate([latent, latent], axis=0)  # (B, h, w, 4) -> (2B, h, w, 4)
    t2 = ops.concatenate([t_emb, t_emb], axis=0)  # (B, 320) -> (2B, 320)
    c2 = ops.concatenate([uncond, context], axis=0)  # (B, 77, D) -> (2B, 77, D)
    with context_cache.reuse(call.model_ref(), kv):
        eps = ops.cast(call([x2, t2, c2]), "float32")  # (2B, h, w, 4)
    return _guide(ops, eps, guidance)


def _guide(ops, eps, guidance):
    eps_uncond, eps_cond = ops.split(eps, 2, axis=0)  # 2 x (B, h, w, 4)
    # Classifier-free guidance (Ho & Salimans 2022, eq. 6).
    return eps_uncond + guidance * (eps_cond - eps_uncond)


def _cond_eps(m, latent, t_emb, context, uncond=None, guidance=None, kv=None):
    """guidance == 1: the guided prediction is the conditional one; skip the other half.
    kv: `_context_kv(..., context)` or None."""
    ops = keras_ops()
    with context_cache.reuse(m["unet"].model_ref(), kv):
        return ops.cast(m["unet"]([latent, t_emb, context]), "float32")


def _net_kvs(m, units: tuple, context, uncond, guided: bool) -> list:
    """Each ControlNet's context projections, for the context it sees: (uncond, context)
    under guidance, the conditional context alone in guess mode or without guidance."""
    return [_context_kv(m.get(f"net_ctx{k}"), context, uncond if guided and not guess else None)
            for k, (guess, _) in enumerate(units)]


def control_residuals(m, units: tuple, latent, t_emb, context, uncond, control) -> list:
    """The 13 residuals the UNet's batch takes, summed over the ControlNets.

    units: ((guess_mode, pooled), ...) per net; control: (hints, scales, net_kvs) with
    hints[k] (B, 8h, 8w, 3), scales (n, B) (each frame's conditioning scale, times the
    net's schedule at this step) and `_net_kvs`. Under guidance (uncond given) a net sees
    the (uncond, cond) batch with the frame's hint on both halves, as diffusers'
    pipeline runs it; in guess mode it sees the conditional half only, its residuals
    weighted 0.1 .. 1 (`controlnet.guess_scales`) and zero for the unconditional half.
    A pooled net's residuals are their means over the image (the shuffle model)."""
    ops = keras_ops()
    hints, scales, net_kvs = control
    guided = uncond is not None

    def both(a, b):
        return ops.concatenate([a, b], axis=0)  # (B, ...) x 2 -> (2B, ...)

    total = None
    for k, (guess, pooled) in enumerate(units):
        scale = scales[k]  # (B,)
        if guided and not guess:
            args = [both(latent, latent), both(t_emb, t_emb), both(uncond, context), both(hints[k], hints[k])]
            scale = both(scale, scale)
        else:
            args = [latent, t_emb, context, hints[k]]
        net = m[f"net{k}"]
        with context_cache.reuse(net.model_ref(), net_kvs[k]):
            residuals = net(args)  # 13 x (R, h_j, w_j, C_j)
        weights = guess_scales() if guess and not pooled else np.ones(len(residuals), np.float32)
        out = []
        for j, r in enumerate(residuals):
            r = ops.cast(r, "float32") * ops.reshape(scale, (-1, 1, 1, 1)) * float(weights[j])
            if pooled:  # (R, h, w, C) -> its mean over the image, everywhere
                r = ops.broadcast_to(ops.mean(r, axis=(1, 2), keepdims=True), ops.shape(r))
            if guided and guess:
                r = both(ops.zeros_like(r), r)  # the unconditional half gets no control
            out.append(r)
        total = out if total is None else [a + b for a, b in zip(total, out)]
    return total


def _controlled_eps(units: tuple, guided: bool) -> Callable:
    """`_guided_eps` / `_cond_eps` through the UNet that takes ControlNet residuals
    (`controlnet.controlled_unet`): control as `control_residuals` takes it."""

    def eps(m, latent, t_emb, context, uncond, guidance, kv, control):
        ops = keras_ops()
        residuals = control_residuals(m, units, latent, t_emb, context, uncond if guided else None, control)
        if guided:
            latent, t_emb = ops.concatenate([latent, latent], 0), ops.concatenate([t_emb, t_emb], 0)
            context = ops.concatenate([uncond, context], axis=0)  # (2B, 77, D)
        with context_cache.reuse(m["unet"].model_ref(), kv):  # the controlled UNet's layers are the UNet's
            out = ops.cast(m["controlled"]([latent, t_emb, context, *residuals]), "float32")
        return _guide(ops, out, guidance) if guided else out

    eps.__name__ = f"controlled_eps_{int(guided)}_" + "".join(f"{int(g)}{int(p)}" for g, p in units)
    return eps


def _eps_fn(guided: bool, units: tuple) -> Callable:
    """The noise prediction of a batch: guided or not, with ControlNets or without.
    Every form takes (m, latent, t_emb, context, uncond, guidance, kv, control)."""
    if units:
        return _controlled_eps(units, guided)
    plain = _guided_eps if guided else _cond_eps

    def eps(m, latent, t_emb, context, uncond, guidance, kv, control=None):
        return plain(m, latent, t_emb, context, uncond, guidance, kv)

    eps.__name__ = plain.__name__
    return eps


def _aid_eps(mode: str, guided: bool, units: tuple = ()) -> Callable:
    """`_eps_fn` with AID's attention interpolation active for the conditional rows
    (`sdanim.model.attention_interp`): aid = (t, a, b, on), one entry per row of the
    batch (frames, then their keyframes' helper rows)."""
    eps_fn = _eps_fn(guided, units)

    def aid_eps(m, latent, t_emb, context, uncond, guidance, kv, control, aid):
        # Guided: the UNet's batch is (uncond, cond), the conditional rows start at B.
        with attention_interp.active(mode, latent.shape[0] if guided else 0, *aid):
            return eps_fn(m, latent, t_emb, context, uncond, guidance, kv, control)

    aid_eps.__name__ = f"aid_eps_{mode}_{int(guided)}_{eps_fn.__name__}"
    return aid_eps


def _decode(m, latent):
    """(B, h, w, 4) latent -> (B, 8h, 8w, 3) float in [-1, 1]."""
    ops = keras_ops()
    return ops.cast(m["decoder"](latent), "float32")


def _loop(ops, step_eps, latent, prev, begin, end, coefs, scales, t_embs, noises=None, kept_region=None):
    """Steps begin..end-1 of a sampler given as a coefficient table (`Scheduler.coefficients`):
    denoised = d_x x + d_eps eps; x = n_x x + n_eps eps + n_prev prev (+ n_noise noise).
    step_eps(model_in, t_emb, i) -> eps. kept_region: (paint, kept, known, noise) or None.
    Returns (latent, the last step's denoised prediction)."""

    def step(i, carry):
        latent, prev = carry
        row = ops.take(coefs, i, axis=0)  # (6,)
        eps = step_eps(latent * ops.take(scales, i, axis=0), ops.take(t_embs, i, axis=0), i)
        denoised = row[0] * latent + row[1] * eps
        latent = row[2] * latent + row[3] * eps + row[4] * prev
        if noises is not None:
            latent = latent + row[5] * ops.take(noises, i, axis=0)
        if kept_region is not None:
            paint, kept, known, noise = kept_region
            level = ops.take(kept, i, axis=0)  # (2,)
            latent = paint * latent + (1.0 - paint) * (level[0] * known + level[1] * noise)
        return latent, denoised

    return ops.fori_loop(begin, end, step, (latent, prev))


def _control_at(ops, control, i):
    """A batch's control inputs (hints, scales (n, B), keeps (N, n), net_kvs) at step i:
    (hints, scales x keeps[i], net_kvs)."""
    hints, scales, keeps, net_kvs = control
    return hints, scales * ops.reshape(ops.take(keeps, i, axis=0), (-1, 1)), net_kvs


def _program(guided: bool, noisy: bool, masked: bool, carried: bool = False, names: tuple = (),
             units: tuple = ()) -> Callable:
    """The whole sampling loop and the decode as one function of tensors, for one kind
    of batch (with or without guidance, per-step noise, a kept region, ControlNets).
    Compiled once per kind and shape (`compiled`); its tables and first step are
    inputs, so another sampler or strength at the same step count changes no trace.

    calls (by `names`): "unet", "decoder", and where they exist "unet_ctx" (the UNet's
    context model: the context's projections made once, before the loop), and for
    ControlNets "controlled" (`controlnet.controlled_unet`), "net{k}", "net_ctx{k}".
    latent (B, h, w, 4): the state before step `start`.
    context, uncond (B, 77, D); guidance (); t_embs (N, B, 320); scales (N,): the UNet
    sees x * scales[i]; coefs (N, 6): `Scheduler.coefficients`; start (): the first step
    this program runs. noises (N, B, h, w, 4): each step's fresh noise (if noisy).
    known, noise (B, h, w, 4), paint (B, h, w, 1), kept (N, 2): after step i the region
    where paint is 0 is reset to kept[i, 0] * known + kept[i, 1] * noise (if masked).
    prev (B, h, w, 4) (if carried): the denoised prediction of the step before `start`,
    where an earlier program ran the first steps (AID's warm-up, `_warm_program`).
    control (with units): (hints (n x (B, 8h, 8w, 3)), scales (n, B), keeps (N, n)).
    Returns (B, 8h, 8w, 3) float32 images in [-1, 1].
    """
    eps_fn = _eps_fn(guided, units)

    def program(calls, latent, context, uncond, guidance, t_embs, scales, coefs, start,
                noises=None, known=None, noise=None, paint=None, kept=None, prev=None, control=None):
        ops = keras_ops()
        m = dict(zip(names, calls))
        kv = _context_kv(m.get("unet_ctx"), context, uncond if guided else None)
        if units:
            control = (*control, _net_kvs(m, units, context, uncond, guided))

        def step_eps(model_in, t_emb, i):
            return eps_fn(m, model_in, t_emb, context, uncond, guidance, kv,
                          _control_at(ops, control, i) if units else None)

        prev = prev if carried else ops.zeros_like(latent)
        latent, _ = _loop(ops, step_eps, latent, prev, start, int(coefs.shape[0]), coefs, scales, t_embs,
                          noises if noisy else None, (paint, kept, known, noise) if masked else None)
        return _decode(m, latent)

    program.__name__ = f"program_{int(guided)}{int(noisy)}{int(masked)}{int(carried)}" + (
        f"_{eps_fn.__name__}" if units else "")
    return program


def _keep_plain(ops, eps, plain, keep):
    """eps (R, h, w, 4) of frames + helper rows, with the frame rows where keep (F,) is
    set replaced by `plain` (F, h, w, 4), the frames' prediction in the plain batch shape."""
    frames = plain.shape[0]
    mixed = ops.where(ops.reshape(ops.cast(keep, "bool"), (-1, 1, 1, 1)), plain, eps[:frames])
    return ops.concatenate([mixed, eps[frames:]], axis=0)


def _frames_control(control, frames: int):
    """A batch's control inputs for its first `frames` rows (hints, scales; keeps and
    the rest as they are)."""
    hints, scales, *rest = control
    return (tuple(h[:frames] for h in hints), scales[:, :frames], *rest)


def _warm_program(guided: bool, noisy: bool, mode: str, exact: bool = False, names: tuple = (),
                  units: tuple = ()) -> Callable:
    """AID's warm-up as one compiled loop: steps start..stop-1 on the frames and their
    keyframes' helper rows with attention interpolation on (`_aid_eps`); returns
    (latent, denoised) for `_program` to carry on from, without the helpers. Arguments
    as `_program`'s, plus stop () and aid (t, a, b, on). exact: keep (F,) marks frame
    rows that do not interpolate (on a keyframe); their prediction comes from a UNet
    call on the F frame rows alone, the plain render's batch shape (`_keep_plain`)."""
    eps_fn = _aid_eps(mode, guided, units)
    plain_fn = _eps_fn(guided, units)

    def warm(calls, latent, context, uncond, guidance, t_embs, scales, coefs, start, stop, aid, noises=None,
             keep=None, control=None):
        ops = keras_ops()
        m = dict(zip(names, calls))
        kv = _context_kv(m.get("unet_ctx"), context, uncond if guided else None)
        if units:
            control = (*control, _net_kvs(m, units, context, uncond, guided))
        if exact:
            frames = keep.shape[0]
            c, u = context[:frames], uncond[:frames]  # (F, 77, D): the frames' rows
            kv_plain = _context_kv(m.get("unet_ctx"), c, u if guided else None)
            if units:
                plain_control = (*_frames_control(control[:3], frames), _net_kvs(m, units, c, u, guided))

        def step_eps(model_in, t_emb, i):
            eps = eps_fn(m, model_in, t_emb, context, uncond, guidance, kv,
                         _control_at(ops, control, i) if units else None, aid)
            if exact:  # (R, h, w, 4) with the keyframe rows of (F, h, w, 4)
                plain = plain_fn(m, model_in[:frames], t_emb[:frames], c, u, guidance, kv_plain,
                                 _control_at(ops, plain_control, i) if units else None)
                eps = _keep_plain(ops, eps, plain, keep)
            return eps

        return _loop(ops, step_eps, latent, ops.zeros_like(latent), start, stop, coefs, scales, t_embs,
                     noises if noisy else None)

    warm.__name__ = f"warm_{int(guided)}{int(noisy)}{int(exact)}_{mode}" + (f"_{plain_fn.__name__}" if units else "")
    return warm


def default_loop(jit_compile: bool) -> str:
    """What loop="auto" runs: "program" on JAX and under XLA, else "steps"."""
    keras = import_keras()
    return "program" if keras.backend.backend() == "jax" or jit_compile else "steps"


def to_uint8(decoded: np.ndarray) -> np.ndarray:
    """[-1, 1] -> uint8, truncating exactly as KerasCV's generate_image does."""
    return np.clip(((decoded + 1.0) / 2.0) * 255.0, 0, 255).astype("uint8")


@dataclasses.dataclass(frozen=True)
class ControlBatch:
    """A batch's ControlNet inputs, one entry per net of the renderer: hints (n x
    (B, 8h, 8w, 3) float32, [0, 1] or -1 where an inpaint hint is masked) and each
    frame's conditioning scale (n, B)."""

    hints: tuple
    scales: np.ndarray

    def rows(self, count: int) -> "ControlBatch":
        return ControlBatch(tuple(h[:count] for h in self.hints), self.scales[:, :count])


def _steps_fn(names: tuple, eps_fn: Callable) -> Callable:
    """An eps function of the step loop over its compiled calls (by `names`)."""

    def eps(calls, *args):
        return eps_fn(dict(zip(names, calls)), *args)

    eps.__name__ = "steps_" + eps_fn.__name__
    return eps


def _nets_kv(units: tuple, guided: bool) -> Callable:
    """The ControlNets' context projections for a batch (the step loop's, once per batch)."""

    def kvs(calls, context, uncond):
        m = {f"net_ctx{k}": call for k, call in enumerate(calls)}
        return _net_kvs(m, units, context, uncond, guided)

    kvs.__name__ = f"nets_kv_{int(guided)}_" + "".join(f"{int(g)}{int(p)}" for g, p in units)
    return kvs


class Renderer:
    """Samples images from (context, noise) batches with a fixed model and settings.

    Args:
        diffusion_model: Keras model `[latent, t_emb, context] -> eps`.
        decoder: Keras model `latent -> image in [-1, 1]`.
        settings: `RenderSettings` (size, steps, guidance, scheduler).
        unconditional_context: (77, D) embedding of "" or of the negative prompt.
        jit_compile: bool. Compile the step with XLA. Defaults to False.
        strength: float in [0, 1]. With initial latents (image-to-image), how much
            of the schedule is run: the latents are noised to step N - round(strength N)
            and denoised from there; 1 ignores them (pure noise, as text-to-image).
            Defaults to 1.
        loop: str. "program" (the whole loop and the decode compiled as one program
            per batch shape), "steps" (one compiled UNet call per step, the sampler's
            update between them in Python, as `sample_latents` runs it) or "auto": the
            program on JAX and under XLA, the steps on TensorFlow without XLA (where
            the program measured 7% slower on CPU: docs/benchmarks.md) and on torch
            (eager either way). Frames are within 1 uint8 level of each other.
            Defaults to "auto".
        controls: sequence of `sdanim.model.controlnet.ControlUnit`: ControlNets whose
            residuals the UNet takes at every step their schedule covers; each batch
            brings their hints and scales (`ControlBatch`). Defaults to none.
        timestep_input: what the model takes for a step's timestep t: SD 1.x/2.x's
            320-wide sinusoidal embedding (the default), SD3's t itself
            (`sdanim.model.sd3.timestep_input`).

    Example:
    ```python
    renderer = Renderer(model.diffusion_model, model.decoder, settings, uncond)
    images = renderer.render(contexts, noises, seeds)  # (B, H, W, 3) uint8
    ```
    """

    def __init__(
        self,
        diffusion_model,
        decoder,
        settings: RenderSettings,
        unconditional_context: np.ndarray,
        jit_compile: bool = False,
        strength: float = 1.0,
        loop: str = "auto",
        controls: Sequence = (),
        timestep_input: Callable = timestep_embedding,
    ):
        check(loop in LOOPS, f"loop must be one of {', '.join(LOOPS)}. Received: loop={loop!r}")
        self.loop = default_loop(jit_compile) if loop == "auto" else loop
        self.settings = settings
        self.scheduler = make_scheduler(settings.scheduler, settings.num_steps)
        # Image-to-image starts here; 0 = from pure noise.
        self.start_step = settings.num_steps - steps_for_strength(strength, settings.num_steps)
        self.unconditional_context = np.asarray(unconditional_context, dtype=np.float32)
        self.diffusion_model = diffusion_model
        self.guidance = float(settings.guidance_scale)
        self.guided = self.guidance != 1.0
        # (N, 320): every step's timestep embedding, once (SD3: (N, 1), the timestep itself).
        self._t_embs = np.stack([timestep_input(t) for t in self.scheduler.timesteps]).astype(np.float32)
        sched = self.scheduler
        self._coefs: dict = {}  # first step run -> (N, 6) `Scheduler.coefficients`
        self._scales = np.array([sched.input_scale(i) for i in range(sched.num_steps)], np.float32)  # (N,)
        # (N, 2): the kept region's (a, b) after step i, x = a * x0 + b * noise.
        self._kept = np.array([sched.noise_levels(i + 1) for i in range(sched.num_steps)], np.float32)
        # ControlNets: (guess_mode, pooled) per net, and (N, n) which steps each acts in.
        self.controls = tuple(controls)
        self._units = tuple((bool(c.guess_mode), bool(c.net.pooled)) for c in self.controls)
        self._keeps = (np.stack([c.keeps(sched.num_steps) for c in self.controls], axis=1).astype(np.float32)
                       if self.controls else None)
        # The models every compiled function may call, by name; the UNet's context model
        # (if it has one): the context's projections once per batch.
        context_model = context_cache.context_model(diffusion_model)
        named = [("unet", diffusion_model), ("decoder", decoder)]
        if context_model is not None:
            named.append(("unet_ctx", context_model))
        if self.controls:
            named.append(("controlled", controlled_unet(diffusion_model)))
            named += [(f"net{k}", c.net.net) for k, c in enumerate(self.controls)]
            named += [(f"net_ctx{k}", context_cache.context_model(c.net.net)) for k, c in enumerate(self.controls)
                      if context_cache.context_model(c.net.net) is not None]
        self._names = tuple(n for n, _ in named)
        self._models = tuple(m for _, m in named)
        self._programs: dict = {}
        self._jit_compile = jit_compile
        self._decode_fn = compiled(_decode_fn, (decoder,), jit_compile)
        self._kv_fn = None if context_model is None else compiled(_kv_fn, (context_model,), jit_compile)

    # The step loop's compiled functions ------------------------------------------------

    def _step_models(self, control: bool) -> tuple:
        """(names, models) a step-loop eps calls: the UNet, and with control the
        controlled UNet and the nets."""
        keep = ("unet",) + (("controlled",) + tuple(f"net{k}" for k in range(len(self.controls))) if control else ())
        return keep, tuple(self._models[self._names.index(n)] for n in keep)

    def _step_eps(self, control: bool, mode: Optional[str] = None) -> Callable:
        key = ("step_eps", control, mode)
        if key not in self._programs:
            units = self._units if control else ()
            names, models = self._step_models(control)
            fn = _eps_fn(self.guided, units) if mode is None else _aid_eps(mode, self.guided, units)
            self._programs[key] = compiled(_steps_fn(names, fn), models, self._jit_compile)
        return self._programs[key]

    def _kv(self, context, uncond):
        """The context's projections for every step of this batch (None: no context model)."""
        if self._kv_fn is None:
            return None
        return self._kv_fn(context, uncond) if self.guided else self._kv_fn(context)

    def _control_kvs(self, context, uncond):
        """The ControlNets' context projections for this batch."""
        names = [n for n in self._names if n.startswith("net_ctx")]
        if len(names) != len(self.controls):
            return [None] * len(self.controls)
        key = ("nets_kv",)
        if key not in self._programs:
            models = tuple(self._models[self._names.index(n)] for n in names)
            self._programs[key] = compiled(_nets_kv(self._units, self.guided), models, self._jit_compile)
        return self._programs[key](context, uncond)

    def _coef_table(self, start: int) -> np.ndarray:
        """The sampler's steps as (N, 6) float32 rows, the first one run from `start`
        (image-to-image starts later; without init latents every batch starts at 0)."""
        if start not in self._coefs:
            self._coefs[start] = self.scheduler.coefficients(start).astype(np.float32)
        return self._coefs[start]

    def _active(self, control: Optional[ControlBatch]) -> Optional[ControlBatch]:
        """The batch's control, or None where no net acts on any of its frames at any step
        (every scale 0, or every schedule empty): those frames are the plain render's."""
        if not self.controls:
            return None
        check(control is not None and len(control.hints) == len(self.controls),
              f"this renderer has {len(self.controls)} ControlNet(s); each batch needs their hints and scales")
        scales = np.asarray(control.scales, np.float32)  # (n, B)
        if not (scales[:, :, None] * self._keeps.T[:, None, :]).any():
            return None
        return control

    def _inputs(self, contexts, noises, seeds, init_latents, masks, control=None, negatives=None) -> dict:
        """The loop's tensors, on the device once (both loops share them)."""
        ops = keras_ops()
        sched = self.scheduler
        batch = len(contexts)
        check(masks is None or init_latents is not None, "masks need init_latents (the image to keep)")
        if negatives is None:
            negatives = np.repeat(self.unconditional_context[None], batch, axis=0)  # (77, D) -> (B, 77, D)
        check(np.shape(negatives) == np.shape(contexts),
              f"negatives must be one negative context per row, shaped as the contexts {np.shape(contexts)}. "
              f"Received: negatives of shape {np.shape(negatives)}")
        out = {
            "context": ops.convert_to_tensor(np.asarray(contexts, np.float32)),  # (B, 77, D)
            "uncond": ops.convert_to_tensor(np.asarray(negatives, np.float32)),  # (B, 77, D)
            "guidance": ops.convert_to_tensor(np.float32(self.guidance)),
            # (N, 320) -> (N, B, 320)
            "t_embs": ops.convert_to_tensor(np.repeat(self._t_embs[:, None], batch, axis=1)),
            "noise": ops.convert_to_tensor(np.asarray(noises, np.float32)),  # (B, h, w, 4)
            "noises": None,
            "known": None,
            "paint": None,
            "start": 0,
            "control": None,
        }
        if sched.needs_noise:
            # (B, N, h, w, 4) -> (N, B, h, w, 4): each frame's own stream.
            per_frame = [step_noise(s, sched.num_steps, noises.shape[1:]) for s in seeds]
            out["noises"] = ops.convert_to_tensor(np.stack(per_frame, axis=1))
        if init_latents is not None:
            out["known"] = ops.convert_to_tensor(np.asarray(init_latents, np.float32))  # (B, h, w, 4)
            out["start"] = self.start_step
        if out["start"] == 0:
            out["latent"] = out["noise"] * sched.init_noise_sigma
        else:
            out["latent"] = sched.noised(out["start"], out["known"], out["noise"])
        if masks is not None:
            out["paint"] = ops.convert_to_tensor(np.asarray(masks, np.float32))  # (B, h, w, 1)
        if control is not None:
            # (n x (B, H, W, 3), (n, B), (N, n)): hints, scales, each net's steps.
            out["control"] = (tuple(ops.convert_to_tensor(np.asarray(h, np.float32)) for h in control.hints),
                              ops.convert_to_tensor(np.asarray(control.scales, np.float32)),
                              ops.convert_to_tensor(self._keeps))
        return out

    def sample_latents(
        self,
        contexts: np.ndarray,
        noises: np.ndarray,
        seeds: Sequence[int],
        init_latents: Optional[np.ndarray] = None,
        masks: Optional[np.ndarray] = None,
        on_step: Optional[Callable] = None,
        aid: Optional[attention_interp.AidBatch] = None,
        control: Optional[ControlBatch] = None,
        negatives: Optional[np.ndarray] = None,
    ):
        """Runs the denoising loop. contexts (B, 77, D), noises (B, h, w, 4) -> latents.

        init_latents (B, h, w, 4): clean latents to start from (image-to-image, at the
            renderer's strength) or to keep (inpainting).
        masks (B, h, w, 1): 1 where the model paints, 0 where `init_latents` is kept.
            After every step the kept region is reset to init_latents noised to that
            step with the frame's own noise, so it reaches the clean latent exactly at
            the end (the inpainting of Lugmayr et al. 2022 without resampling).
        on_step: called as on_step(i, denoised) after step i with the predicted clean
            latent (B, h, w, 4) (step views).
        aid: `attention_interp.AidBatch`: attention interpolation for the first
            aid.steps(N) steps. The rows after aid.frames are the frames' keyframes
            (helper rows), denoised beside them while they interpolate and dropped
            after; the latents returned are the frames' only.
        control: `ControlBatch` for the renderer's ControlNets (one row per row of the
            batch, helper rows included).
        negatives (B, 77, D): each row's own negative context (per-keyframe negative
            prompts); None: the renderer's `unconditional_context` for every row.
        """
        ops = keras_ops()
        sched = self.scheduler
        self._check_aid(aid, init_latents, masks, len(contexts))
        control = self._active(control)
        inputs = self._inputs(contexts, noises, seeds, init_latents, masks, control, negatives)
        context, uncond, guidance = inputs["context"], inputs["uncond"], inputs["guidance"]
        step_noises, noise, known, paint = inputs["noises"], inputs["noise"], inputs["known"], inputs["paint"]
        latent, start, t_embs = inputs["latent"], inputs["start"], inputs["t_embs"]
        ctrl = inputs["control"]  # (hints, scales, keeps) or None
        kv = self._kv(context, uncond)
        net_kvs = self._control_kvs(context, uncond) if ctrl is not None else None
        eps_fn = self._step_eps(ctrl is not None)
        warm = aid.steps(sched.num_steps) if aid is not None else 0
        aid_fn, aid_rows = (self._step_eps(ctrl is not None, aid.mode), aid.tensors()) if warm > start else (None, None)
        keep = aid.plain_rows() if aid_fn is not None else None
        if keep is not None and keep.any():  # keyframe frames: their prediction in the plain batch shape
            f = aid.frames
            kv_plain, keep = self._kv(context[:f], uncond[:f]), ops.convert_to_tensor(keep)
            ctrl_plain = _frames_control(ctrl, f) if ctrl is not None else None
            net_kvs_plain = self._control_kvs(context[:f], uncond[:f]) if ctrl is not None else None
        else:
            keep = None

        def at(i, rows=None, kvs=None):  # the control inputs of step i (rows: `ctrl` or the frames')
            if ctrl is None:
                return None
            hints, scales, keeps = rows or ctrl
            return hints, scales * ops.reshape(keeps[i], (-1, 1)), kvs if kvs is not None else net_kvs

        denoised = None
        # 2. The loop: one fused UNet call and one scheduler update per step.
        for i in range(start, sched.num_steps):
            if aid is not None and i == max(warm, start):  # the helper rows' work is done
                latent, context, uncond, t_embs, step_noises, denoised = _frames_only(
                    aid.frames, latent, context, uncond, t_embs, step_noises, denoised)
                kv = self._kv(context, uncond)
                if ctrl is not None:
                    ctrl = _frames_control(ctrl, aid.frames)
                    net_kvs = self._control_kvs(context, uncond)
            model_in = latent if sched.input_scale(i) == 1.0 else latent * sched.input_scale(i)
            if i < warm:
                eps = aid_fn(model_in, t_embs[i], context, uncond, guidance, kv, at(i), aid_rows)
                if keep is not None:
                    plain = eps_fn(model_in[:f], t_embs[i][:f], context[:f], uncond[:f], guidance, kv_plain,
                                   at(i, ctrl_plain, net_kvs_plain))
                    eps = _keep_plain(ops, eps, plain, keep)
            else:
                eps = eps_fn(model_in, t_embs[i], context, uncond, guidance, kv, at(i))
            fresh = step_noises[i] if step_noises is not None else None
            latent, denoised = sched.step(i, latent, eps, denoised, fresh)
            if masks is not None:
                latent = paint * latent + (1.0 - paint) * sched.noised(i + 1, known, noise)
            if on_step is not None:
                on_step(i, denoised if aid is None else denoised[:aid.frames])
        return latent if aid is None else latent[:aid.frames]

    def _check_aid(self, aid, init_latents, masks, rows: int) -> None:
        if aid is None:
            return
        check(init_latents is None and masks is None,
              "attention interpolation renders walks from noise; it takes no init_latents or masks")
        check(len(aid) == rows and 1 <= aid.frames <= rows,
              f"aid must describe every row of the batch ({rows}). Received: {len(aid)} rows, {aid.frames} frames")

    def decode(self, latents) -> np.ndarray:
        """(B, h, w, 4) -> (B, H, W, 3) uint8."""
        ops = keras_ops()
        return to_uint8(ops.convert_to_numpy(self._decode_fn(latents)))

    def _program(self, key: tuple, make: Callable, with_decoder: bool = True) -> Callable:
        """A compiled program of this renderer's models (`key` names its kind)."""
        if key not in self._programs:
            pairs = [(n, m) for n, m in zip(self._names, self._models) if with_decoder or n != "decoder"]
            names = tuple(n for n, _ in pairs)
            self._programs[key] = compiled(make(names), tuple(m for _, m in pairs), self._jit_compile)
        return self._programs[key]

    def render(self, contexts, noises, seeds, init_latents=None, masks=None, aid=None, control=None,
               negatives=None) -> np.ndarray:
        """(B, 77, D) contexts and (B, h, w, 4) noises -> (B, H, W, 3) uint8 images
        (init_latents, masks, aid, control and negatives as in `sample_latents`; with
        aid, the images of its frames only), by the renderer's `loop`."""
        if self.loop == "steps":
            return self.decode(self.sample_latents(contexts, noises, seeds, init_latents, masks, aid=aid,
                                                   control=control, negatives=negatives))
        self._check_aid(aid, init_latents, masks, len(contexts))
        keras = import_keras()
        ops = keras.ops
        control = self._active(control)
        inputs = self._inputs(contexts, noises, seeds, init_latents, masks, control, negatives)
        noisy, masked = inputs["noises"] is not None, inputs["paint"] is not None
        guided = self.guided
        units = self._units if control is not None else ()
        start = inputs["start"]
        coefs = ops.convert_to_tensor(self._coef_table(start))
        scales = ops.convert_to_tensor(self._scales)
        latent, context, uncond, t_embs, noises = (
            inputs["latent"], inputs["context"], inputs["uncond"], inputs["t_embs"], inputs["noises"])
        ctrl = inputs["control"]
        prev = None
        if aid is not None:
            warm = max(aid.steps(self.scheduler.num_steps), start)
            if warm > start:  # the warm-up, with the helper rows, as one compiled loop
                keep = aid.plain_rows()
                exact = bool(keep.any())  # keyframe frames in the batch: `_warm_program`'s exact rows
                program = self._program(
                    ("warm", guided, noisy, aid.mode, exact, units),
                    lambda names: _warm_program(guided, noisy, aid.mode, exact, names, units), with_decoder=False)
                latent, prev = program(
                    latent, context, uncond, inputs["guidance"], t_embs, scales, coefs,
                    self._step_tensor(start), self._step_tensor(warm), aid.tensors(), noises,
                    ops.convert_to_tensor(keep.astype(np.float32)) if exact else None, ctrl)
            latent, context, uncond, t_embs, noises, prev = _frames_only(
                aid.frames, latent, context, uncond, t_embs, noises, prev)
            if ctrl is not None:
                ctrl = _frames_control(ctrl, aid.frames)
            start = warm
        kind = (guided, noisy, masked, prev is not None)
        program = self._program(("program", *kind, units), lambda names: _program(*kind, names, units))
        args = [latent, context, uncond, inputs["guidance"], t_embs, scales, coefs, self._step_tensor(start)]
        region = [inputs["known"], inputs["noise"], inputs["paint"], ops.convert_to_tensor(self._kept)] if masked \
            else [None] * 4  # what the program reads of them (only where it keeps a region)
        optional = [noises if noisy else None, *region, prev, ctrl]
        while optional and optional[-1] is None:  # trailing Nones left out: the program's defaults
            optional.pop()
        return to_uint8(ops.convert_to_numpy(program(*args, *optional)))

    def _step_tensor(self, step: int):
        """A step number as the programs take it: an input, not a constant (no retrace
        per value), except on torch (eager)."""
        keras = import_keras()
        if keras.backend.backend() == "torch":
            return int(step)
        return keras.ops.convert_to_tensor(np.int32(step))


def _decode_fn(calls, latent):
    return _decode({"decoder": calls[0]}, latent)


def _kv_fn(calls, context, uncond=None):
    return _context_kv(calls[0], context, uncond)


def _frames_only(frames: int, latent, context, uncond, t_embs, noises, prev):
    """The loop's tensors without AID's helper rows (rows from `frames` on)."""
    return (latent[:frames], context[:frames], uncond[:frames], t_embs[:, :frames],
            None if noises is None else noises[:, :frames], None if prev is None else prev[:frames])


def is_out_of_memory(error: BaseException) -> bool:
    """True for the backends' out-of-memory errors (TF ResourceExhaustedError, XLA's
    RESOURCE_EXHAUSTED, torch.cuda.OutOfMemoryError)."""
    name = type(error).__name__
    text = str(error)
    return (
        name in ("ResourceExhaustedError", "OutOfMemoryError")
        or "RESOURCE_EXHAUSTED" in text
        or "OOM when allocating" in text
        or "out of memory" in text.lower()
    )


def batches(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """Frame indices grouped by the batch an uninterrupted run renders them in: frame i
    in batch i // batch_size, at slot i % batch_size (`slots`). A resumed run, a retried
    frame or another worker renders each frame in the same batch shape at the same slot,
    so it is the same image even where a kernel's rounding depends on the batch (oneDNN,
    bfloat16). The last batch of a run may be short (the caller pads it)."""
    check(batch_size >= 1, f"batch_size must be at least 1. Received: batch_size={batch_size}")
    groups: dict = {}
    for index in indices:
        groups.setdefault(index // batch_size, []).append(index)
    return list(groups.values())


def slots(batch: Sequence[int], batch_size: int) -> list[int]:
    """The frames the model sees for one of `batches`: each frame at slot
    index % batch_size; a slot whose frame is not in the batch repeats the batch's last
    frame (its row is dropped), so every model call has the same shape (one trace)."""
    padded = [batch[-1]] * batch_size
    for index in batch:
        padded[index % batch_size] = index
    return padded


def render_frames(
    renderer: Renderer,
    plan,
    indices: Iterable[int],
    batch_size: int,
    on_batch: Optional[Callable[[list, np.ndarray], None]] = None,
    progress: bool = True,
) -> dict:
    """Renders `plan`'s frames `indices` in the batches of `batches` (padded by `slots`).

    Each batch is handed to `on_batch(indices, images)` as soon as it exists (to write
    it to disk). A plan with attention interpolation (`FramePlan.attention`) renders each
    batch beside the keyframes its frames interpolate from (`FramePlan.aid_batch`). If a
    batch runs out of device memory, the batch size is halved (once said, in a warning)
    and the batch retried; frames already rendered are kept.

    Returns:
        {frame index: (H, W, 3) uint8 image}.
    """
    todo = list(indices)
    out: dict = {}
    # AID (`FramePlan.attention`): helper rows while any step interpolates.
    aid_on = (getattr(plan, "attention", "off") != "off"
              and attention_interp.warmup_steps(renderer.scheduler.num_steps, plan.attention_warmup)
              > renderer.start_step)
    if aid_on:
        check(attention_interp.supports(renderer.diffusion_model),
              "attention interpolation needs a UNet with KerasCV's attention layers (load_model's); this model's "
              f"UNet has none it can reach. Received: attention_interp={plan.attention!r}")
    bar = tqdm(total=len(todo), unit="frame", desc="rendering", disable=not progress)
    try:
        while todo:
            chunk = batches(todo, batch_size)[0]
            padded = slots(chunk, batch_size)
            extra = {}
            frames = plan.batch(padded)
            if aid_on:
                # AID: the keyframes the batch's window interpolates from, denoised beside it.
                helpers, (t, a, b, on) = plan.aid_batch(padded, batch_size)
                frames = frames + helpers
                extra["aid"] = attention_interp.AidBatch(plan.attention, plan.attention_warmup, len(padded), t, a, b, on)
            contexts = np.stack([f.context for f in frames])  # (B, 77, D)
            noises = np.stack([f.noise for f in frames])  # (B, h, w, 4)
            seeds = [f.seed for f in frames]
            if frames[0].negative is not None:  # per-keyframe negative prompts: each row its own
                extra["negatives"] = np.stack([f.negative for f in frames])  # (B, 77, D)
            if frames[0].init_latent is not None:
                extra["init_latents"] = np.stack([f.init_latent for f in frames])  # (B, h, w, 4)
            if frames[0].mask is not None:
                extra["masks"] = np.stack([f.mask for f in frames])  # (B, h, w, 1)
            if frames[0].control:  # each net's hints (B, H, W, 3) and scales (n, B)
                extra["control"] = ControlBatch(
                    tuple(np.stack([f.control[k][0] for f in frames]) for k in range(len(frames[0].control))),
                    np.array([[f.control[k][1] for f in frames] for k in range(len(frames[0].control))], np.float32))
            try:
                rendered = renderer.render(contexts, noises, seeds, **extra)  # (B, H, W, 3)
            except Exception as error:  # noqa: BLE001 - re-raised unless OOM
                if not is_out_of_memory(error) or batch_size == 1:
                    raise
                batch_size //= 2
                warnings.warn(
                    f"out of device memory; batch_size lowered to {batch_size} and the "
                    "batch retried (frames already rendered are kept)",
                    stacklevel=2,
                )
                continue
            images = rendered[[index % batch_size for index in chunk]]  # (len(chunk), H, W, 3)
            for index, image in zip(chunk, images):
                out[index] = image
            if on_batch is not None:
                on_batch(chunk, images)
            done = set(chunk)
            todo = [index for index in todo if index not in done]
            bar.update(len(chunk))
    finally:
        bar.close()
    return out
