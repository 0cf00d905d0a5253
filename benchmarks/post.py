"""After the frames: RIFE in-betweens and Real-ESRGAN upscaling, against rendered frames.

    python benchmarks/post.py                      # 512x512 frames on this machine
    python benchmarks/post.py --skip-render        # only the in-betweens and upscalers
    python benchmarks/post.py --size 256 --upscale-size 256

Random weights of the real architectures (written as upstream files with torch: ccvfi's
IFNet for RIFE v4.26 heavy, Real-ESRGAN's RRDBNet x4plus and SRVGGNetCompact
general-x4v3), loaded through sdanim's own readers. Prints:

- milliseconds per RIFE in-between at --size (batch 4, after a warm-up call);
- seconds per rendered frame at --size with the exact SD 1.4 architecture (random
  weights): lcm 4 steps and ddim 25 steps, batch 1, one warm-up frame first;
- the end-to-end cost of a 48-frame looping video: 48 rendered frames vs 12 rendered +
  x4 in-betweens (36 of them), from the figures above;
- seconds per frame upscaled --upscale-size -> x4 for each architecture, tiled
  (256-pixel tiles, 32 overlap), with the peak RSS; and what a 240-frame 1080p clip costs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def _weights(folder: str) -> dict:
    import torch
    from ccvfi.arch.ifnet_arch import IFNet

    from test_upscale import _compact_state, _rrdb_state

    torch.manual_seed(0)
    rife = os.path.join(folder, "flownet.pkl")
    torch.save({f"module.{k}": v for k, v in IFNet().state_dict().items()}, rife)
    rrdb = os.path.join(folder, "RealESRGAN_x4plus.pth")
    torch.save({"params_ema": _rrdb_state(num_block=23, num_feat=64, ups=2)}, rrdb)
    compact = os.path.join(folder, "realesr-general-x4v3.pth")
    torch.save({"params": _compact_state(num_feat=64, num_conv=32, scale=4)}, compact)
    return {"rife": rife, "rrdb": rrdb, "compact": compact}


def _best(fn, repeat: int = 2, warm=None) -> float:
    (warm or fn)()  # warm-up: builds and traces
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="frame size for RIFE and the rendered frames")
    ap.add_argument("--upscale-size", type=int, default=512, help="input size of the upscalers (x4 out)")
    ap.add_argument("--skip-render", action="store_true")
    ap.add_argument("--skip-upscale", action="store_true")
    args = ap.parse_args(argv)
    from render import PeakRSS, triton_first

    triton_first()  # torch writes the weights

    from sdanim.model.device import hardware_report
    from sdanim.model.esrgan import Upscaler, check_upscaler
    from sdanim.model.rife import Interpolator, check_rife

    print(f"machine: {hardware_report()}")
    size = args.size
    folder = tempfile.mkdtemp(prefix="sdanim-bench-")
    files = _weights(folder)
    rng = np.random.default_rng(0)
    frames0 = rng.integers(0, 255, (4, size, size, 3), dtype=np.uint8)
    frames1 = np.roll(frames0, 5, axis=2)
    interpolator = Interpolator(check_rife(files["rife"]))
    rife_s = _best(lambda: interpolator.between(frames0, frames1, [0.25, 0.5, 0.75, 0.5])) / 4
    print(f"RIFE v4.26 heavy in-between at {size}x{size}: {1000 * rife_s:.0f} ms (batch 4)")

    if not args.skip_render:
        from sdanim.config.settings import RenderSettings
        from sdanim.core.noise import seeded_noise
        from sdanim.model.loading import load_model
        from sdanim.render.jobs import make_renderer

        model = load_model(weights="random", height=size, width=size, precision="auto")
        context = rng.standard_normal((1, 77, 768)).astype(np.float32)
        per_frame = {}
        for scheduler, steps in (("lcm", 4), ("ddim", 25)):
            settings = RenderSettings(height=size, width=size, num_steps=steps, scheduler=scheduler, batch_size=1)
            renderer = make_renderer(model, settings, None)
            # A 1-step renderer of the same sampler traces the same compiled UNet call.
            short = make_renderer(model, RenderSettings(height=size, width=size, num_steps=1, scheduler=scheduler,
                                                        batch_size=1), None)
            noise = seeded_noise(1, settings.latent_shape)[None]
            per_frame[scheduler] = _best(lambda: renderer.render(context, noise, [1]), repeat=1,
                                         warm=lambda: short.render(context, noise, [1]))
            print(f"rendered frame, {scheduler} {steps} steps, {size}x{size}, batch 1 ({model.precision}): "
                  f"{per_frame[scheduler]:.1f} s; an in-between is {per_frame[scheduler] / rife_s:.0f}x cheaper")
        for scheduler, seconds in per_frame.items():
            full = 48 * seconds
            # 12 rendered frames of a loop with x4 in-betweens: 48 video frames, 36 of them in-betweens.
            mixed = 12 * seconds + 36 * rife_s
            print(f"48-frame video, {scheduler}: 48 rendered {full:.0f} s vs 12 rendered + x4 RIFE {mixed:.0f} s "
                  f"({full / mixed:.1f}x)")
        del model

    if not args.skip_upscale:
        rss = PeakRSS()
        image = rng.integers(0, 255, (1, args.upscale_size, args.upscale_size, 3), dtype=np.uint8)
        for name in ("compact", "rrdb"):
            upscaler = Upscaler(check_upscaler(files[name]), tile=256, overlap=32)
            rss.reset()
            seconds = _best(lambda: upscaler.upscale(image), repeat=1)
            out = args.upscale_size * upscaler.scale
            clip = 240 * seconds * (1920 * 1080) / (out * out)  # 1080p: the same pixels per second
            print(f"{upscaler.file.arch.describe()}: {args.upscale_size} -> {out} in {seconds:.1f} s, "
                  f"peak RSS {rss.peak / 2**30:.1f} GB; a 240-frame 1080p clip: about {clip / 60:.0f} min")


if __name__ == "__main__":
    main()
