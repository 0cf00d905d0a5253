"""One run's frames on many devices: Ray Core actors, one model each.

A frame is a pure function of (plan, frame index) and every frame file is written
write-then-rename, so the frames of a run shard freely: the driver sends each worker
batches of frame indices of one `FrameJob`; a batch rendered twice (a retry after a
crash) writes the same bytes again.

    driver: FrameJob + frame indices -> batches (at most `in_flight` per worker)
    worker (actor): ModelSpec -> model (built once) -> FramePlan -> frames
                    -> frame files (shared storage) or arrays back to the driver
    driver: ray.wait -> write frames / retry failed batches frame by frame -> manifest

Why Ray Core actors and not Ray Data or `ray.util.ActorPool`: Data's actor pools can
hang when the actors take every CPU (ray-project/ray#44687) and bring pyarrow;
ActorPool is a DeveloperAPI. The scheduling here is a dozen lines around `ray.wait`.

With motion modules (frames denoised together) the unit is a window at a step: the
driver holds the clip's latents and state, sends the step's windows to the workers at
once, and adds what comes back in window order (`RayFrames.render_motion`); the frames
are then decoded on the workers. A step's windows run in parallel, its steps one after
another; windows blended inside the motion modules' attention are one unit, on one worker.

Frames land on shared storage when the workers can see the frames folder (the driver
writes a probe file there and each worker looks for it: one machine, NFS); otherwise
the workers send the images back and the driver writes them. Only the driver writes
the manifest.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import importlib.util
import math
import os
import socket
import sys
import time
import uuid
from typing import Optional

from tqdm.auto import tqdm

from sdanim.config.errors import SdanimError, check
from sdanim.config.settings import RenderSettings
from sdanim.core.runtime import quiet_tensorflow_env
from sdanim.model.device import KEEP_WEIGHTS, choose_onednn, limit_threads, onednn_enabled, weights_kept
from sdanim.model.sd3 import SD3_CONFIGS
from sdanim.model.spec import ModelSpec
from sdanim.render.jobs import Job, frame_metadata
from sdanim.render.local import LocalFrames
from sdanim.render.motion import Clip, MotionRun, render_clip
from sdanim.render.sampling import batches
from sdanim.render.store import FrameStore

# Host memory one worker declares to Ray for a real SD 1.x/2.x model (weights in
# float32 plus activations and the framework), so Ray never packs two into a node
# that cannot hold them. Measured: 5.5-6 GB RSS per process at 128-512 px on CPU.
MODEL_MEMORY_GB = 6.0


def model_memory_gb(model) -> float:
    """What one worker declares for `model`: a spec's real model (SD3's from its size,
    `SD3Config.memory_gb`), nothing for a function's (tests' tiny models)."""
    if model is not None and not isinstance(model, ModelSpec):
        return 0.0
    config = SD3_CONFIGS.get(getattr(model, "version", None))
    return MODEL_MEMORY_GB if config is None else config.memory_gb


@dataclasses.dataclass(frozen=True)
class Workers:
    """How to render on Ray.

    Args:
        count: int. Number of workers (Ray actors), each holding one model.
            Defaults to 2.
        address: str or None. An existing cluster ("auto", "ray://host:10001");
            None starts Ray on this machine (or uses the one this process started).
        gpus_per_worker: float or None. GPUs each worker holds; None: 1 where the
            cluster has GPUs, else 0 (CPU workers).
        cpus_per_worker: float or None. CPUs each worker declares and the threads it
            computes with; None: the cluster's CPUs shared evenly (CPU workers) or 1.
        memory_per_worker_gb: float or None. Host memory each worker declares; None:
            6 GB for a Stable Diffusion model, nothing for a custom model function.
        max_attempts: int. Tries per frame; a frame that fails every one is reported
            by index and the rest of the run finishes. Defaults to 3.
        in_flight: int. Batches queued per worker, so a worker never waits for the
            driver. Defaults to 2.
        shared_storage: bool or None. Whether workers write the frame files
            themselves; None: where they can see the frames folder (a probe file),
            False: they always send the images back to the driver. Defaults to None.
    """

    count: int = 2
    address: Optional[str] = None
    gpus_per_worker: Optional[float] = None
    cpus_per_worker: Optional[float] = None
    memory_per_worker_gb: Optional[float] = None
    max_attempts: int = 3
    in_flight: int = 2
    shared_storage: Optional[bool] = None

    def __post_init__(self):
        check(
            isinstance(self.count, int) and not isinstance(self.count, bool) and self.count >= 1,
            f"workers must be at least 1. Received: workers={self.count!r}",
        )
        for name in ("gpus_per_worker", "cpus_per_worker", "memory_per_worker_gb"):
            value = getattr(self, name)
            check(
                value is None or (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0),
                f"{name} must be a number >= 0. Received: {name}={value!r}",
            )
        check(
            self.cpus_per_worker is None or self.cpus_per_worker > 0,
            f"cpus_per_worker must be > 0. Received: cpus_per_worker={self.cpus_per_worker!r}",
        )
        check(
            isinstance(self.max_attempts, int) and self.max_attempts >= 1,
            f"max_attempts must be at least 1. Received: max_attempts={self.max_attempts!r}",
        )
        check(
            isinstance(self.in_flight, int) and self.in_flight >= 1,
            f"in_flight must be at least 1. Received: in_flight={self.in_flight!r}",
        )


class FailedFrames(SdanimError):
    """Some frames failed on every attempt; the others are rendered and saved."""

    def __init__(self, failed: dict, attempts: int, folder: Optional[str]):
        self.indices = sorted(failed)
        first = failed[self.indices[0]]
        where = f"the other frames are saved in {folder}; " if folder else ""
        super().__init__(
            f"{len(self.indices)} frame(s) failed on every attempt ({attempts}): frames "
            f"{', '.join(map(str, self.indices[:20]))}{' ...' if len(self.indices) > 20 else ''} "
            f"(first error: {first}); {where}run the same command again to render only those. "
            f"Received: max_attempts={attempts}"
        )


def check_workers_args(model, workers) -> None:
    """Checks a run's Ray options before anything starts."""
    if not isinstance(workers, Workers):
        Workers(count=workers)  # checks the count
    check(
        model is None or isinstance(model, ModelSpec) or (callable(model) and not hasattr(model, "diffusion_model")),
        "workers load their own model: pass a ModelSpec (or a function that builds a model), not a loaded "
        f"model. Received: model={type(model).__name__}",
    )
    check(
        importlib.util.find_spec("ray") is not None,
        'rendering on workers needs Ray: pip install "sdanim[ray]". '
        f"Received: workers={getattr(workers, 'count', workers)}",
    )


def _one_line(error: BaseException) -> str:
    cause = getattr(error, "cause", None)
    error = cause if isinstance(cause, BaseException) else error
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:300]


# How long an address given with --ray-address may take to answer before sdanim gives up.
CONNECT_TIMEOUT_S = 15.0


def _bootstrap_address(address: str) -> tuple:
    """(host, port) that `address` ("auto", "host:port", "ray://host:port") names, the way
    Ray finds it ("auto": RAY_ADDRESS, else the cluster Ray recorded on disk), without
    Ray's rewriting of a loopback host to the machine's other addresses."""
    from ray._private import services

    if address.startswith("ray://"):
        host, _, port = address[len("ray://"):].rpartition(":")
        return host, int(port or 10001)
    if address == "auto":
        try:
            address = services.get_ray_address_from_environment("auto", None)
        except ConnectionError as error:
            raise SdanimError(f"no Ray cluster found ({error}). Received: ray_address='auto'") from None
    host, _, port = str(address).rpartition(":")
    check(host and port.isdigit(), f"ray_address must be auto, HOST:PORT or ray://HOST:PORT. Received: ray_address={address!r}")
    return host, int(port)


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raises a one-line error unless the Ray cluster at `address` accepts a connection
    within `timeout` seconds (Ray itself retries a dead address for many minutes)."""
    host, port = _bootstrap_address(address)
    start = time.monotonic()
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        waited = time.monotonic() - start
        raise SdanimError(
            f"the Ray cluster at {host}:{port} did not answer ({error.strerror or error}, after {waited:.0f} s); "
            "is it running (ray status)? Leave out --ray-address to start one on this machine. "
            f"Received: ray_address={address!r}"
        ) from None


def _import_ray(address: Optional[str]):
    """Ray, imported so that a local instance (address None) lives on the loopback
    interface: Ray otherwise rewrites 127.0.0.1 to the machine's network address
    (ray._private.services.resolve_ip_for_localhost) unless it runs single-node, which
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 says; it is read when Ray is first imported."""
    if address is None and "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    return ray


def _start_ray(address: Optional[str]) -> None:
    """Starts this process's own local Ray (address None: never a cluster merely recorded
    on disk, and on the loopback interface only), or joins the cluster at `address`
    after checking that it answers. Workers inherit TensorFlow's quiet log level, whether
    oneDNN keeps weights in its kernels and, once this process has imported TensorFlow,
    its oneDNN kernels (so their frames match its own)."""
    ray = _import_ray(address)

    env_vars = {"TF_CPP_MIN_LOG_LEVEL": quiet_tensorflow_env(dict(os.environ))["TF_CPP_MIN_LOG_LEVEL"]}  # the user's, else 2
    if "tensorflow" in sys.modules:  # workers compute with this process's kernels (frames it renders itself match)
        env_vars["TF_ENABLE_ONEDNN_OPTS"] = "1" if onednn_enabled() else "0"
    # Workers keep weights in oneDNN's kernels where this process does (the command line):
    # the same arithmetic, and a worker runs sdanim's jobs only.
    env_vars[KEEP_WEIGHTS] = "1" if weights_kept() else "0"
    common = dict(include_dashboard=False, logging_level="WARNING", configure_logging=True, log_to_driver=True,
                  runtime_env={"env_vars": env_vars})
    if address is None:
        ray.init(address="local", _node_ip_address="127.0.0.1", **common)
    else:
        check_reachable(address)
        ray.init(address=address, **common)


class FrameWorker:
    """A Ray actor's state: one model, rendering batches of a FrameJob's frames.

    Plain Python (wrapped with `ray.remote` by `RayFrames`), so it can also be used,
    and tested, in one process.
    """

    def __init__(self, model, height: int, width: int, threads: Optional[int] = None):
        quiet_tensorflow_env()
        spec = (model or ModelSpec()) if model is None or isinstance(model, ModelSpec) else None
        if spec is not None:
            choose_onednn(spec.precision, spec.family)  # before limit_threads imports TensorFlow
        if threads:
            limit_threads(int(threads))
        if spec is not None:
            model = spec.load(height, width)
        else:
            model = model()
        self.frames = LocalFrames(model)
        self._motion_run: Optional[tuple] = None  # (job and spec, MotionRun)

    def describe(self) -> dict:
        return self.frames.describe()

    def _motion(self, job: Job, spec) -> MotionRun:
        """The job's clip prepared on this worker's model (kept for the job's next units)."""
        key = (job.key, repr(spec))
        if self._motion_run is None or self._motion_run[0] != key:
            self._motion_run = None  # the last clip's motion UNet goes before the next is built
            plan, renderer = self.frames.prepare(job)
            self._motion_run = (key, MotionRun(self.frames.model, job, spec, plan, renderer))
        return self._motion_run[1]

    def motion_clip(self, job: Job, spec) -> Clip:
        """The walk's clip (contexts, noise, windows), as every worker computes it."""
        return self._motion(job, spec).clip

    def window_eps(self, job: Job, spec, i: int, t: float, w: int, latents):
        """A unit of work: window `w`'s guided prediction at step i from its frames' scaled
        latents."""
        return self._motion(job, spec).window_eps(i, t, w, latents)

    def decode(self, job: Job, latents):
        """The frames of a clip's latents."""
        return self.frames.prepare(job)[1].decode(latents)

    def render(self, job: Job, indices: list, folder: Optional[str] = None, probe: Optional[str] = None):
        """Renders `indices`. Where `folder/probe` is visible (shared storage) the frames
        are written there and None comes back per frame; else the images come back."""
        shared = folder is not None and probe is not None and os.path.exists(os.path.join(folder, probe))
        store = FrameStore(folder) if shared else None
        images = self.frames.render(job, indices, store=store, progress=False)
        return {i: (None if shared else images[i]) for i in indices}


class RayFrames:
    """A frame source (see `sdanim.render.local.FrameSource`) on Ray workers.

    Args:
        model: `ModelSpec`, None (the default spec) or a function that builds a model
            (custom or test models); each worker loads its own.
        settings: `RenderSettings`: the image size the workers build for.
        workers: `Workers`.
    """

    def __init__(self, model, settings: RenderSettings, workers: Workers):
        ray = _import_ray(workers.address)
        check_workers_args(model, workers)
        self.workers = workers
        self._started = not ray.is_initialized()
        if self._started:
            _start_ray(workers.address)
        resources = ray.cluster_resources()
        gpus = workers.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
        cpus = workers.cpus_per_worker
        if cpus is None:
            cpus = max(1, int(resources.get("CPU", 1) // workers.count)) if gpus == 0 else 1
        memory_gb = workers.memory_per_worker_gb
        if memory_gb is None:
            memory_gb = model_memory_gb(model)
        need = {"CPU": cpus * workers.count, "GPU": gpus * workers.count,
                "memory": memory_gb * 2**30 * workers.count}
        short = [f"{k} {need[k] / (2**30 if k == 'memory' else 1):g}{' GB' if k == 'memory' else ''} "
                 f"(the cluster has {resources.get(k, 0) / (2**30 if k == 'memory' else 1):.3g})"
                 for k in need if need[k] > resources.get(k, 0) + 1e-9]
        if short:
            self.close()
            raise SdanimError(
                f"the Ray cluster cannot hold {workers.count} workers: they need {', '.join(short)}; "
                f"use fewer workers or a bigger cluster. Received: workers={workers.count}"
            )
        actor = ray.remote(FrameWorker).options(
            num_cpus=cpus, num_gpus=gpus, memory=int(memory_gb * 2**30) or None,
            # The driver retries failed batches itself (counting attempts per frame, to
            # name a frame that always fails); Ray restarts a worker that died.
            max_restarts=workers.max_attempts, max_task_retries=0,
        )
        threads = int(cpus) if gpus == 0 else None
        self.actors = [actor.remote(model, settings.height, settings.width, threads) for _ in range(workers.count)]
        self._alive = [True] * workers.count

    def describe(self) -> dict:
        import ray

        try:
            self._record = ray.get(self.actors[0].describe.remote())
            return self._record
        except ray.exceptions.RayError as error:
            raise SdanimError(f"a worker could not load the model ({_one_line(error)}). "
                              f"Received: workers={self.workers.count}") from None

    def render(self, job: Job, indices, store: Optional[FrameStore] = None, progress: bool = True,
               on_batch=None) -> dict:
        """Renders `indices` on the workers. With a store, frames are written to it
        (by the workers on shared storage, else here) and only frames written here are
        returned; without one, all images are returned. Raises `FailedFrames` after
        the other frames are done if some failed `max_attempts` times."""
        import ray

        folder = store.folder if store is not None else None
        probe = None
        if folder is not None and self.workers.shared_storage is not False:
            probe = f".sdanim-probe-{uuid.uuid4().hex}"
            open(os.path.join(folder, probe), "w").close()
        indices = list(indices)
        # The batches an uninterrupted run makes (frame i at slot i % batch size): a
        # frame is the same image whichever worker renders it, and a retried frame too.
        queue = collections.deque(batches(indices, job.settings.batch_size))
        job_ref = ray.put(job)
        attempts: collections.Counter = collections.Counter()
        failed: dict = {}
        pending: dict = {}  # ObjectRef -> (worker, batch)
        revivals: dict = {}  # ObjectRef -> worker that died: a call that returns once Ray restarted it
        load = [0] * len(self.actors)
        out: dict = {}
        bar = tqdm(total=len(indices), unit="frame", desc=f"rendering on {len(self.actors)} workers",
                   disable=not progress)
        try:
            while queue or pending:
                # 1. Keep every live worker `in_flight` batches deep.
                for w, actor in enumerate(self.actors):
                    while self._alive[w] and load[w] < self.workers.in_flight and queue:
                        batch = queue.popleft()
                        pending[actor.render.remote(job_ref, batch, folder, probe)] = (w, batch)
                        load[w] += 1
                if not pending and not revivals:  # every worker is gone for good
                    for batch in queue:
                        for i in batch:
                            failed.setdefault(i, "no worker left")
                    break
                # 2. Collect whichever batch (or revival) finishes first.
                (ref,), _ = ray.wait(list(pending) + list(revivals), num_returns=1)
                if ref in revivals:
                    w = revivals.pop(ref)
                    try:
                        ray.get(ref)
                        self._alive[w] = True  # restarted: give it work again
                    except ray.exceptions.RayError:
                        pass  # out of restarts: its share goes to the others
                    continue
                w, batch = pending.pop(ref)
                load[w] -= 1
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as error:
                    if isinstance(error, ray.exceptions.RayActorError) and self._alive[w]:
                        # The worker process died (not an error in the frame's code):
                        # no more work for it until a call says Ray restarted it.
                        self._alive[w] = False
                        revivals[self.actors[w].describe.remote()] = w
                    # 3. Retry frame by frame, so one bad frame cannot sink its batch mates.
                    for i in batch:
                        attempts[i] += 1
                        if attempts[i] >= self.workers.max_attempts:
                            failed[i] = _one_line(error)
                        else:
                            queue.append([i])
                    continue
                written = {}
                for i in batch:
                    image = result[i]
                    if image is None:
                        continue  # written by the worker
                    if store is not None:
                        store.write(i, image, frame_metadata(job, i, getattr(self, "_record", {})))
                    written[i] = image
                out.update(written)
                if on_batch is not None and written:
                    on_batch(list(written), [written[i] for i in written])
                bar.update(len(batch))
        finally:
            bar.close()
            if probe is not None:
                _remove(os.path.join(folder, probe))
            if folder is not None and not pending:
                for stale in glob.glob(os.path.join(folder, ".frame_*.partial*")):
                    _remove(stale)  # a worker killed mid-write; its frame was rendered again
        if failed:
            raise FailedFrames(failed, self.workers.max_attempts, folder)
        return out

    def render_motion(self, job: Job, spec, store: FrameStore, progress: bool = True,
                      on_batch=None) -> dict:
        """A walk's frames with motion modules on the workers. The driver keeps the clip's
        state (saved and resumed as in one process); at every step it sends each window's
        frames' latents to a live worker (round robin) and adds the predictions that come
        back to the step's sums in window order, so the frames do not depend on the number
        of workers. Then the workers decode the frames in batches and the driver writes
        them. A unit that fails is tried on the next live worker, up to `max_attempts`
        times; a worker that died takes work again once Ray has restarted it."""
        import ray

        if not store.missing(range(len(job))):
            return {}
        units = _Units(self, store.folder)
        job_ref = ray.put(job)
        clip = next(units.run([functools.partial(_clip_call, job_ref, spec)], ["preparing the clip"]))

        def step_windows(i, t, numbers, scaled):
            calls = [functools.partial(_window_call, job_ref, spec, i, t, w, scaled[clip.windows[w]]) for w in numbers]
            return units.run(calls, [f"window {w} of step {i}" for w in numbers])

        def decode(batches, latents):
            calls = [functools.partial(_decode_call, job_ref, latents[batch]) for batch in batches]
            return units.run(calls, [f"decoding frames {batch[0]}-{batch[-1]}" for batch in batches])

        return render_clip(clip, job, spec, store, getattr(self, "_record", {}), step_windows, decode, progress,
                           on_batch)

    def close(self) -> None:
        """Stops the workers (freeing their models) and the Ray instance this started."""
        import ray

        for actor in getattr(self, "actors", []):
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        if self._started and ray.is_initialized():
            ray.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Units:
    """Calls on a `RayFrames`' workers whose results are wanted in order (a motion render's
    units): all handed out at once, round robin over the live workers; a failed call tried
    again on the next live worker, one line naming it after `max_attempts` failures."""

    def __init__(self, frames: RayFrames, folder: str):
        self.frames = frames
        self.folder = folder
        self.revivals: dict = {}  # ObjectRef -> worker that died: a call that returns once Ray restarted it

    def _live(self) -> list:
        """The workers taking work (waiting for a restart where none is)."""
        import ray

        frames = self.frames
        while True:
            if self.revivals:
                ready, _ = ray.wait(list(self.revivals), num_returns=len(self.revivals), timeout=0)
                for ref in ready:
                    w = self.revivals.pop(ref)
                    try:
                        ray.get(ref)
                        frames._alive[w] = True  # restarted
                    except ray.exceptions.RayError:
                        pass  # out of restarts
            live = [w for w, alive in enumerate(frames._alive) if alive]
            if live or not self.revivals:
                return live
            ray.wait(list(self.revivals), num_returns=1)

    def _submit(self, call, k: int):
        live = self._live()
        if not live:
            raise SdanimError(f"no Ray worker is left; the clip's sampling state is saved in {self.folder}: run the "
                              f"same command again to resume. Received: workers={len(self.frames.actors)}")
        w = live[k % len(live)]
        return call(self.frames.actors[w]), w

    def run(self, calls: list, names: list):
        """Each call's result, in order (a generator: the calls are all made first)."""
        import ray

        attempts = self.frames.workers.max_attempts
        pending = [self._submit(call, k) for k, call in enumerate(calls)]
        for k, (call, name, (ref, w)) in enumerate(zip(calls, names, pending)):
            for attempt in range(attempts):
                try:
                    result = ray.get(ref)
                    break
                except ray.exceptions.RayError as error:
                    if isinstance(error, ray.exceptions.RayActorError) and self.frames._alive[w]:
                        self.frames._alive[w] = False  # died: no more work until Ray restarted it
                        self.revivals[self.frames.actors[w].describe.remote()] = w
                    if attempt + 1 == attempts:
                        raise SdanimError(
                            f"{name} failed on every attempt ({attempts}) ({_one_line(error)}); the clip's sampling "
                            f"state is saved in {self.folder}: run the same command again to resume. "
                            f"Received: max_attempts={attempts}") from None
                    ref, w = self._submit(call, k + attempt + 1)
            yield result


def _clip_call(job_ref, spec, actor):
    return actor.motion_clip.remote(job_ref, spec)


def _window_call(job_ref, spec, i, t, w, latents, actor):
    return actor.window_eps.remote(job_ref, spec, i, t, w, latents)


def _decode_call(job_ref, latents, actor):
    return actor.decode.remote(job_ref, latents)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


__all__ = ["Workers", "RayFrames", "FrameWorker", "FailedFrames", "check_workers_args", "MODEL_MEMORY_GB"]
