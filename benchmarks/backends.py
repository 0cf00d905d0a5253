"""Keras's backends side by side on this machine: seconds per frame of a morph and per
guided UNet step, each backend in its own process (KERAS_BACKEND is read when Keras is
imported), one after another in one run.

    python benchmarks/backends.py                       # tensorflow, torch: 128 px, 8 frames, 4 steps
    python benchmarks/backends.py --backends tensorflow,torch,jax --size 256

The exact SD 1.4 architecture with random weights (`--weights random`), precision "auto"
(on a CPU without bfloat16 in hardware: float32 without compilation -- the settings sdanim
uses on an Apple GPU too), DDIM, guidance 7.5. Each child builds the model, renders the
morph once to trace, then times it `--repeat` times (the best kept) and the UNet step with
`sdanim.tasks.doctor.measure_step`; it prints one JSON line the parent collects.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)


def child(args) -> None:
    from render import PeakRSS

    import sdanim
    from sdanim.model.device import hardware_report
    from sdanim.tasks.doctor import measure_step

    rss = PeakRSS()
    start = time.perf_counter()
    model = sdanim.load_model(weights="random", height=args.size, width=args.size)
    build = time.perf_counter() - start
    settings = sdanim.RenderSettings(height=args.size, width=args.size, num_steps=args.steps, guidance_scale=7.5,
                                     scheduler="ddim", batch_size=args.batch)
    prompts = ["a red barn in a field", "a lighthouse on a cliff at night"]
    best = float("inf")
    with tempfile.TemporaryDirectory() as folder:
        for r in range(args.repeat + 1):  # the first traces
            start = time.perf_counter()
            sdanim.morph(prompts, out=os.path.join(folder, f"m{r}.gif"), frames=args.frames, seed=1, settings=settings,
                         model=model, progress=False)
            if r:
                best = min(best, (time.perf_counter() - start) / args.frames)
    step = measure_step(model)
    report = hardware_report()
    print("RESULT " + json.dumps({"backend": report["backend"], "device": report["device"], "precision": model.precision,
                                  "build_s": build, "s_per_frame": best, "s_per_step": step,
                                  "peak_rss_gib": rss.peak / 2**30}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="tensorflow,torch")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    print(f"{args.size} px, {args.frames} frames, {args.steps} DDIM steps, guidance 7.5, batch {args.batch}, "
          f"random weights, precision auto", flush=True)
    results = {}
    for backend in args.backends.split(","):
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
        argv = [sys.executable, os.path.abspath(__file__), "--child", "--size", str(args.size), "--frames",
                str(args.frames), "--steps", str(args.steps), "--batch", str(args.batch), "--repeat", str(args.repeat)]
        proc = subprocess.run(argv, capture_output=True, text=True, env=env)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{backend}: failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        r = results[backend] = json.loads(line[len("RESULT "):])
        print(f"{backend}: {r['s_per_frame']:.3f} s/frame, {r['s_per_step']:.3f} s per guided UNet step, build "
              f"{r['build_s']:.0f} s, peak RSS {r['peak_rss_gib']:.1f} GiB ({r['device']}, {r['precision']})", flush=True)
    if "tensorflow" in results:
        base = results["tensorflow"]
        for backend, r in results.items():
            print(f"{backend} / tensorflow: frame {r['s_per_frame'] / base['s_per_frame']:.2f}x, "
                  f"UNet step {r['s_per_step'] / base['s_per_step']:.2f}x")


if __name__ == "__main__":
    main()
