"""Context windows and the window-at-a-step sampling loop (sdanim.core.windows,
sdanim.render.motion) on a NumPy stand-in for the motion UNet that couples the frames of
each call, as temporal attention does: coverage, blending, FreeNoise's noise, memory
bounded by the window, and a run stopped after any unit resuming to the same latents bit
for bit."""

from __future__ import annotations

import numpy as np
import pytest

from sdanim.config.errors import SdanimError
from sdanim.core.schedulers import make_scheduler, timestep_embedding
from sdanim.core.windows import context_windows, coverage, free_noise, window_weights
from sdanim.render.motion import Clip, sample_clip

SHAPE = (4, 4, 4)


def test_windows_cover_every_frame_and_end_on_the_last():
    windows = context_windows(24, 16, 4)
    assert [(int(w[0]), int(w[-1])) for w in windows] == [(0, 15), (4, 19), (8, 23)]
    odd = context_windows(26, 16, 4)  # the stride does not land on the end: one more window, ending there
    assert [(int(w[0]), int(w[-1])) for w in odd] == [(0, 15), (4, 19), (8, 23), (10, 25)]
    closed = context_windows(24, 16, 4, closed=True)
    assert len(closed) == 6 and list(closed[-1][:4]) == [20, 21, 22, 23] and list(closed[-1][4:]) == list(range(12))
    assert [len(w) for w in context_windows(10, 16, 4)] == [10]  # shorter than a window: one of all its frames
    for frames, closed_ in ((24, False), (26, False), (24, True), (1000, False)):
        ws = context_windows(frames, 16, 4, closed_)
        assert np.all(coverage(frames, ws) > 0) and all(len(w) == 16 for w in ws)
    with pytest.raises(SdanimError, match=r"^context_stride must be a whole number of frames in \[1, context=16\]\. "
                                          r"Received: context_stride=17$"):
        context_windows(24, 16, 17)


def test_weights_peak_mid_window():
    assert list(window_weights(5)) == [1, 2, 3, 2, 1] and list(window_weights(4)) == [1, 2, 2, 1]
    assert list(window_weights(3, "flat")) == [1, 1, 1]
    with pytest.raises(SdanimError, match=r"context_weighting must be one of pyramid, flat\. Received: "):
        window_weights(4, "sawtooth")


def test_free_noise_is_seeded_and_later_frames_reuse_a_window_earlier():
    a, b = free_noise(7, 40, 16, 4, SHAPE), free_noise(7, 40, 16, 4, SHAPE)
    assert np.array_equal(a, b) and not np.array_equal(a, free_noise(8, 40, 16, 4, SHAPE))
    first = {a[i].tobytes() for i in range(16)}
    assert len(first) == 16  # the first window's frames are all drawn
    for start in range(16, 40, 4):  # each later run of 4 frames: a shuffle of the 4 frames one window earlier
        earlier = {a[i].tobytes() for i in range(start - 16, start - 12)}
        assert {a[i].tobytes() for i in range(start, start + 4)} == earlier
    assert np.array_equal(free_noise(7, 12, 16, 4, SHAPE), a[:12])  # a short clip: the same first frames


def _clip(frames=20, context=8, stride=3, guidance=5.0, closed=False, seed=3) -> Clip:
    rng = np.random.default_rng(seed)
    return Clip(contexts=rng.standard_normal((frames, 2, 3)).astype(np.float32),
                negatives=rng.standard_normal((frames, 2, 3)).astype(np.float32),
                noise=free_noise(seed, frames, context, stride, SHAPE),
                windows=context_windows(frames, context, stride, closed), weighting="pyramid",
                guidance=guidance, seed=seed, key=f"test-{frames}-{context}-{stride}-{closed}-{seed}")


class Coupled:
    """A stand-in for the motion UNet: each frame's prediction depends on every frame of
    its call (the call's mean) and its own context; records the rows it is given."""

    def __init__(self):
        self.rows = []

    def __call__(self, latents, t_emb, contexts, window=None, step=None):
        self.rows.append(len(latents))
        half = len(latents) // 2 if len(latents) > 1 and len(contexts) == len(latents) else len(latents)
        out = []
        for part in (slice(0, half), slice(half, len(latents))) if half < len(latents) else (slice(None),):
            x = latents[part]
            out.append(0.5 * x + 0.3 * x.mean(axis=0, keepdims=True) + contexts[part].mean() + 1e-3 * t_emb[0, 0])
        return np.concatenate(out)


@pytest.mark.parametrize("sampler", ["ddim", "lcm"])
def test_a_run_stopped_after_any_unit_resumes_to_the_same_latents(tmp_path, sampler):
    clip = _clip()
    scheduler = make_scheduler(sampler, 4)
    whole = sample_clip(Coupled(), clip, scheduler)
    units = 4 * len(clip.windows)
    for stop_after in (1, len(clip.windows), units - 2):
        state = str(tmp_path / f"state-{sampler}-{stop_after}.npz")
        done = []

        def stop(step, window):
            done.append((step, window))
            if len(done) == stop_after:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            sample_clip(Coupled(), clip, scheduler, state_path=state, save_every=0.0, on_unit=stop)
        resumed_model = Coupled()
        resumed = sample_clip(resumed_model, clip, scheduler, state_path=state, save_every=0.0)
        assert np.array_equal(resumed, whole), stop_after
        assert len(resumed_model.rows) == units - stop_after  # only the units not done are run
    assert np.abs(whole - clip.noise).max() > 0.1


def test_memory_is_bounded_by_the_window_and_windows_blend(tmp_path):
    clip = _clip(frames=60, context=8, stride=4)
    model = Coupled()
    out = sample_clip(model, clip, make_scheduler("ddim", 2))
    assert max(model.rows) == 2 * 8  # one window's rows, guided: whatever the clip's length
    assert out.shape == (60, *SHAPE) and np.all(np.isfinite(out))
    one = _clip(frames=8, context=8, stride=4)  # a single window: the plain guided loop
    scheduler = make_scheduler("ddim", 3)
    x, previous, model = one.noise.copy(), None, Coupled()
    for i in range(3):
        t_emb = np.repeat(timestep_embedding(float(scheduler.timesteps[i]))[None].astype(np.float32), 16, axis=0)
        eps = model(np.concatenate([x, x]), t_emb, np.concatenate([one.negatives, one.contexts]))
        x, previous = scheduler.step(i, x, eps[:8] + one.guidance * (eps[8:] - eps[:8]), previous)
    assert np.allclose(sample_clip(Coupled(), one, scheduler), x, rtol=0, atol=1e-5)


def test_another_clips_state_is_refused(tmp_path):
    state = str(tmp_path / "state.npz")
    clip = _clip()
    sample_clip(Coupled(), clip, make_scheduler("ddim", 2), state_path=state)
    other = _clip(seed=4)
    with pytest.raises(SdanimError, match=r"the saved motion state is another clip's .* Received: .*state.npz$"):
        sample_clip(Coupled(), other, make_scheduler("ddim", 2), state_path=state)
