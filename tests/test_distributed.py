"""Rendering on Ray workers (sdanim.render.ray): one shared local Ray instance, tiny
models built inside the workers by functions of this module.

The workers import this module (and tests/tiny.py) by name: the Ray instance is
started with tests/ on their PYTHONPATH. Functions that misbehave on purpose (a
worker killed mid-write, a frame that always fails, slow early frames) run inside the
worker process, where they patch sdanim for that process only.
"""

import functools
import os
import time

import numpy as np
import pytest

import sdanim
from sdanim.frontends.cli import main
from sdanim.config.errors import SdanimError

from conftest import gif_frames, require

# Ray workers end to end: in the README's command, outside the quick tier (slow).
pytestmark = pytest.mark.slow
HERE = os.path.dirname(os.path.abspath(__file__))
S = sdanim.RenderSettings(height=64, width=64, num_steps=2, batch_size=2)
PROMPTS = ["a red cube", "a blue sphere", "a green cone"]
FRAMES = 9


@pytest.fixture(scope="module")
def ray_local():
    ray = require("ray")
    started = not ray.is_initialized()
    if started:
        path = os.pathsep.join([HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 _node_ip_address="127.0.0.1",  # network traffic stays on loopback
                 runtime_env={"env_vars": {"PYTHONPATH": path, "TF_CPP_MIN_LOG_LEVEL": "2"}})
    yield ray
    if started:
        ray.shutdown()


# Model functions run inside the workers ------------------------------------------------


def tiny_model():
    from tiny import make_tiny_model

    return make_tiny_model()


def tiny_attention_model():
    from tiny import make_tiny_model

    return make_tiny_model(attention=True)


def tiny_sd3_model():
    from tiny import make_tiny_sd3_model

    return make_tiny_sd3_model()


def tiny_sd_model():
    from tiny import make_tiny_sd_model

    return make_tiny_sd_model(context_dim=768)


def killed_mid_write(marker: str):
    """The first worker to write frame 3 dies (os._exit) half-way through writing it,
    leaving its temporary file; the restarted worker (marker present) behaves."""
    from sdanim.render import store as frames

    real = frames.atomic_write

    def write(path, fn):
        if path.endswith("frame_00003.png") and not os.path.exists(marker):
            def half(tmp):
                fn(tmp)
                open(marker, "w").close()
                os._exit(1)  # the frame only ever existed under its temporary name

            return real(path, half)
        return real(path, fn)

    frames.atomic_write = write
    return tiny_model()


def poisoned(index: int):
    """Frame `index` fails in every worker, on every attempt."""
    from sdanim.core.plan import FramePlan

    real = FramePlan.batch

    def batch(self, indices):
        if index in indices:
            raise ValueError(f"frame {index} is poisoned")
        return real(self, indices)

    FramePlan.batch = batch
    return tiny_model()


def tiny_sd_motion_units(folder: str):
    """A tiny SD 1.x model whose worker notes each unit of a motion render it computes
    (a file "pid_step_window" in `folder`)."""
    from sdanim.render.motion import MotionRun

    real = MotionRun.window_eps

    def window_eps(self, i, t, w, latents):
        open(os.path.join(folder, f"{os.getpid()}_{i}_{w}"), "w").close()
        return real(self, i, t, w, latents)

    MotionRun.window_eps = window_eps
    return tiny_sd_model()


def slow_early_frames():
    """Lower frame indices take longer, so batches finish out of order (batch [0, 1]
    last of the first four)."""
    from sdanim.core.plan import FramePlan

    real = FramePlan.batch

    def batch(self, indices):
        time.sleep(0.4 * max(0, 4 - min(indices)))
        return real(self, indices)

    FramePlan.batch = batch
    return tiny_model()


# Tests -------------------------------------------------------------------------------------


def _morph(tmp_path, name, workers=None, model=tiny_model, **kw):
    return sdanim.morph(PROMPTS, out=str(tmp_path / f"{name}.gif"), frames=FRAMES, seed=3, settings=S,
                        model=model, workers=workers, progress=False, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The frames rendered in this process, no Ray."""
    from tiny import make_tiny_model

    tmp = tmp_path_factory.mktemp("reference")
    return _morph(tmp, "ref", model=make_tiny_model())


def test_resume_on_workers_renders_only_missing_and_truncated_frames(ray_local, reference, tmp_path):
    from tiny import make_tiny_model

    first = _morph(tmp_path, "r", model=make_tiny_model())  # begun in this process (one worker: the CLI test)
    folder = first.frames_dir
    os.remove(os.path.join(folder, "frame_00002.png"))
    os.remove(os.path.join(folder, "frame_00007.png"))
    with open(os.path.join(folder, "frame_00005.png"), "r+b") as f:  # a copy cut short
        f.truncate(200)
    second = _morph(tmp_path, "r", workers=sdanim.Workers(count=2, cpus_per_worker=0.5))
    assert second.rendered == 3  # 2, 5 and 7
    np.testing.assert_array_equal(second.frames, reference.frames)


def test_worker_killed_mid_write_loses_no_frame(ray_local, reference, tmp_path):
    marker = str(tmp_path / "killed")
    result = _morph(tmp_path, "k", workers=sdanim.Workers(count=2, cpus_per_worker=1),
                    model=functools.partial(killed_mid_write, marker))
    assert os.path.exists(marker)  # a worker did die mid-write
    # Two workers give the frames of one process, and leave no probe or temporary file.
    np.testing.assert_array_equal(result.frames, reference.frames)
    assert len(gif_frames(result.out)) == FRAMES  # every frame once, none duplicated
    names = sorted(os.listdir(result.frames_dir))
    assert names == [f"frame_{i:05d}.png" for i in range(FRAMES)] + ["manifest.json"]


def test_poisoned_frame_is_reported_and_the_rest_are_rendered(ray_local, reference, tmp_path):
    with pytest.raises(sdanim.FailedFrames, match=r"1 frame\(s\) failed on every attempt \(2\): frames 4 "
                       r"\(first error: ValueError: frame 4 is poisoned\).*Received: max_attempts=2") as info:
        _morph(tmp_path, "p", workers=sdanim.Workers(count=2, cpus_per_worker=1, max_attempts=2),
               model=functools.partial(poisoned, 4))
    assert info.value.indices == [4]
    folder = tmp_path / "p_frames"
    on_disk = sorted(os.listdir(folder))
    assert on_disk == [f"frame_{i:05d}.png" for i in range(FRAMES) if i != 4] + ["manifest.json"]
    assert not (tmp_path / "p.gif").exists()  # no export with a hole in it
    from tiny import make_tiny_model

    again = _morph(tmp_path, "p", model=make_tiny_model())  # a healthy re-run (here) renders only frame 4
    assert again.rendered == 1
    np.testing.assert_array_equal(again.frames, reference.frames)


def test_export_is_in_frame_order_whatever_the_completion_order(ray_local, reference, tmp_path):
    workers = sdanim.Workers(count=2, cpus_per_worker=1, shared_storage=False)  # images come back to the driver
    result = _morph(tmp_path, "o", workers=workers, model=slow_early_frames)
    np.testing.assert_array_equal(result.frames, reference.frames)
    # The GIF is palette-quantized: compare it with the one-process run's GIF.
    np.testing.assert_array_equal(np.stack(gif_frames(result.out)), np.stack(gif_frames(reference.out)))


def test_a_loaded_model_cannot_go_to_workers(tiny, tmp_path):
    with pytest.raises(SdanimError, match=r"workers load their own model: pass a ModelSpec.*Received: model=TinyModel"):
        _morph(tmp_path, "x", workers=2, model=tiny)


@pytest.mark.parametrize("kw, match", [
    ({"count": 0}, r"workers must be at least 1\. Received: workers=0"),
    ({"max_attempts": 0}, r"max_attempts must be at least 1\. Received: max_attempts=0"),
    ({"gpus_per_worker": -1}, r"gpus_per_worker must be a number >= 0\. Received: gpus_per_worker=-1"),
    ({"cpus_per_worker": 0}, r"cpus_per_worker must be > 0\. Received: cpus_per_worker=0"),
    ({"in_flight": 0}, r"in_flight must be at least 1\. Received: in_flight=0"),
])
def test_workers_bad_input(kw, match):
    with pytest.raises(SdanimError, match=match):
        sdanim.Workers(**kw)


def test_cluster_too_small_is_refused_before_any_worker_starts(ray_local, tmp_path):
    with pytest.raises(SdanimError, match=r"the Ray cluster cannot hold 3 workers: they need CPU 3 \(the cluster has 2\)"
                       r".*Received: workers=3"):
        _morph(tmp_path, "big", workers=3)
    assert not (tmp_path / "big_frames").exists()


@pytest.mark.parametrize("argv, match", [
    (["--workers", "0"], "workers must be at least 1. Received: workers=0"),
    (["--ray-address", "auto"], "--ray-address needs --workers N. Received: --workers not given"),
    (["--workers", "2", "--max-attempts", "0"], "max_attempts must be at least 1. Received: max_attempts=0"),
])
def test_cli_workers_bad_input(tmp_path, capsys, argv, match):
    out = str(tmp_path / "m.gif")
    assert main(["morph", "a", "b", "--out", out, "--weights", "random", *argv]) == 2
    err = capsys.readouterr().err
    assert err == f"sdanim: error: {match}\n"
    assert not os.path.exists(tmp_path / "m_frames")


def test_cli_exits_1_naming_failed_frames(tmp_path, capsys, monkeypatch):
    from sdanim.tasks import walks as api
    from sdanim.render.ray import FailedFrames

    def morph(*a, **k):
        raise FailedFrames({7: "ValueError: bad", 3: "ValueError: bad"}, 3, str(tmp_path / "m_frames"))

    monkeypatch.setattr(api, "morph", morph)
    assert main(["morph", "a", "b", "--out", str(tmp_path / "m.gif"), "--weights", "random", "--workers", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sdanim: error: 2 frame(s) failed on every attempt (3): frames 3, 7 (first error: ValueError: bad)")
    assert err.count("\n") == 1


def test_image_morph_on_workers_gives_the_frames_of_one_process(ray_local, tmp_path):
    from tiny import make_tiny_model

    rng = np.random.default_rng(1)
    a, b = (rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(2))
    kw = dict(frames=5, strength=0.6, settings=S, progress=False)
    here = sdanim.image_morph(a, b, "a cat", out=str(tmp_path / "here.gif"), model=make_tiny_model(), **kw)
    there = sdanim.image_morph(a, b, "a cat", out=str(tmp_path / "there.gif"), model=tiny_model,
                               workers=sdanim.Workers(count=2, cpus_per_worker=1), **kw)
    np.testing.assert_array_equal(there.frames, here.frames)
    assert sorted(os.listdir(there.frames_dir)) == [f"frame_{i:05d}.png" for i in range(5)]


def test_attention_interpolation_on_workers_gives_the_frames_of_one_process(ray_local, tmp_path):
    """AID's helper rows travel with the job: each worker renders its batches beside the
    same keyframes, so the frames are the ones this process renders."""
    here = _morph(tmp_path, "aid_here", model=tiny_attention_model(), attention_interp="fused")
    there = _morph(tmp_path, "aid_there", model=tiny_attention_model, attention_interp="fused",
                   workers=sdanim.Workers(count=2, cpus_per_worker=1))
    # Each worker runs 1 intra-op thread here, this process 2: with oneDNN off, TensorFlow's
    # Eigen kernels split the attention's reductions by thread count, which moves a few
    # pixels by float rounding (3 of 110592 by 1 level, measured); with oneDNN on they match.
    gap = np.abs(there.frames.astype(int) - here.frames.astype(int))
    assert gap.max() <= 1 and (gap > 0).mean() < 1e-3, (gap.max(), (gap > 0).mean())


@pytest.mark.once  # the sharing, not the kernels' rounding: once per CI
def test_a_motion_walk_on_workers_shares_out_each_steps_windows(ray_local, tmp_path):
    """Motion modules on workers: every window of every step computed once, each step's
    on both workers, and the frames those of one process."""
    from tiny import make_tiny_sd_model

    units = tmp_path / "units"
    units.mkdir()
    kw = dict(frames=6, seed=5, settings=S, progress=False, motion=sdanim.MotionSpec("random", context=4, stride=2))
    here = sdanim.morph(PROMPTS, out=str(tmp_path / "here.gif"), model=make_tiny_sd_model(context_dim=768), **kw)
    there = sdanim.morph(PROMPTS, out=str(tmp_path / "there.gif"), model=functools.partial(tiny_sd_motion_units, str(units)),
                         workers=sdanim.Workers(count=2, cpus_per_worker=1), **kw)
    done = [name.split("_") for name in os.listdir(units)]
    assert sorted((int(i), int(w)) for _, i, w in done) == [(i, w) for i in range(2) for w in range(2)]
    assert all(len({pid for pid, i, _ in done if i == step}) == 2 for step in ("0", "1"))
    assert there.rendered == 6 and sorted(os.listdir(there.frames_dir))[:6] == [f"frame_{i:05d}.png" for i in range(6)]
    # One thread per worker: float rounding may move a pixel by a level (as for AID).
    gap = np.abs(there.frames.astype(int) - here.frames.astype(int))
    assert gap.max() <= 1 and (gap > 0).mean() < 1e-3, (gap.max(), (gap > 0).mean())
    assert np.abs(here.frames.astype(int) - here.frames[:1].astype(int)).max() > 10  # frames that move


class _Actor:
    """A stand-in for a Ray actor handle: `window_eps.remote` returns (actor, unit) as the
    "object ref" (`_FakeRay.get` resolves it)."""

    def __init__(self, name):
        self.name = name
        self.window_eps = type("Method", (), {"remote": lambda _, *a: (name, a[4])})()
        self.describe = type("Method", (), {"remote": lambda _: (name, "describe")})()


def test_a_failed_motion_unit_is_tried_on_the_next_live_worker(monkeypatch):
    """The driver's units (`ray._Units`), with Ray's get and wait stood in: a worker that
    dies is given no more units until a call says Ray restarted it, its unit goes to the
    next live worker, the results come back in window order; a unit that fails on every
    attempt is one line naming it and where the state is."""
    ray = require("ray")
    from sdanim.render import ray as sdanim_ray

    calls, dead = [], {"b"}

    def get(ref):
        calls.append(ref)
        name, unit = ref
        if name in dead or unit == "poison":  # a dead worker's calls fail, its revival call too
            raise ray.exceptions.RayActorError() if name in dead else ray.exceptions.RayError("bad unit")
        if unit == "describe":
            return {}
        return f"{unit} by {name}"

    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns=1, timeout=None: ([], refs))  # never restarted
    frames = type("Frames", (), {})()
    frames.actors, frames._alive = [_Actor("a"), _Actor("b")], [True, True]
    frames.workers = sdanim.Workers(count=2, max_attempts=2)
    units = sdanim_ray._Units(frames, "/frames")
    window = lambda w: functools.partial(sdanim_ray._window_call, "job", "spec", 0, 1.0, w, None)  # noqa: E731
    out = list(units.run([window(w) for w in range(4)], [f"window {w}" for w in range(4)]))
    assert out == ["0 by a", "1 by a", "2 by a", "3 by a"]  # 1 and 3 were b's: b died, a took them
    assert frames._alive == [True, False] and list(units.revivals.values()) == [1]
    with pytest.raises(SdanimError, match=r"^window 9 of step 0 failed on every attempt \(2\) \(RayError: bad unit\); "
                                          r"the clip's sampling state is saved in /frames: run the same command again"):
        list(units.run([functools.partial(sdanim_ray._window_call, "job", "spec", 0, 1.0, "poison", None)],
                       ["window 9 of step 0"]))
    # b's restart fails (out of restarts) and a dies too: no worker is left.
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns=1, timeout=None: (refs, []))
    dead.add("a")
    with pytest.raises(SdanimError, match=r"^no Ray worker is left; the clip's sampling state is saved in /frames: "
                                          r"run the same command again to resume. Received: workers=2$"):
        list(units.run([window(0)], ["window 0"]))


def test_workers_without_ray_installed_say_how_to_get_it(monkeypatch, tmp_path):
    import importlib.util

    from sdanim.render.ray import check_workers_args

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(SdanimError, match=r'rendering on workers needs Ray: pip install "sdanim\[ray\]"\. Received: workers=2'):
        check_workers_args(None, 2)


def _dead_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def test_an_unreachable_ray_address_fails_in_time_with_one_line():
    from sdanim.render.ray import check_reachable

    port = _dead_port()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        start = time.monotonic()
        with pytest.raises(SdanimError, match=rf"the Ray cluster at 127\.0\.0\.1:{port} did not answer .*Leave out "
                                              rf"--ray-address to start one on this machine\. Received: ray_address='{address}'"):
            check_reachable(address, timeout=5)
        assert time.monotonic() - start < 6


def test_workers_compute_with_the_drivers_onednn_kernels(monkeypatch):
    """Ray workers are told this process's oneDNN state (TensorFlow is imported here) and
    whether it keeps weights in oneDNN's kernels, so a frame a worker renders is the frame
    this process would render (resume, retries)."""
    from sdanim.core.runtime import import_tensorflow
    from sdanim.model import device
    from sdanim.model.device import onednn_enabled
    from sdanim.render import ray as sdanim_ray

    import_tensorflow()  # this process's kernels are decided
    monkeypatch.delenv("TF_ONEDNN_ASSUME_FROZEN_WEIGHTS", raising=False)
    calls = []
    fake = type("FakeRay", (), {"init": staticmethod(lambda **kw: calls.append(kw))})
    monkeypatch.setattr(sdanim_ray, "_import_ray", lambda address: fake)
    sdanim_ray._start_ray(None)
    env_vars = calls[0]["runtime_env"]["env_vars"]
    assert env_vars["TF_ENABLE_ONEDNN_OPTS"] == ("1" if onednn_enabled() else "0")
    assert env_vars["TF_ONEDNN_ASSUME_FROZEN_WEIGHTS"] == "0"  # this process keeps none: nor do they
    monkeypatch.setenv("TF_ONEDNN_ASSUME_FROZEN_WEIGHTS", "1")  # a command-line driver
    monkeypatch.setattr(device, "onednn_enabled", lambda: True)  # what `weights_kept` reads
    sdanim_ray._start_ray(None)
    assert calls[1]["runtime_env"]["env_vars"]["TF_ONEDNN_ASSUME_FROZEN_WEIGHTS"] == "1"
    assert calls[0]["_node_ip_address"] == "127.0.0.1" and calls[0]["address"] == "local"


def test_an_sd3_morph_on_workers_is_the_one_process_morph(ray_local, tmp_path):
    """An SD3 model (KerasHub's pieces, 16-channel latents, flow matching) rides the same
    frame sources: each worker builds its own model and renders its share of the frames."""
    from tiny import make_tiny_sd3_model

    settings = sdanim.RenderSettings(height=64, width=64, num_steps=2, batch_size=2, scheduler="flow_euler")
    local = sdanim.morph(PROMPTS[:2], out=str(tmp_path / "local.gif"), frames=4, seed=3, settings=settings,
                         model=make_tiny_sd3_model(), progress=False)
    remote = sdanim.morph(PROMPTS[:2], out=str(tmp_path / "remote.gif"), frames=4, seed=3, settings=settings,
                          model=tiny_sd3_model, workers=sdanim.Workers(count=2, cpus_per_worker=1), progress=False)
    assert remote.rendered == 4 and local.frames.std() > 5
    # one intra-op thread per worker against this process's: the AID-on-workers allowance
    assert np.abs(remote.frames.astype(int) - local.frames.astype(int)).max() <= 1
