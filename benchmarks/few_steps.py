"""Few-step samplers against the 25-step default, same walk, one process.

    python benchmarks/few_steps.py                 # CPU preset: 128x128, 8 frames, batch 4
    python benchmarks/few_steps.py --preset gpu    # 512x512, 16 frames, batch 8

Renders the same frames (two random "prompt" embeddings slerped over one fixed noise,
the exact SD 1.4 architecture with random weights) with

    ddim  25 steps, guidance 7.5  (two UNet passes per step: 50 per frame)
    lcm    4 steps, guidance 1    (one pass per step: 4 per frame)
    tcd    4 steps, guidance 1

and prints seconds per frame, the speed-up over ddim, and the decoder's share of a
frame (the VAE decoder runs once per frame whatever the steps, so it bounds the gain).
Random weights say nothing about image quality: LCM/TCD need step-distilled weights
(LCM-LoRA) for good images; this measures the cost of a frame.
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
    "cpu": dict(size=128, frames=8, batch=4, precision="float32", jit=False),
    "gpu": dict(size=512, frames=16, batch=8, precision="mixed_float16", jit=True),
}
RUNS = (("ddim", 25, 7.5), ("lcm", 4, 1.0), ("tcd", 4, 1.0))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--size", type=int)
    ap.add_argument("--frames", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--precision")
    args = ap.parse_args(argv)
    cfg = dict(PRESETS[args.preset])
    for key in ("size", "frames", "batch", "precision"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)

    import kcv_shim

    kcv_shim.install()
    import keras

    from sdanim.core.interpolation import slerp
    from sdanim.model.loading import load_model
    from sdanim.core.noise import seeded_noise
    from sdanim.core.plan import FramePlan
    from sdanim.render.sampling import Renderer, render_frames
    from sdanim.config.settings import RenderSettings

    size, frames, batch = cfg["size"], cfg["frames"], cfg["batch"]
    t0 = time.perf_counter()
    model = load_model(weights="random", height=size, width=size, precision=cfg["precision"], jit_compile=cfg["jit"])
    print(f"backend={keras.backend.backend()} size={size} frames={frames} batch={batch} precision={model.precision} "
          f"jit={model.jit_compile} attention={model.attention} build={time.perf_counter() - t0:.1f}s")
    tokens = np.array([[49406] + [49407] * 76], "int32")
    uncond = keras.ops.convert_to_numpy(model.text_encoder([tokens, np.arange(77, dtype="int32")[None]]))[0]
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 77, model.context_dim)).astype("float32")
    contexts = np.stack([slerp(a, b, t) for t in np.linspace(0, 1, frames)])  # (F, 77, D)
    noise = seeded_noise(42, (size // 8, size // 8, 4))
    plan = FramePlan(contexts, np.repeat(noise[None], frames, 0), tuple(range(frames)),
                     np.arange(frames, dtype=float), noise_mode="slerp")

    results = {}
    for scheduler, steps, guidance in RUNS:
        settings = RenderSettings(height=size, width=size, num_steps=steps, guidance_scale=guidance,
                                  scheduler=scheduler, batch_size=batch)
        renderer = Renderer(model.diffusion_model, model.decoder, settings, uncond, jit_compile=model.jit_compile)
        render_frames(renderer, plan, range(batch), batch, progress=False)  # warm-up (tracing)
        start = time.perf_counter()
        render_frames(renderer, plan, range(frames), batch, progress=False)
        per_frame = (time.perf_counter() - start) / frames
        passes = steps * (1 if guidance == 1.0 else 2)
        results[scheduler] = per_frame
        print(f"{scheduler:5s} {steps:2d} steps, guidance {guidance:3.1f} ({passes:2d} UNet passes/frame): "
              f"{per_frame:7.3f} s/frame")

    # The decoder alone, per frame, at the same batch.
    latents = keras.ops.convert_to_tensor(np.repeat(noise[None], batch, 0))
    renderer.decode(latents)  # warm
    start = time.perf_counter()
    repeats = max(1, frames // batch)
    for _ in range(repeats):
        renderer.decode(latents)
    decode = (time.perf_counter() - start) / (repeats * batch)
    for name in ("lcm", "tcd"):
        print(f"speed-up {name} vs ddim 25 steps: {results['ddim'] / results[name]:.2f}x")
    print(f"decoder: {decode:.3f} s/frame = {100 * decode / results['lcm']:.0f}% of an lcm frame, "
          f"{100 * decode / results['ddim']:.1f}% of a ddim frame")
    return results


if __name__ == "__main__":
    main()
