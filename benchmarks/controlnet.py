"""What a ControlNet costs: seconds per frame with none, one and two nets, side by side in
one process, and diffusers' StableDiffusionControlNetPipeline on the same walk as the peer.

    python benchmarks/controlnet.py                   # CPU preset: 128x128, 4 frames, batch 2, 6 steps
    python benchmarks/controlnet.py --size 512 --frames 2 --batch 1 --steps 2
    python benchmarks/controlnet.py --diffusers       # also diffusers (torch, float32) with 0 and 1 net

The exact SD 1.4 architecture with random weights and ControlNets of the exact SD 1.5
architecture with random weights (`ControlNetSpec("random")`), a morph between two random
"prompt" embeddings over one fixed noise, DDIM, guidance 7.5, rendered by sdanim's renderer
as `sdanim.morph` renders it. Each configuration renders one warm-up batch (tracing),
then the timed frames; the configurations alternate `--repeat` times and the best of
each is kept. Prints seconds per frame, the ratio to no ControlNet, and peak RSS.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--nets", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--diffusers", action="store_true")
    args = ap.parse_args(argv)
    from render import PeakRSS, triton_first

    if args.diffusers:
        triton_first()
    from sdanim.config.control import ControlNetSpec
    from sdanim.config.settings import RenderSettings
    from sdanim.core.hints import NetHints
    from sdanim.core.plan import FramePlan
    from sdanim.model.controlnet import controlnets_for
    from sdanim.model.device import hardware_report
    from sdanim.model.loading import load_model
    from sdanim.render.control import ControlInput
    from sdanim.render.jobs import make_renderer
    from sdanim.render.sampling import render_frames

    rss = PeakRSS()
    model = load_model(weights="random", height=args.size, width=args.size, precision=args.precision)
    print(f"{hardware_report()} precision={model.precision}; {args.size}px, {args.frames} frames, batch {args.batch}, "
          f"{args.steps} DDIM steps, guidance 7.5", flush=True)
    settings = RenderSettings(height=args.size, width=args.size, num_steps=args.steps, batch_size=args.batch)
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((2, 77, 768)).astype(np.float32)
    noise = rng.standard_normal((1, args.size // 8, args.size // 8, 4)).astype(np.float32)
    hint = (rng.uniform(0, 1, (1, args.size, args.size, 3)) * 255).astype(np.uint8)
    positions = np.linspace(0.0, 1.0, args.frames)

    def renderer_for(count):
        specs = [ControlNetSpec("random", scale=0.8) for _ in range(count)]
        if count:
            controlnets_for(model, specs[:1])  # the nets are random: one net built, used `count` times
        controls = tuple(ControlInput(s, NetHints(hint), "random", "random", "1.4") for s in specs)
        plan = FramePlan(embeddings, np.repeat(noise, 2, axis=0), (1, 1), positions,
                         controls=tuple(c.hints for c in controls))
        return plan, make_renderer(model, settings, None, controls=controls)

    best, first = {}, {}
    setups = {n: renderer_for(n) for n in args.nets}
    for n, (plan, renderer) in setups.items():  # warm-up: trace each
        first[n] = render_frames(renderer, plan, range(args.batch), args.batch, progress=False)[0]
    for n in args.nets[1:]:  # the nets act: the frames differ from those without
        print(f"{n} net(s): frame 0 moves by up to {np.abs(first[n].astype(int) - first[args.nets[0]]).max()} "
              f"levels", flush=True)
    for _ in range(args.repeat):
        for n, (plan, renderer) in setups.items():
            start = time.perf_counter()
            render_frames(renderer, plan, range(args.frames), args.batch, progress=False)
            best[n] = min(best.get(n, 1e9), (time.perf_counter() - start) / args.frames)
    for n in args.nets:
        ratio = best[n] / best[args.nets[0]]
        print(f"sdanim, {n} ControlNet(s): {best[n]:.2f} s/frame ({ratio:.2f}x of {args.nets[0]})", flush=True)
    print(f"peak RSS {rss.peak / 2**30:.1f} GiB", flush=True)
    if args.diffusers:
        diffusers_figures(args, embeddings, noise, hint, positions, best)


def diffusers_figures(args, embeddings, noise, hint, positions, ours):
    """StableDiffusionControlNetPipeline (float32, torch's CPU threads) on the same walk,
    with none and one net (SD 1.5 configurations, random weights)."""
    import torch
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    import sd_reference as ref

    models = ref.build("1.4", parts=("unet", "vae"))
    config = {k: v for k, v in ref.unet_config("1.4").items() if k not in ("sample_size", "out_channels", "up_block_types")}
    net = ControlNetModel(**config).eval()
    common = dict(vae=models["vae"], text_encoder=None, tokenizer=None, unet=models["unet"], scheduler=DDIMScheduler(),
                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipes = {0: StableDiffusionPipeline(**common), 1: StableDiffusionControlNetPipeline(controlnet=net, **common)}
    a, b = torch.from_numpy(embeddings[0]), torch.from_numpy(embeddings[1])
    contexts = torch.stack([(1 - float(t)) * a + float(t) * b for t in positions])  # (F, 77, 768)
    latent = torch.from_numpy(noise).permute(0, 3, 1, 2)
    image = torch.from_numpy(hint).permute(0, 3, 1, 2).float() / 255.0
    best = {}
    for n, pipe in pipes.items():
        pipe.set_progress_bar_config(disable=True)

        def run(batch, n=n, pipe=pipe):
            extra = {"image": image.repeat(len(batch), 1, 1, 1), "controlnet_conditioning_scale": 0.8} if n else {}
            with torch.no_grad():
                pipe(prompt_embeds=batch, negative_prompt_embeds=torch.zeros_like(batch),
                     latents=latent.repeat(len(batch), 1, 1, 1), num_inference_steps=args.steps, guidance_scale=7.5,
                     output_type="latent", **extra)

        batches = [contexts[i:i + args.batch] for i in range(0, len(contexts), args.batch)]
        run(batches[0])
        for _ in range(args.repeat):
            start = time.perf_counter()
            for batch in batches:
                run(batch)
            best[n] = min(best.get(n, 1e9), (time.perf_counter() - start) / args.frames)
    for n in (0, 1):
        print(f"diffusers, {n} ControlNet(s): {best[n]:.2f} s/frame ({best[n] / best[0]:.2f}x of 0); "
              f"sdanim / diffusers {ours.get(n, float('nan')) / best[n]:.2f}", flush=True)


if __name__ == "__main__":
    main()
