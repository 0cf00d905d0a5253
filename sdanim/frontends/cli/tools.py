"""Commands for files: convert (a checkpoint to KerasCV .h5 files), interpolate (RIFE
in-betweens for frames from anywhere), upscale (Real-ESRGAN for images); and doctor (this
machine, as sdanim sees it)."""

from __future__ import annotations

import os
import time

from sdanim.config.choices import PREPROCESSORS, VERSIONS
from sdanim.config.settings import parse_size
from sdanim.frontends.cli.options import add_command
from sdanim.model.loading import convert_checkpoint
from sdanim.tasks import tools
from sdanim.tasks.doctor import doctor


def run_convert(args) -> int:
    start = time.perf_counter()
    written = convert_checkpoint(args.checkpoint, args.out, version=args.model)
    print(f"wrote {', '.join(os.path.basename(p) for p in written.values())} to {args.out} "
          f"in {time.perf_counter() - start:.0f} s; use --weights {args.out}")
    return 0


def run_interpolate(args) -> int:
    result = tools.interpolate(args.source, times=args.times, out=args.out, fps=args.fps, rife=args.rife, loop=args.loop,
                               batch_size=args.batch_size, progress=not args.quiet, overwrite=args.overwrite)
    print(f"wrote {result.out} ({result.frames} frames from {result.rendered} at {args.fps:g} fps, "
          f"in {result.seconds:.1f} s)")
    return 0


def run_upscale(args) -> int:
    written = tools.upscale(args.images, out_dir=args.out, scale=args.scale, model=args.upscale_model, tile=args.tile,
                            batch_size=args.batch_size, progress=not args.quiet, overwrite=args.overwrite)
    print(f"wrote {len(written)} image(s) to {args.out}")
    return 0


def run_control(args) -> int:
    size = parse_size(args.size) if args.size else None
    written = tools.control_hints(args.source, preprocess=args.preprocess, out_dir=args.out, size=size, fit=args.fit,
                                  seed=args.seed)
    print(f"wrote {len(written)} {args.preprocess} hint(s) to {args.out}")
    return 0


def run_doctor(args) -> int:
    doctor(speed=not args.no_speed, quick=args.quick, verify=not args.no_verify)
    return 0


def register(sub) -> None:
    dr = add_command(
        sub, "doctor", run_doctor, help="what sdanim finds on this machine, and how fast it renders here",
        description="Python, the Keras backend (and how it was chosen), the device, what precision \"auto\" "
        "resolves to and why, oneDNN, the weights cache (every pinned file there checked against its hash), a "
        "measured speed (seconds per guided UNet step at 512x512 with random weights; --quick: 128x128) and "
        "hints where a faster choice exists.",
        example="  python -m sdanim doctor --quick",
        epilog="",
    )
    dr.add_argument("--quick", action="store_true", help="measure at 128x128 (a minute on a CPU) instead of 512x512")
    dr.add_argument("--no-speed", action="store_true", help="report without building a model")
    dr.add_argument("--no-verify", action="store_true", help="do not hash the cached weights files")
    cv = add_command(
        sub, "convert", run_convert, help="write a checkpoint as KerasCV .h5 files, for fast --weights DIR loads",
        description="Map an SD 1.x/2.x checkpoint (.safetensors or .ckpt in the original layout, or a "
        "diffusers folder) onto KerasCV's classes and write their weights under KerasCV's file names. "
        ".ckpt pickles are read by a restricted unpickler that only rebuilds tensors.",
        example="  python -m sdanim convert v1-5-pruned-emaonly.safetensors --out weights/sd15\n"
        "  python -m sdanim morph \"a cat\" \"a dog\" --weights weights/sd15",
        epilog="",
    )
    cv.add_argument("checkpoint", help="a .safetensors/.ckpt file or a diffusers folder")
    cv.add_argument("--out", required=True, help="folder for the .h5 files (created)")
    cv.add_argument("--model", default=None, choices=VERSIONS, help="expected architecture (default: detected)")

    ip = add_command(
        sub, "interpolate", run_interpolate, help="RIFE in-betweens for a folder of frames or a video",
        description="Fill TIMES-1 in-betweens between every pair of neighbouring frames (RIFE v4.22-v4.26) and "
        "write a video at --fps. The frames go to <out>_frames/ (with a manifest naming their source) and each "
        "in-between is written as it is made, so the same command resumes; another source there is refused unless "
        "--overwrite.",
        example="  python -m sdanim interpolate outputs/walk_frames --times 4 --fps 24 --out outputs/smooth.mp4",
        epilog="",
    )
    ip.add_argument("source", help="a folder of frames (sorted by name) or a video file")
    ip.add_argument("--times", type=int, default=2, help="video frames per source frame, >= 2 (default: 2)")
    ip.add_argument("--fps", type=float, default=24, help="the output's frame rate (default: 24)")
    ip.add_argument("--out", default="outputs/interpolated.mp4", help="output .mp4, .webm or .gif (default: outputs/interpolated.mp4)")
    ip.add_argument("--rife", default=None, metavar="FILE", help="RIFE weights (default: the pinned v4.26 heavy)")
    ip.add_argument("--loop", action="store_true", help="also fill between the last frame and the first")
    ip.add_argument("--batch-size", type=int, default=4, help="in-betweens per model call (default: 4)")
    ip.add_argument("--overwrite", action="store_true",
                    help="replace the frames of another source in <out>_frames (default: refused)")
    ip.add_argument("--quiet", action="store_true", help="no progress bar")

    up = add_command(
        sub, "upscale", run_upscale, help="enlarge images 2x or 4x with Real-ESRGAN",
        description="Enlarge images (files or folders of images) with Real-ESRGAN, in tiles so any size fits; "
        "each result is written as PNG under its own name. <out>/manifest.json records what made each one: a rerun "
        "keeps those made the same way and refuses others unless --overwrite.",
        example="  python -m sdanim upscale outputs/gen --scale 4 --out outputs/big",
        epilog="",
    )
    up.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders")
    up.add_argument("--scale", type=int, default=None, choices=(2, 4),
                    help="enlargement (default: the --upscale-model's own, else 4)")
    up.add_argument("--upscale-model", default=None, metavar="NAME|FILE",
                    help="weights: a file, or realesrgan-x4plus, realesrgan-x2plus, realesrgan-x4plus-anime, "
                    "realesr-general-x4v3, realesr-animevideov3 (default: the pinned model for --scale)")
    up.add_argument("--tile", type=int, default=256, help="input pixels per tile side (default: 256)")
    up.add_argument("--out", default="outputs/upscaled", help="output folder (default: outputs/upscaled)")
    up.add_argument("--batch-size", type=int, default=1, help="images of one size per model call (default: 1)")
    up.add_argument("--overwrite", action="store_true",
                    help="replace outputs made from other images or settings (default: refused; the same ones resume)")
    up.add_argument("--quiet", action="store_true", help="no progress bar")
    _register_control(sub)


def _register_control(sub) -> None:
    ct = add_command(
        sub, "control", run_control, help="ControlNet hint images from a photo, a folder or a video, to look at first",
        description="Turn pictures into the hint images a ControlNet follows (no weights needed): canny edges, "
        "lineart (standard), shuffle, tile. One PNG per picture of an image, a folder of images or a video. "
        "Hints that need networks (depth, pose, HED) come from other tools: pass their images with "
        "--control-image and --control-preprocess none.",
        example="  python -m sdanim control photo.jpg --preprocess canny --out outputs/hints\n"
        "  python -m sdanim morph \"a cat\" \"a dog\" --controlnet control_v11p_sd15_canny.pth "
        "--control-image photo.jpg --control-preprocess canny",
        epilog="",
    )
    ct.add_argument("source", help="an image, a folder of images (sorted by name) or a video")
    ct.add_argument("--preprocess", default="canny", choices=[p for p in PREPROCESSORS if p != "inpaint"],
                    help="the hint to make (default: canny)")
    ct.add_argument("--out", default="outputs/hints", help="output folder (default: outputs/hints)")
    ct.add_argument("--size", default=None, metavar="WxH",
                    help="fit each picture to this size first, as a render does (default: the pictures' own size)")
    ct.add_argument("--fit", default="crop", choices=("crop", "resize"), help="how pictures meet --size (default: crop)")
    ct.add_argument("--seed", type=int, default=0, help="the shuffle's seed (default: 0)")
