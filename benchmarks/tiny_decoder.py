"""The tiny decoder (TAESD) against the SD VAE decoder, same frames, one process.

    python benchmarks/tiny_decoder.py                  # 128 and 256 px, lcm 4 steps, batch 4
    python benchmarks/tiny_decoder.py --sizes 512 --batch 8

The exact SD 1.4 architecture with random weights and a TAESD decoder with random
weights (diffusers' AutoencoderTiny configuration, written as taesd_decoder.pth with
torch and read by sdanim). For each size: seconds per frame of an lcm 4-step render
(guidance 1) with `decoder="full"` and `decoder="tiny"`, alternated (best of --repeat),
the decoder alone per frame, and the uniform-spacing preview pass (the same walk at
the preview's steps, a quarter of 25, decoded by each decoder). Random weights say
nothing about image quality; this measures the cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _taesd_file(folder: str) -> str:
    import diffusers
    import torch

    torch.manual_seed(0)
    vae = diffusers.AutoencoderTiny().eval()
    state = {}
    for key, value in vae.state_dict().items():  # diffusers' names -> taesd_decoder.pth's
        if key.startswith("decoder.layers."):
            index, rest = key[len("decoder.layers."):].split(".", 1)
            state[f"{int(index) + 1}.{rest}"] = value
    path = os.path.join(folder, "taesd_decoder.pth")
    torch.save(state, path)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="128,256", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--precision", default="float32")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)
    from render import triton_first

    triton_first()  # torch writes the weights

    from sdanim.config.settings import RenderSettings
    from sdanim.core.noise import seeded_noise
    from sdanim.core.plan import FramePlan
    from sdanim.model.device import hardware_report
    from sdanim.model.loading import load_model
    from sdanim.render.jobs import make_renderer
    from sdanim.render.sampling import render_frames

    print(f"machine: {hardware_report()}")
    taesd = _taesd_file(tempfile.mkdtemp(prefix="sdanim-taesd-"))
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((2, 77, 768)).astype(np.float32)
    for size in args.sizes:
        model = load_model(weights="random", height=size, width=size, precision=args.precision, taesd=taesd)
        base = RenderSettings(height=size, width=size, num_steps=4, scheduler="lcm", guidance_scale=1.0,
                              batch_size=args.batch)
        noises = np.stack([seeded_noise(42, base.latent_shape)] * 2)
        plan = FramePlan(embeddings, noises, (42, 42), np.linspace(0, 1, args.frames), noise_mode="fixed")
        runs = {}
        for label, settings in (("lcm 4, full decoder", base),
                                ("lcm 4, tiny decoder", dataclasses.replace(base, decoder="tiny")),
                                ("preview 6 steps ddim, full", dataclasses.replace(base, scheduler="ddim", num_steps=6,
                                                                                    guidance_scale=7.5)),
                                ("preview 6 steps ddim, tiny", dataclasses.replace(base, scheduler="ddim", num_steps=6,
                                                                                    guidance_scale=7.5, decoder="tiny"))):
            renderer = make_renderer(model, settings, None)
            render_frames(renderer, plan, range(args.batch), args.batch, progress=False)  # trace
            runs[label] = (renderer, float("inf"))
        latents = rng.standard_normal((args.batch, size // 8, size // 8, 4)).astype(np.float32)
        for _ in range(args.repeat):
            for label, (renderer, best) in runs.items():
                start = time.perf_counter()
                render_frames(renderer, plan, range(args.frames), args.batch, progress=False)
                runs[label] = (renderer, min(best, (time.perf_counter() - start) / args.frames))
        decode = {}
        for label in ("lcm 4, full decoder", "lcm 4, tiny decoder"):
            renderer = runs[label][0]
            renderer.decode(latents)
            start = time.perf_counter()
            renderer.decode(latents)
            decode[label] = (time.perf_counter() - start) / args.batch
        print(f"\n{size}x{size}, batch {args.batch}, {args.frames} frames, {model.precision}")
        for label, (_, seconds) in runs.items():
            extra = f", decoder alone {decode[label]:.3f} s/frame" if label in decode else ""
            print(f"  {label:<28}{seconds:8.3f} s/frame{extra}")
        full, tiny = runs["lcm 4, full decoder"][1], runs["lcm 4, tiny decoder"][1]
        pf, pt = runs["preview 6 steps ddim, full"][1], runs["preview 6 steps ddim, tiny"][1]
        print(f"  tiny decoder: {full / tiny:.2f}x per lcm frame, {pf / pt:.2f}x per preview frame, "
              f"decoder alone {decode['lcm 4, full decoder'] / decode['lcm 4, tiny decoder']:.0f}x")
        del model, runs


if __name__ == "__main__":
    main()
