"""SD3 medium on this CPU: sdanim (KerasHub's pieces, sdanim's loop) beside diffusers'
`StableDiffusion3Pipeline`, the real architecture with random weights, each run in its
own process (peak RSS is the process's), one after another in one run.

    python benchmarks/sd3.py                                  # 128 px, float32 and bfloat16
    python benchmarks/sd3.py --sizes 128,512 --steps 2

Both take the same work: one image, `--steps` flow-matching Euler steps, guidance 7
(a batch of 2 through the transformer per step), then the VAE decode; no T5 (diffusers:
text_encoder_3=None, max_sequence_length=77). Each child builds its model, renders once
to warm up (tracing), then times `--repeat` renders (the best kept). The text encoders are
timed on neither side (sdanim encodes each prompt once per model; diffusers is handed
embeddings). Weights are random on both sides (no download here): speed and memory do not
depend on their values. sdanim's "bfloat16" is Keras's mixed_bfloat16 (bfloat16 compute,
float32 variables); diffusers' is torch_dtype=torch.bfloat16 (bfloat16 weights).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

# diffusers' SD3 medium configs (stabilityai/stable-diffusion-3-medium-diffusers).
TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
           latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
           use_post_quant_conv=False)


def child_sdanim(args) -> dict:
    from render import PeakRSS

    import sdanim

    rss = PeakRSS()
    start = time.perf_counter()
    spec = sdanim.ModelSpec(version="sd3-medium", weights="random",
                            precision="float32" if args.dtype == "float32" else "mixed_bfloat16")
    model = spec.load(args.size, args.size)
    build = time.perf_counter() - start
    settings = sdanim.RenderSettings(height=args.size, width=args.size, scheduler="flow_euler", num_steps=args.steps,
                                     guidance_scale=7.0, batch_size=1)
    best = float("inf")
    for r in range(args.repeat + 1):  # the first traces
        start = time.perf_counter()
        sdanim.generate("a lighthouse at dawn", num_images=1, seed=r, model=model, settings=settings, out_dir=None,
                        progress=False)
        if r:
            best = min(best, time.perf_counter() - start)
    return {"build_s": build, "s_per_image": best, "peak_rss_gib": rss.peak / 2**30}


def child_diffusers(args) -> dict:
    import triton  # noqa: F401  (before TensorFlow's libraries, tests/conftest.py)
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from render import PeakRSS

    rss = PeakRSS()
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    start = time.perf_counter()
    with torch.device("cpu"):
        pipe = StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**TRANSFORMER).to(dtype).eval(),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=AutoencoderKL(**VAE).to(dtype).eval(),
            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
            tokenizer_3=None)
    build = time.perf_counter() - start
    g = torch.Generator().manual_seed(0)
    embeds = dict(prompt_embeds=torch.randn(1, 154, 4096, generator=g, dtype=dtype),
                  pooled_prompt_embeds=torch.randn(1, 2048, generator=g, dtype=dtype),
                  negative_prompt_embeds=torch.randn(1, 154, 4096, generator=g, dtype=dtype),
                  negative_pooled_prompt_embeds=torch.randn(1, 2048, generator=g, dtype=dtype))
    best = float("inf")
    for r in range(args.repeat + 1):
        start = time.perf_counter()
        with torch.no_grad():
            pipe(**embeds, num_inference_steps=args.steps, guidance_scale=7.0, height=args.size, width=args.size,
                 output_type="np", max_sequence_length=77, generator=torch.Generator().manual_seed(r))
        if r:
            best = min(best, time.perf_counter() - start)
    return {"build_s": build, "s_per_image": best, "peak_rss_gib": rss.peak / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="128")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--child", choices=("sdanim", "diffusers"), help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = (child_sdanim if args.child == "sdanim" else child_diffusers)(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    from sdanim.model.device import hardware_report

    print(f"SD3 medium (random weights), {args.steps} flow-matching Euler steps, guidance 7, one image, no T5; "
          f"{json.dumps(hardware_report())}", flush=True)
    for size in [int(s) for s in args.sizes.split(",")]:
        for dtype in args.dtypes.split(","):
            found = {}
            for who in ("sdanim", "diffusers"):
                env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
                argv = [sys.executable, os.path.abspath(__file__), "--child", who, "--size", str(size), "--dtype", dtype,
                        "--steps", str(args.steps), "--repeat", str(args.repeat)]
                proc = subprocess.run(argv, capture_output=True, text=True, env=env)
                line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    print(f"{size} px {dtype} {who}: failed (exit {proc.returncode}): "
                          f"{proc.stderr.strip().splitlines()[-1:]}", flush=True)
                    continue
                r = found[who] = json.loads(line[len("RESULT "):])
                print(f"{size} px {dtype} {who}: {r['s_per_image']:.1f} s/image ({r['s_per_image'] / args.steps:.1f} "
                      f"s/step incl. decode), build {r['build_s']:.0f} s, peak RSS {r['peak_rss_gib']:.1f} GiB",
                      flush=True)
            if len(found) == 2:
                print(f"{size} px {dtype}: diffusers / sdanim time {found['diffusers']['s_per_image'] / found['sdanim']['s_per_image']:.2f}x",
                      flush=True)


if __name__ == "__main__":
    main()
