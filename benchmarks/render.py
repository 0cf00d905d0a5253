"""Renderer benchmark: KerasCV's own loop, sdanim's and diffusers', same walk, one process.

    python benchmarks/render.py                 # CPU preset: 128x128, 8 frames, batch 4, 10 steps
    python benchmarks/render.py --preset gpu    # 512x512, 25 steps, batch 1 and 8
    python benchmarks/render.py --diffusers     # also diffusers' StableDiffusionPipeline
    python benchmarks/render.py --both-loops    # sdanim's one compiled program vs its step loop
    python benchmarks/render.py --plain-layers  # also sdanim on KerasCV's own layers, every step
    python benchmarks/render.py --notebook-kernels  # TensorFlow's kernels as in a notebook, not a CLI run

diffusers (with --diffusers; torch, diffusers and transformers are test extras) renders
the same walk the way a diffusers user would: `StableDiffusionPipeline` with the walk's
embeddings as `prompt_embeds`, the unconditional ones as `negative_prompt_embeds` and the
fixed noise as `latents`, in the same batches, DDIM at the same steps and guidance, on an
SD 1.5-configuration UNet and VAE with random weights (tests/sd_reference.py). On CPU it
runs float32 and, with --diffusers-bf16, under torch's CPU bfloat16 autocast; on CUDA
float16 with PyTorch's scaled-dot-product attention (diffusers' default).

Both loops get the same random weights (the exact SD 1.4 architecture), the same text
embeddings (a slerp between two random "prompt" embeddings) and the same noise. KerasCV
is called exactly as the keras.io latent-walk example calls it:
`generate_image(encodings[batch], batch_size=B, num_steps=N, diffusion_noise=noise)`.
Each loop renders one warm-up batch first (tracing/compiling), then the timed frames.
Prints seconds per frame, the ratio, the largest pixel difference and peak memory.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

def triton_first() -> None:
    """Loads triton (if installed) before TensorFlow: torch's CUDA wheels bring it, and its
    native library segfaults when it loads after TensorFlow's. Call before anything
    imports Keras in a benchmark that also runs torch."""
    try:
        import triton  # noqa: F401
    except ImportError:
        pass


PRESETS = {
    "cpu": dict(size=128, frames=8, batch_sizes=[4], steps=10, precision="float32", jit=False),
    "gpu": dict(size=512, frames=16, batch_sizes=[1, 8], steps=25, precision="mixed_float16", jit=True),
}


class PeakRSS:
    """Samples this process's RSS every 20 ms; `peak` is the largest seen since reset."""

    def __init__(self):
        import psutil

        self._proc = psutil.Process()
        self.peak = 0
        self.start = self._proc.memory_info().rss
        self._stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.02)

    def reset(self):
        self.peak = self.start = self._proc.memory_info().rss


def device_peak_bytes():
    try:
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use")
    except Exception:  # noqa: BLE001 - only a report
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--size", type=int)
    ap.add_argument("--frames", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--precision")
    ap.add_argument("--attention", default="auto", choices=("auto", "fused", "keras-cv"))
    ap.add_argument("--keras-cv-defaults", action="store_true",
                    help="also time KerasCV's loop with its default jit_compile=True")
    ap.add_argument("--skip-keras-cv", action="store_true")
    ap.add_argument("--both-loops", action="store_true",
                    help="also time sdanim's one compiled program against its step-at-a-time loop")
    ap.add_argument("--plain-layers", action="store_true",
                    help="also time sdanim on KerasCV's own layers (no CPU layer forms, the context "
                         "projected at every step), interleaved with its own")
    ap.add_argument("--diffusers", action="store_true", help="also time diffusers' StableDiffusionPipeline")
    ap.add_argument("--diffusers-bf16", action="store_true", help="CPU: also diffusers under bfloat16 autocast")
    ap.add_argument("--notebook-kernels", action="store_true",
                    help="TensorFlow's kernels as in a notebook (oneDNN does not keep the weights it converted, "
                         "sdanim.model.device.keep_weights_in_kernels) instead of as in a command-line run")
    ap.add_argument("--repeat", type=int, default=1,
                    help="with --diffusers: run sdanim and diffusers alternately this many times each "
                         "and compare the best of each (this machine's speed drifts)")
    args = ap.parse_args(argv)
    cfg = dict(PRESETS[args.preset])
    for key in ("size", "frames", "steps", "batch_sizes", "precision"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)

    if args.diffusers:
        triton_first()
    from sdanim.model.device import choose_onednn, keep_weights_in_kernels

    if not args.notebook_kernels:
        keep_weights_in_kernels()  # as a command-line run does
    choose_onednn(cfg["precision"])  # TensorFlow's oneDNN kernels as a CLI run at this precision gets them
    import kcv_shim

    shimmed = kcv_shim.install()
    import keras

    keras.config.disable_interactive_logging()  # KerasCV's per-step progress bar

    from sdanim.core.interpolation import slerp
    from sdanim.model import context_cache
    from sdanim.model.device import detect_device, onednn_enabled, weights_kept
    from sdanim.model.layers import attach_context_cache, use_fast_layers, use_fused_attention
    from sdanim.model.loading import load_model
    from sdanim.model.reference import keras_cv_pipeline
    from sdanim.core.noise import seeded_noise
    from sdanim.core.plan import FramePlan
    from sdanim.render.sampling import Renderer, default_loop, render_frames
    from sdanim.config.settings import RenderSettings

    mem = PeakRSS()
    size, steps, frames = cfg["size"], cfg["steps"], cfg["frames"]
    t0 = time.perf_counter()
    model = load_model(weights="random", height=size, width=size, precision=cfg["precision"],
                       jit_compile=cfg["jit"], attention="keras-cv")
    build_s = time.perf_counter() - t0
    # load_model gives TensorFlow-on-CPU models GroupNormalization and padded convolutions
    # in their faster form, and every UNet a context model (the projections once per batch).
    fast_layers = keras.backend.backend() == "tensorflow" and detect_device() == "cpu"

    def sdanim_layers(on: bool):
        """on: as load_model left the model; off: KerasCV's own layers, projecting the
        context at every step (what KerasCV's loop runs)."""
        if fast_layers:
            use_fast_layers(model.diffusion_model, on)
            use_fast_layers(model.decoder, on)
        if on:
            attach_context_cache(model.diffusion_model)
        else:
            context_cache.detach(model.diffusion_model)
    print(f"backend={keras.backend.backend()} shim={shimmed} size={size} steps={steps} frames={frames} "
          f"precision={model.precision} jit={model.jit_compile} build={build_s:.1f}s "
          f"onednn={onednn_enabled()} weights_kept={weights_kept()}")

    # Same inputs for both loops: unconditional context from KerasCV's tokens, two
    # random "prompt" embeddings slerped, one fixed noise.
    uncond_tokens = np.array([[49406] + [49407] * 76], "int32")
    positions = np.arange(77, dtype="int32")[None]
    uncond = keras.ops.convert_to_numpy(model.text_encoder([uncond_tokens, positions])).astype("float32")[0]
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 77, model.context_dim)).astype("float32")
    encodings = np.stack([slerp(a, b, t) for t in np.linspace(0, 1, frames)])  # (F, 77, D)
    noise = seeded_noise(42, (size // 8, size // 8, 4))
    settings_for = lambda bs: RenderSettings(height=size, width=size, num_steps=steps, guidance_scale=7.5, batch_size=bs)  # noqa: E731
    plan = FramePlan(encodings, np.repeat(noise[None], frames, 0), tuple(range(frames)), np.arange(frames, dtype=float), noise_mode="slerp")

    def time_keras_cv(pipeline, bs):
        batches = [encodings[i : i + bs] for i in range(0, frames, bs)]
        pipeline.generate_image(batches[0], batch_size=bs, num_steps=steps, diffusion_noise=noise)  # warm-up
        mem.reset()
        start = time.perf_counter()
        out = []
        for batch in batches:
            out.extend(np.asarray(pipeline.generate_image(batch, batch_size=bs, num_steps=steps, diffusion_noise=noise)))
        return (time.perf_counter() - start) / frames, np.stack(out), mem.peak

    def time_sdanim(bs, loop="auto"):
        renderer = Renderer(model.diffusion_model, model.decoder, settings_for(bs), uncond,
                            jit_compile=model.jit_compile, loop=loop)
        render_frames(renderer, plan, range(bs), bs, progress=False)  # warm-up
        mem.reset()
        start = time.perf_counter()
        out = render_frames(renderer, plan, range(frames), bs, progress=False)
        return (time.perf_counter() - start) / frames, np.stack([out[i] for i in range(frames)]), mem.peak

    def time_diffusers(bs, bf16=False):
        return diffusers_walk(encodings, uncond, noise, steps, bs, bf16=bf16)

    gib = 1024**3
    rows = []
    for bs in cfg["batch_sizes"]:
        print(f"\n== batch {bs} ==")
        ours_s, ours_img, ours_mem = time_sdanim(bs)
        print(f"sdanim (keras-cv attention)  {ours_s:7.3f} s/frame  peak RSS {ours_mem / gib:5.2f} GiB  "
              f"device peak {device_peak_bytes()}  loop={default_loop(model.jit_compile)}")
        def interleaved(label, kinds, run):
            """run(kind) -> (s/frame, images, peak) for kinds a, b, a, b (this machine's
            speed drifts); prints each and b's time over a's, best of two each."""
            times, images = {k: [] for k in kinds}, {}
            for kind in kinds * 2:
                kind_s, images[kind], kind_mem = run(kind)
                times[kind].append(kind_s)
                print(f"  {label}={kind:8s}             {kind_s:7.3f} s/frame  peak RSS {kind_mem / gib:5.2f} GiB")
            a, b = kinds
            diff = np.abs(images[a].astype(int) - images[b].astype(int)).max()
            return min(times[b]) / min(times[a]), diff

        if args.both_loops:
            ratio, diff = interleaved("loop", ("program", "steps"), lambda loop: time_sdanim(bs, loop=loop))
            print(f"  one program vs step loop: {ratio:.2f}x (best of two each), max diff {diff} levels")
        if args.plain_layers:
            def with_layers(kind):
                sdanim_layers(kind == "sdanim")
                return time_sdanim(bs)

            ratio, diff = interleaved("layers", ("sdanim", "plain"), with_layers)
            sdanim_layers(True)
            print(f"  sdanim's layers vs KerasCV's: {ratio:.2f}x (best of two each), max diff {diff} levels")
        fused_s = None
        if args.attention in ("auto", "fused"):
            use_fused_attention(model.diffusion_model)
            use_fused_attention(model.decoder)
            fused_s, fused_img, fused_mem = time_sdanim(bs)
            use_fused_attention(model.diffusion_model, enabled=False)
            use_fused_attention(model.decoder, enabled=False)
            print(f"sdanim (fused attention)     {fused_s:7.3f} s/frame  peak RSS {fused_mem / gib:5.2f} GiB  "
                  f"max diff vs keras-cv attention {np.abs(fused_img.astype(int) - ours_img.astype(int)).max()} levels")
        if args.diffusers:
            ours_runs, diff_runs = [ours_s], []
            for r in range(max(1, args.repeat)):
                if r:
                    ours_runs.append(time_sdanim(bs)[0])
                    print(f"sdanim (again)               {ours_runs[-1]:7.3f} s/frame")
                diff_s = time_diffusers(bs)
                diff_runs.append(diff_s[0])
                print(f"diffusers ({diff_s[1]:9s})        {diff_s[0]:7.3f} s/frame")
            print(f"race, best of {len(diff_runs)} each: sdanim {min(ours_runs):.3f}, diffusers "
                  f"{min(diff_runs):.3f} s/frame: sdanim is {min(diff_runs) / min(ours_runs):.2f}x faster"
                  + (f" ({min(diff_runs) / fused_s:.2f}x with fused attention)" if fused_s else ""))
            if args.diffusers_bf16:
                bf_s = time_diffusers(bs, bf16=True)
                print(f"diffusers ({bf_s[1]:9s})        {bf_s[0]:7.3f} s/frame")
        if args.skip_keras_cv:
            continue
        kcv_jit = cfg["jit"]  # CPU: KerasCV's fastest setting (no XLA); GPU: its default (XLA)
        sdanim_layers(False)  # KerasCV's loop on KerasCV's own layers
        kcv_s, kcv_img, kcv_mem = time_keras_cv(keras_cv_pipeline(model, jit_compile=kcv_jit), bs)
        sdanim_layers(True)
        diff = np.abs(kcv_img.astype(int) - ours_img.astype(int)).max()
        print(f"KerasCV loop (jit={kcv_jit!s:5})    {kcv_s:7.3f} s/frame  peak RSS {kcv_mem / gib:5.2f} GiB  device peak {device_peak_bytes()}")
        best = min(s for s in (ours_s, fused_s) if s is not None)
        print(f"speed-up vs KerasCV loop: {kcv_s / best:.2f}x   max pixel diff sdanim vs KerasCV: {diff} levels")
        rows.append((bs, kcv_s, ours_s, fused_s))
        if args.keras_cv_defaults and not kcv_jit:
            sdanim_layers(False)
            dflt_s, _, dflt_mem = time_keras_cv(keras_cv_pipeline(model, jit_compile=True), bs)
            sdanim_layers(True)
            print(f"KerasCV loop (defaults, jit) {dflt_s:7.3f} s/frame  peak RSS {dflt_mem / gib:5.2f} GiB")
            print(f"speed-up vs KerasCV defaults: {dflt_s / best:.2f}x")
    return rows


def diffusers_walk(encodings, uncond, noise, steps, bs, bf16=False):
    """Seconds per frame of diffusers' StableDiffusionPipeline on the same walk, and a
    label of how it ran. One warm-up batch first, as for the other loops."""
    import contextlib

    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    import sd_reference

    cuda = torch.cuda.is_available()
    parts = sd_reference.build("1.4", parts=("unet", "vae"), seed=0)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=parts["vae"], text_encoder=None, tokenizer=None, unet=parts["unet"],
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    dtype = torch.float16 if cuda else torch.float32
    device = "cuda" if cuda else "cpu"
    pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    label = "cuda fp16" if cuda else ("cpu bf16" if bf16 else "cpu fp32")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if (bf16 and not cuda) else contextlib.nullcontext()
    frames = len(encodings)
    latent = torch.from_numpy(noise).permute(2, 0, 1)[None]  # (h, w, 4) -> (1, 4, h, w)
    neg = torch.from_numpy(np.repeat(uncond[None], bs, 0)).to(device, dtype)

    def run(batch):
        n = len(batch)
        with torch.no_grad(), autocast:
            pipe(prompt_embeds=torch.from_numpy(batch).to(device, dtype), negative_prompt_embeds=neg[:n],
                 latents=latent.repeat(n, 1, 1, 1).to(device, dtype), num_inference_steps=steps,
                 guidance_scale=7.5, output_type="np")

    batches = [encodings[i : i + bs] for i in range(0, frames, bs)]
    run(batches[0])  # warm-up
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        run(batch)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / frames
    del pipe, parts
    return seconds, label


if __name__ == "__main__":
    main()
