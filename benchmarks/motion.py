"""What motion modules cost, and that their memory is bounded by the window.

    python benchmarks/motion.py                    # cost: 24 frames at 128 px, 4 steps
    python benchmarks/motion.py --steps 2 --repeat 1 --diffusers   # what docs/benchmarks.md reports
    python benchmarks/motion.py --diffusers        # also diffusers' AnimateDiffPipeline + FreeNoise
    python benchmarks/motion.py --memory 16,64,256 # peak RSS per length, each in its own process
    python benchmarks/motion.py --memory 16 --size 256 --spatial-chunks 0,8,2   # the spatial chunks' saving
    python benchmarks/motion.py --call-memory --size 512 --rows 4 --spatial-chunks 0,1   # one motion UNet call

The exact SD 1.4 architecture and v2-shaped motion modules, all with random weights
(`--weights random`, `MotionSpec("random")`), a morph of two prompts rendered by
`sdanim.morph` as a user runs it (frames written, GIF exported), Euler on trailing
spacing, linear betas, guidance 7.5, windows of 16 every 4.

Cost: seconds per frame of independent frames (no motion modules), motion modules with
the windows blended in the UNet's predictions ("unet") and in the motion modules'
attention ("attention"), side by side in one process, each run once to trace and then
`--repeat` times (the best kept); with --diffusers, AnimateDiffPipeline with
`enable_free_noise(16, 4)` on the same CPU, float32, random weights of the same shapes.

Memory: for each length a child process renders the clip (1 step, guidance 1, windows of 16
every `--stride` 8: every window runs, in a quarter of the default's time) and prints its
peak RSS and the render's own peak above the loaded model; the ratios to the shortest are
printed. `--spatial-chunks` repeats each length for each chunk size (0: the whole window
at once): the render's own peak and its seconds show what `spatial_chunk` saves and costs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

PROMPTS = ["a red barn in a field", "a lighthouse on a cliff at night"]


def _settings(args, steps=None, guidance=7.5):
    from sdanim.config.settings import RenderSettings

    return RenderSettings(height=args.size, width=args.size, num_steps=steps or args.steps, guidance_scale=guidance,
                          scheduler="euler_trailing", batch_size=args.batch)


def _morph(model, args, out, motion, frames=None, steps=None, guidance=7.5):
    import sdanim

    start = time.perf_counter()
    sdanim.morph(PROMPTS, out=out, frames=frames or args.frames, seed=1, settings=_settings(args, steps, guidance),
                 model=model, progress=False, motion=motion, overwrite=True)
    return time.perf_counter() - start


def cost(args) -> dict:
    from render import PeakRSS, triton_first

    if args.diffusers:
        triton_first()
    from sdanim.config.motion import MotionSpec
    from sdanim.model.device import hardware_report
    from sdanim.model.loading import load_model

    rss = PeakRSS()
    model = load_model(weights="random", height=args.size, width=args.size, precision="float32")
    print(f"{hardware_report()} precision={model.precision}; {args.size} px, {args.frames} frames, {args.steps} "
          f"euler_trailing steps, guidance 7.5, windows of 16 every 4, frames batch {args.batch}", flush=True)
    kinds = {"independent": None, "unet": MotionSpec("random", blend="unet"),
             "attention": MotionSpec("random", blend="attention")}
    best = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, motion in kinds.items():  # trace each (one step: the same programs)
            _morph(model, args, os.path.join(folder, f"warm_{name}.gif"), motion, steps=1)
        for r in range(args.repeat):
            for name, motion in kinds.items():
                seconds = _morph(model, args, os.path.join(folder, f"{name}_{r}.gif"), motion)
                best[name] = min(best.get(name, 1e9), seconds / args.frames)
    for name in kinds:
        print(f"sdanim, {name}: {best[name]:.3f} s/frame ({best[name] / best['independent']:.2f}x of independent "
              f"frames)", flush=True)
    print(f"peak RSS {rss.peak / 2**30:.1f} GiB", flush=True)
    if args.diffusers:
        theirs = diffusers_seconds(args)
        print(f"diffusers AnimateDiffPipeline + FreeNoise: {theirs:.3f} s/frame; sdanim unet / diffusers "
              f"{best['unet'] / theirs:.2f}, sdanim attention / diffusers {best['attention'] / theirs:.2f}", flush=True)
    return best


def diffusers_seconds(args) -> float:
    """AnimateDiffPipeline (float32, torch's CPU threads) with FreeNoise on the same clip
    shape: prompt embeddings handed in (its text encoder is not timed; sdanim's is)."""
    import torch
    from diffusers import AnimateDiffPipeline, EulerDiscreteScheduler, MotionAdapter

    import sd_reference as ref

    parts = ref.build("1.4", parts=("unet", "vae"))
    adapter = MotionAdapter(motion_max_seq_length=32, use_motion_mid_block=True)
    ref.randomize(adapter, 5)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                                       timestep_spacing="trailing")
    pipe = AnimateDiffPipeline(vae=parts["vae"], text_encoder=None, tokenizer=None, unet=parts["unet"],
                               motion_adapter=adapter, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_free_noise(context_length=16, context_stride=4)
    rng = np.random.default_rng(0)
    table = {p: torch.from_numpy(rng.standard_normal((77, 768)).astype(np.float32)) for p in [*PROMPTS, ""]}

    def encode_prompt(prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt=None, **kw):
        negative = torch.stack([table[p] for p in negative_prompt]) if do_classifier_free_guidance else None
        return torch.stack([table.get(p, table[""]) for p in prompt]), negative

    pipe.encode_prompt = encode_prompt

    def run():
        with torch.no_grad():
            pipe(prompt={0: PROMPTS[0], args.frames - 1: PROMPTS[1]}, negative_prompt="", num_frames=args.frames,
                 height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=7.5,
                 output_type="np", generator=torch.Generator().manual_seed(0))

    pipe(prompt={0: PROMPTS[0], args.frames - 1: PROMPTS[1]}, negative_prompt="", num_frames=args.frames,
         height=args.size, width=args.size, num_inference_steps=1, guidance_scale=7.5, output_type="np")  # warm-up
    best = 1e9
    for _ in range(args.repeat):
        start = time.perf_counter()
        run()
        best = min(best, (time.perf_counter() - start) / args.frames)
    return best


def memory_child(args, frames: int) -> None:
    from render import PeakRSS

    from sdanim.config.motion import MotionSpec
    from sdanim.model.loading import load_model

    rss = PeakRSS()
    model = load_model(weights="random", height=args.size, width=args.size, precision="float32")
    time.sleep(0.1)
    built = rss.peak  # the model's build: the same for every length
    rss.reset()
    with tempfile.TemporaryDirectory() as folder:
        spec = MotionSpec("random", stride=args.stride, spatial_chunk=args.spatial_chunk or None)
        seconds = _morph(model, args, os.path.join(folder, "clip.gif"), spec, frames=frames, steps=1, guidance=1.0)
    time.sleep(0.1)
    print(f"RESULT {frames} {max(rss.peak, built)} {seconds:.1f} {rss.peak - rss.start}", flush=True)


def memory(args) -> None:
    lengths = [int(x) for x in args.memory.split(",")]
    print(f"{args.size} px, 1 euler_trailing step, guidance 1 (one UNet row per frame), windows of 16 every "
          f"{args.stride}, blend unet; one process each", flush=True)
    peaks = {}
    for chunk in [int(x) for x in args.spatial_chunks.split(",")]:
        for frames in lengths:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", str(frames), "--size",
                                  str(args.size), "--batch", str(args.batch), "--stride", str(args.stride),
                                  "--spatial-chunk", str(chunk)], capture_output=True, text=True, check=True)
            line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT"))
            _, _, peak, seconds, rendering = line.split()
            peaks.setdefault(frames, int(peak))
            print(f"{frames} frames, spatial chunk {chunk or 'off'}: peak RSS {int(peak) / 2**30:.2f} GiB "
                  f"({int(peak) / peaks[lengths[0]]:.2f}x of {lengths[0]} frames with the first setting); the render's "
                  f"own peak above the loaded model {int(rendering) / 2**30:.2f} GiB; {float(seconds):.0f} s", flush=True)


def call_child(args) -> None:
    """One compiled motion UNet call (as a window's step makes it) on `rows` rows: its peak
    RSS above the traced model (`PeakRSS`, sampled every 20 ms) and its seconds."""
    from render import PeakRSS

    from sdanim.core.schedulers import timestep_embedding
    from sdanim.model.compiled import compiled
    from sdanim.model.loading import load_model
    from sdanim.model.motion import motion_unet, random_motion_modules
    from sdanim.render.motion import _motion_eps

    model = load_model(weights="random", height=args.size, width=args.size, precision="float32")
    unet = motion_unet(model.diffusion_model, random_motion_modules(model.diffusion_model), args.rows,
                       spatial_chunk=args.spatial_chunk or None)
    program = compiled(_motion_eps, (unet,), False)
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((args.rows, args.size // 8, args.size // 8, 4)).astype(np.float32)
    t_emb = np.repeat(timestep_embedding(500)[None].astype(np.float32), args.rows, axis=0)
    context = rng.standard_normal((args.rows, 77, 768)).astype(np.float32)
    program(latent, t_emb, context)  # traced
    rss = PeakRSS()
    start = time.perf_counter()
    np.asarray(program(latent, t_emb, context))
    seconds = time.perf_counter() - start
    time.sleep(0.05)
    print(f"RESULT {max(rss.peak - rss.start, 0)} {seconds:.1f}", flush=True)


def call_memory(args) -> None:
    import keras

    print(f"one motion UNet call, {args.size} px, {args.rows} rows, {keras.backend.backend()}; one process each",
          flush=True)
    for chunk in [int(x) for x in args.spatial_chunks.split(",")]:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--call-child", "--size", str(args.size),
                              "--rows", str(args.rows), "--spatial-chunk", str(chunk)],
                             capture_output=True, text=True, check=True)
        _, rss, seconds = next(line for line in out.stdout.splitlines() if line.startswith("RESULT")).split()
        print(f"spatial chunk {chunk or 'off'}: the call's peak above the traced model {int(rss) / 2**30:.2f} GiB, "
              f"{float(seconds):.1f} s", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4, help="frames decoded (and independent frames rendered) per call")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--diffusers", action="store_true")
    ap.add_argument("--memory", default=None, metavar="N,N,...")
    ap.add_argument("--stride", type=int, default=8, help="the memory runs' window stride (default: 8)")
    ap.add_argument("--spatial-chunks", default="0", metavar="N,N,...",
                    help="the memory runs' spatial chunk sizes in UNet rows, 0: off (default: 0)")
    ap.add_argument("--spatial-chunk", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--call-memory", action="store_true", help="one motion UNet call's peak per spatial chunk size")
    ap.add_argument("--rows", type=int, default=4, help="the call's UNet rows (default: 4)")
    ap.add_argument("--call-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.call_child:
        call_child(args)
    elif args.call_memory:
        call_memory(args)
    elif args.memory_child is not None:
        memory_child(args, args.memory_child)
    elif args.memory:
        memory(args)
    else:
        cost(args)


if __name__ == "__main__":
    main()
