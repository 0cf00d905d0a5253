"""Attention interpolation (AID) against plain embedding interpolation, same walk, one process.

    python benchmarks/attention_interp.py                 # CPU preset: 128x128, 8 frames, batch 4
    python benchmarks/attention_interp.py --preset gpu    # 512x512, 16 frames, batch 8
    python benchmarks/attention_interp.py --modes fused,inner,outer --warmups 0.5,1.0

The exact SD 1.4 architecture with random weights; a morph between two random "prompt"
embeddings over one fixed noise (`FramePlan`), rendered by `render_frames` exactly as
`sdanim.morph` renders it: with AID every batch is denoised beside its two keyframes
(helper rows) for the warm-up steps, then without them. Each configuration renders one
warm-up batch first (tracing), then the timed frames; lerp and AID alternate `--repeat`
times (this machine's speed drifts) and the best of each is kept. Prints seconds per
frame, the ratio to lerp, peak RSS during the run, and the smoothness (1 - Gini of the
consecutive-frame distances). Random weights say nothing about how smooth a real
model's morph looks: this measures the cost.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PRESETS = {
    "cpu": dict(size=128, frames=8, batch=4, steps=10, precision="float32", jit=False),
    "gpu": dict(size=512, frames=16, batch=8, steps=25, precision="mixed_float16", jit=True),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--size", type=int)
    ap.add_argument("--frames", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--precision")
    ap.add_argument("--scheduler", default="ddim")
    ap.add_argument("--loop", default="auto", choices=("auto", "program", "steps"))
    ap.add_argument("--modes", default="fused", type=lambda s: s.split(","))
    ap.add_argument("--warmups", default="0.5", type=lambda s: [float(x) for x in s.split(",")])
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)
    cfg = dict(PRESETS[args.preset])
    for key in ("size", "frames", "batch", "steps", "precision"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)

    import kcv_shim

    kcv_shim.install()
    from render import PeakRSS

    from sdanim.config.settings import RenderSettings
    from sdanim.core.noise import seeded_noise
    from sdanim.core.plan import FramePlan
    from sdanim.core.smoothness import smoothness_report
    from sdanim.model.device import hardware_report
    from sdanim.model.loading import load_model
    from sdanim.render.jobs import make_renderer
    from sdanim.render.sampling import render_frames

    size, frames, batch = cfg["size"], cfg["frames"], cfg["batch"]
    print(f"machine: {hardware_report()}")
    print(f"{size}x{size}, {frames} frames, batch {batch}, {args.scheduler} {cfg['steps']} steps, {cfg['precision']}, "
          f"loop {args.loop}")
    t0 = time.perf_counter()
    model = load_model(weights="random", height=size, width=size, precision=cfg["precision"], jit_compile=cfg["jit"])
    print(f"model built in {time.perf_counter() - t0:.1f} s")
    settings = RenderSettings(height=size, width=size, num_steps=cfg["steps"], scheduler=args.scheduler, batch_size=batch)
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((2, 77, 768)).astype(np.float32)
    noises = np.stack([seeded_noise(42, settings.latent_shape)] * 2)  # one fixed noise (noise_mode "fixed")
    positions = np.linspace(0.0, 1.0, frames)
    renderer = make_renderer(model, settings, None)
    if args.loop != "auto":
        renderer.loop = args.loop
    print(f"renderer loop: {renderer.loop}")
    rss = PeakRSS()

    def plan(mode: str, warmup: float) -> FramePlan:
        return FramePlan(embeddings, noises, (42, 42), positions, noise_mode="fixed", attention=mode, attention_warmup=warmup)

    configs = [("off", 0.5)] + [(m, w) for m in args.modes for w in args.warmups]
    for mode, warmup in configs:  # trace every program once
        render_frames(renderer, plan(mode, warmup), range(min(batch, frames)), batch, progress=False)
    best: dict = {}
    for _ in range(args.repeat):
        for mode, warmup in configs:
            rss.reset()
            start = time.perf_counter()
            images = render_frames(renderer, plan(mode, warmup), range(frames), batch, progress=False)
            seconds = (time.perf_counter() - start) / frames
            entry = best.get((mode, warmup))
            if entry is None or seconds < entry[0]:
                best[(mode, warmup)] = (seconds, rss.peak, images)
    base = best[("off", 0.5)][0]
    helpers = plan(args.modes[0], args.warmups[0]).helper_count(batch)
    print(f"AID renders each batch of {batch} beside {helpers} keyframe rows during the warm-up")
    print(f"{'interpolation':<22}{'s/frame':>9}{'x lerp':>8}{'peak RSS':>10}{'1-Gini':>8}")
    for (mode, warmup), (seconds, peak, images) in best.items():
        label = "lerp (embeddings)" if mode == "off" else f"{mode}, warm-up {warmup:g}"
        smooth = smoothness_report([images[i] for i in range(frames)])
        print(f"{label:<22}{seconds:>9.3f}{seconds / base:>8.2f}{peak / 2**30:>8.2f} G{smooth['one_minus_gini']:>8.3f}")


if __name__ == "__main__":
    main()
