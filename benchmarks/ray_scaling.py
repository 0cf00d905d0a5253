"""How well sdanim's Ray driver scales: seconds and efficiency at 1, 2, 4, 8 workers.

Stand-in mode (default) measures the coordination itself: each worker is a simulated
GPU with a fixed cost per frame (time.sleep, so 8 of them fit on 2 cores) that writes
a real 64x64 PNG per frame through the same FrameStore; the driver is the real one
(ray.wait, two batches in flight per worker, the manifest-free part of a run).
Efficiency at N workers = T(1) / (N x T(N)).

--real measures the real architecture (random weights) on CPU workers instead:
1 worker with every core vs 2 workers sharing them, at 128x128.

    python benchmarks/ray_scaling.py                      # stand-in, 512 frames, 50 ms/frame
    python benchmarks/ray_scaling.py --real --frames 8    # SD 1.4, random weights (2 x 6 GB)

Figures go to docs/benchmarks.md. Times exclude starting the workers (model builds).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def stand_in(cost: float):
    """A worker-side model whose rendering is `cost` seconds per frame, then a PNG."""
    import numpy as np

    from sdanim.render import local as run

    def render(self, job, indices, store=None, progress=True, on_batch=None):
        indices = list(indices)
        time.sleep(cost * len(indices))
        images = {i: np.full((64, 64, 3), i % 256, np.uint8) for i in indices}
        if store is not None:
            for i in indices:
                store.write(i, images[i], {"sdanim": job.frame_text(i)})
        return images

    run.LocalFrames.render = render

    class Model:
        height = width = 64

        def describe(self):
            return {"version": "stand-in", "cost": cost}

    return Model()


def motion_stand_in(cost: float):
    """A worker-side model for a motion render: each unit (a window at a step) costs `cost`
    seconds and predicts zeros; the clip is made without a text encoder; decoding gives
    flat images. The driver (sample_clip's sums, the state file, the frame files) is real."""
    import numpy as np

    from sdanim.core.windows import context_windows, free_noise
    from sdanim.render import ray as sdanim_ray
    from sdanim.render.motion import Clip

    class Run:  # in place of MotionRun: the clip, made without a text encoder; units that sleep
        def __init__(self, model, job, spec, plan=None, renderer=None):
            frames, shape = len(job), job.settings.latent_shape
            windows = context_windows(frames, spec.context, spec.stride)
            self.clip = Clip(np.zeros((frames, 1, 8), np.float32), np.zeros((frames, 1, 8), np.float32),
                             free_noise(1, frames, spec.context, spec.stride, shape), windows, spec.weighting, 7.5, 1,
                             f"stand-in {frames} {spec.context} {spec.stride}")

        def window_eps(self, i, t, w, latents):
            time.sleep(cost)
            return np.zeros_like(latents)

    class Decoder:
        def decode(self, latents):
            return np.zeros((len(latents), 64, 64, 3), np.uint8)

    sdanim_ray.MotionRun = Run
    sdanim_ray.LocalFrames.prepare = lambda self, job: (None, Decoder())
    return stand_in(0.0)


def _job(frames: int, height: int, steps: int, batch: int):
    from sdanim.core.keyframes import walk_from_prompts
    from sdanim.render.jobs import FrameJob
    from sdanim.config.settings import RenderSettings

    walk = walk_from_prompts(["a red barn at dawn", "a snowy forest"], [42, 42], [frames - 1], "linear", False, "slerp")
    return FrameJob(walk, RenderSettings(height=height, width=height, num_steps=steps, batch_size=batch))


def time_render(model, job, workers, out_dir: str, motion=None, trace: bool = False) -> float:
    import ray

    from sdanim.render.ray import RayFrames
    from sdanim.render.store import FrameStore

    with RayFrames(model, job.settings, workers) as source:
        ray.get([a.describe.remote() for a in source.actors])  # every worker up (model built)
        if motion is not None and trace:  # trace the motion UNet first (a one-step render)
            warm = dataclasses.replace(job, settings=dataclasses.replace(job.settings, num_steps=1))
            source.render_motion(warm, motion, FrameStore(tempfile.mkdtemp(dir=out_dir)), progress=False)
        folder = tempfile.mkdtemp(dir=out_dir)
        start = time.perf_counter()
        if motion is None:
            source.render(job, range(len(job)), store=FrameStore(folder), progress=False)
        else:
            source.render_motion(job, motion, FrameStore(folder), progress=False)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true", help="the real SD 1.4 architecture on CPU workers")
    parser.add_argument("--frames", type=int, default=512)
    parser.add_argument("--cost", type=float, default=0.05, help="stand-in seconds per frame (default: 0.05)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", default="1,2,4,8")
    parser.add_argument("--motion", action="store_true",
                        help="a motion render (windows of 16 every 4, a window at a step per unit; stand-in: "
                             "--cost seconds per unit)")
    args = parser.parse_args()

    import ray

    from sdanim.config.motion import MotionSpec

    from sdanim.render.ray import Workers
    from sdanim.model.spec import ModelSpec

    here = os.path.dirname(os.path.abspath(__file__))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([here, os.path.dirname(here)])}})
    counts = [int(n) for n in args.workers.split(",")]
    out_dir = tempfile.mkdtemp(prefix="sdanim-ray-bench-")
    cpus = os.cpu_count()
    if args.real:
        counts = [n for n in counts if n <= cpus]
        job = _job(args.frames, 128, 4 if not args.motion else 2, args.batch)
        model = ModelSpec(weights="random")
        make = lambda n: Workers(count=n, cpus_per_worker=cpus // n)  # noqa: E731
        what = (f"SD 1.4 random weights, 128x128, {job.settings.num_steps} DDIM steps, guidance 7.5, "
                f"batch {args.batch}, {cpus} cores shared")
    else:
        job = _job(args.frames, 64, 1 if not args.motion else 4, args.batch)
        import ray_scaling

        model = functools.partial(ray_scaling.motion_stand_in if args.motion else ray_scaling.stand_in, args.cost)
        make = lambda n: Workers(count=n, cpus_per_worker=min(1.0, cpus / n) / 4)  # noqa: E731  threads: none set
        what = f"stand-in {args.cost * 1000:.0f} ms per {'unit' if args.motion else 'frame'}, batch {args.batch}"
    motion = MotionSpec("random", context=16, stride=4) if args.motion else None
    if motion is not None:
        what += f"; motion modules, windows of 16 every 4 ({job.settings.num_steps} steps)"
    print(f"{args.frames} frames; {what}; Ray {ray.__version__}")
    base = None
    for n in counts:
        seconds = time_render(model, job, make(n), out_dir, motion, trace=args.real)
        base = base or seconds
        print(f"workers {n}: {seconds:7.2f} s  {seconds / args.frames:.4f} s/frame  "
              f"speed-up {base / seconds:5.2f}x  efficiency {base / (n * seconds):6.1%}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
