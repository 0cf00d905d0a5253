"""Command line: `python -m sdanim morph|walk|circle|generate|mix|img2img|inpaint|outpaint|image-morph|grid|steps|convert`.

Bad input prints one line, `sdanim: error: ...`, and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Optional, Sequence

from sdanim.errors import SdanimError

EPILOG = """\
Real images need Stable Diffusion weights: with --weights keras-cv (the default) KerasCV
downloads them once (about 4 GB) into ~/.keras/datasets. Offline, pass a folder that
holds the .h5 files (--weights DIR) or try the pipeline with --weights random. Any SD
1.x/2.x checkpoint works too: --weights model.safetensors, model.ckpt or a diffusers
folder (sdanim convert writes it as .h5 files once, for faster loads).
"""


class _UsageError(Exception):
    """argparse's complaint, raised instead of printing usage and exiting."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, like the rest of the CLI's.

    argparse prints the whole usage block before its message; here `main` prints
    `sdanim: error: <what> (see 'python -m sdanim morph --help')` and returns 2.
    Subcommand parsers inherit the class (argparse builds them with type(parent)).
    """

    def error(self, message):  # noqa: D102 - argparse's hook
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def _int_list(text: str):
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_render_args(p: argparse.ArgumentParser, batch_default: int, size_default: Optional[str] = "512x512") -> None:
    from sdanim.settings import SCHEDULERS

    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: 25; 4 for lcm and tcd)")
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale; 1 = one UNet pass per step (default: 7.5; 1 for lcm and tcd)")
    g.add_argument("--scheduler", default="ddim", choices=SCHEDULERS,
                   help="sampler (default: ddim, as KerasCV); lcm and tcd are for step-distilled weights "
                   "(LCM-LoRA, TCD-LoRA)")
    g.add_argument("--negative", default=None, metavar="PROMPT", help="negative prompt")
    if size_default is None:
        g.add_argument("--size", default=None, metavar="WxH",
                       help="image size, multiples of 64 (default: the input image's, rounded down to multiples of 64)")
    else:
        g.add_argument("--size", default=size_default, metavar="WxH", help=f"image size, multiples of 64 (default: {size_default})")
    g.add_argument("--batch-size", type=int, default=batch_default, help=f"images per model call (default: {batch_default})")
    _add_model_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from sdanim.models import ATTENTIONS, PRECISIONS, VERSIONS

    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, choices=VERSIONS,
                   help="KerasCV architecture: 1.4 (SD 1.x) or 2.1 (SD 2.x) (default: what --weights holds, else 1.4)")
    m.add_argument("--weights", default="keras-cv", metavar="keras-cv|random|DIR|CHECKPOINT",
                   help="weight source: KerasCV's download/cache, seeded random weights, a folder of .h5 files, "
                   "or an SD 1.x/2.x checkpoint (.safetensors, .ckpt, diffusers folder)")
    m.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="merge a LoRA file (kohya/AUTOMATIC1111 or diffusers/PEFT .safetensors) into the weights, "
                   "scaled by SCALE (default 1); repeat to stack several")
    m.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="dtype policy (default: auto = mixed_float16 on CUDA, mixed_bfloat16 on CPUs with "
                   "native bfloat16 (AVX512_BF16/AMX) under TensorFlow, float32 elsewhere)")
    m.add_argument("--jit", default="auto", choices=("auto", "on", "off"),
                   help="XLA-compile the sampling step (default: auto = on for CUDA only)")
    m.add_argument("--attention", default="auto", choices=ATTENTIONS,
                   help="fused: keras.ops.dot_product_attention (flash kernels where available); "
                   "keras-cv: KerasCV's own (default: auto = fused on CUDA only)")


WALK_EXAMPLE = """\
  loop: true
  keyframes:
    - {prompt: a red barn at dawn, seed: 1, frames: 24, easing: ease-in-out}
    - {prompt: {a rabbit: 0.5, a frog: 0.5}, seed: 2, frames: 24}
    - {prompt: a snowy forest, seed: 3, frames: 24}
"""


def _add_timing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spacing", default="linear", choices=("linear", "uniform"),
                   help="uniform: preview the frames, then re-place them so consecutive frames are "
                   "equally far apart (default: linear)")
    p.add_argument("--preview-steps", type=int, default=None, help="steps of the uniform-spacing preview (default: steps/4, at least 2)")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ping-pong", action="store_true", help="play forward, then back")
    p.add_argument("--double", action="store_true", help="double the frames in the video by blending neighbours (plays at 2x fps)")
    p.add_argument("--quality", type=float, default=8.0, help="MP4/WebM quality 0-10 (default: 8)")
    p.add_argument("--audio", default=None, metavar="WAV", help="WAV whose loudness drives the walk's speed; muxed into MP4/WebM")
    p.add_argument("--audio-mode", default="loudness", choices=("loudness", "onsets"), help="what in the audio sets the speed (default: loudness)")
    p.add_argument("--sheet", action="store_true", help="also write a contact sheet of all frames")
    p.add_argument("--overwrite", action="store_true", help="replace frames of a different run in the frames folder")


def _add_workers_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several devices (Ray; pip install \"sdanim[ray]\")")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="render on N Ray workers, one model each (default: this process, no Ray)")
    g.add_argument("--ray-address", default=None, metavar="auto|ray://HOST:PORT",
                   help="join an existing Ray cluster (default: start one on this machine)")
    g.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs each worker holds (default: 1 if the cluster has GPUs, else 0)")
    g.add_argument("--max-attempts", type=int, default=3,
                   help="tries per frame before it is reported as failed (default: 3)")


def build_parser() -> argparse.ArgumentParser:
    from sdanim.interpolation import EASINGS

    parser = _Parser(
        prog="python -m sdanim",
        description="Stable Diffusion latent-walk animations (KerasCV).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser(
        "morph", help="animate from one prompt to the next (GIF or MP4)",
        description="Render a prompt-to-prompt morph: interpolate the prompts' text embeddings "
        "over fixed seeded noise and export a GIF or MP4. PNG frames go to <out>_frames/.",
        epilog='example:\n  python -m sdanim morph "a ford truck on a dirt road" "an electric car in a city" \\\n'
        "      --frames 24 --fps 12 --seed 42 --out outputs/morph.gif\n\n" + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument("prompts", nargs="+", metavar="PROMPT", help="two or more prompts, in order")
    m.add_argument("--frames", type=int, default=24, help="total frames, keyframes included (default: 24)")
    m.add_argument("--fps", type=float, default=12, help="frames per second (default: 12)")
    m.add_argument("--seed", type=int, default=42, help="noise seed (default: 42)")
    m.add_argument("--out", default="outputs/morph.gif", help="output .gif, .mp4 or .webm (default: outputs/morph.gif)")
    m.add_argument("--interpolation", default="slerp", choices=("slerp", "linear"), help="embedding interpolation (default: slerp)")
    m.add_argument("--noise", default="fixed", choices=("fixed", "slerp"),
                   help="fixed: one noise for every frame; slerp: between per-prompt seeds (default: fixed)")
    m.add_argument("--seeds", type=_int_list, default=None, metavar="S1,S2,...", help="per-prompt seeds for --noise slerp")
    m.add_argument("--easing", default="linear", choices=tuple(EASINGS), help="easing of each transition (default: linear)")
    _add_timing_args(m)
    _add_output_args(m)
    _add_render_args(m, batch_default=4)
    _add_workers_args(m)

    w = sub.add_parser(
        "walk", help="animate through the keyframes of a YAML/JSON walk file",
        description="Render a keyframe walk: each keyframe a prompt (or a weighted mix), a seed, "
        "the frames to the next and an easing; optionally looping back to the first.",
        epilog="walk file:\n" + WALK_EXAMPLE + "\n" + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    w.add_argument("file", help="walk file (.yaml, .yml or .json)")
    _add_timing_args(w)
    w.add_argument("--fps", type=float, default=12, help="frames per second (default: 12)")
    w.add_argument("--out", default="outputs/walk.gif", help="output .gif, .mp4 or .webm (default: outputs/walk.gif)")
    _add_output_args(w)
    _add_render_args(w, batch_default=4)
    _add_workers_args(w)

    c = sub.add_parser(
        "circle", help="a seamless loop in noise space around one prompt",
        description="Walk a circle in noise space, cos(t) n1 + sin(t) n2 from seeds SEED and SEED+1, "
        "around one prompt: the last frame leads back into the first.",
        epilog='example:\n  python -m sdanim circle "a lighthouse in a storm" --frames 48 --fps 24\n\n' + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("prompt", help="what to draw")
    c.add_argument("--frames", type=int, default=24, help="frames in one loop (default: 24)")
    c.add_argument("--seed", type=int, default=42, help="first basis seed (default: 42)")
    c.add_argument("--fps", type=float, default=12, help="frames per second (default: 12)")
    c.add_argument("--out", default="outputs/circle.gif", help="output .gif, .mp4 or .webm (default: outputs/circle.gif)")
    _add_output_args(c)
    _add_render_args(c, batch_default=4)
    _add_workers_args(c)

    g = sub.add_parser(
        "generate", help="text to image: a batch of seeded images",
        description="Generate images from one prompt; image k uses seed + k. Saved as PNG.",
        epilog='example:\n  python -m sdanim generate "a ford truck on a dirt road" --num-images 3 --seed 4\n\n' + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g.add_argument("prompt", help=f"what to draw; {MIX_HELP}")
    _add_images_args(g, 3)
    _add_render_args(g, batch_default=3)

    mx = sub.add_parser(
        "mix", help="blend prompts by weight: text-to-image of a weighted mix",
        description="Blend several prompts' text embeddings with weights (normalised to sum 1) and "
        "generate images of the blend. The same mix works anywhere a prompt does as 'a rabbit:0.5 | a frog:0.5'.",
        epilog='example:\n  python -m sdanim mix "a rabbit" 0.5 "a frog" 0.5 --num-images 2 --seed 4\n\n' + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mx.add_argument("pairs", nargs="+", metavar="PROMPT WEIGHT", help="prompts each followed by its weight")
    _add_images_args(mx, 1)
    _add_render_args(mx, batch_default=3)

    i2i = sub.add_parser(
        "img2img", help="image to image: redraw an image with a prompt",
        description="Encode an image, noise it to --strength and redraw it with the prompt.",
        epilog='example:\n  python -m sdanim img2img rabbit.png "a wooden carving of a rabbit" --strength 0.6 --seed 1\n\n' + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    i2i.add_argument("image", help="input image (PNG, JPEG, ...)")
    i2i.add_argument("prompt", help=f"what to turn it into; {MIX_HELP}")
    i2i.add_argument("--strength", type=float, default=0.6, help="0 keeps the image, 1 ignores it (default: 0.6)")
    _add_fit_arg(i2i)
    _add_images_args(i2i, 1)
    _add_render_args(i2i, batch_default=1, size_default=None)

    ip = sub.add_parser(
        "inpaint", help="repaint the white part of a mask",
        description="Repaint the region of the image that is white in the mask; every pixel outside "
        "the mask comes back unchanged.",
        epilog='example:\n  python -m sdanim inpaint room.png mask.png "a red armchair" --seed 3\n\n' + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ip.add_argument("image", help="input image")
    ip.add_argument("mask", help="mask image of the same size: white = repaint, black = keep")
    ip.add_argument("prompt", help=f"what to paint there; {MIX_HELP}")
    ip.add_argument("--strength", type=float, default=1.0, help="1 paints from pure noise; lower keeps some of what was there (default: 1)")
    ip.add_argument("--feather", type=float, default=4.0, help="pixels over which the repaint blends in, inside the mask's edge (default: 4)")
    _add_fit_arg(ip)
    _add_images_args(ip, 1)
    _add_render_args(ip, batch_default=1, size_default=None)

    op = sub.add_parser(
        "outpaint", help="extend an image beyond its borders",
        description="Extend the image by the given pixels on each side and paint the new borders. "
        "The extended size must be multiples of 64 (the image is not resized).",
        epilog='example:\n  python -m sdanim outpaint beach.png "a beach at sunset" --left 128 --right 128 --seed 2\n\n' + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    op.add_argument("image", help="input image")
    op.add_argument("prompt", help=f"what the whole extended picture shows; {MIX_HELP}")
    for side in ("left", "right", "top", "bottom"):
        op.add_argument(f"--{side}", type=int, default=0, help=f"pixels to add on the {side} (default: 0)")
    op.add_argument("--feather", type=float, default=4.0, help="blend width in pixels (default: 4)")
    _add_images_args(op, 1)
    _add_render_args(op, batch_default=1, size_default=None)

    imx = sub.add_parser(
        "image-morph", help="morph between two of your own images",
        description="Encode two images, interpolate their latents and redraw every frame at --strength "
        "with the prompt over one fixed noise; export a GIF or MP4.",
        epilog='example:\n  python -m sdanim image-morph cat.png dog.png --prompt "a photo" --frames 16 --strength 0.5\n\n' + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    imx.add_argument("image_a", help="first image")
    imx.add_argument("image_b", help="last image")
    imx.add_argument("--prompt", default="", help=f"prompt guiding the redraw (default: none); {MIX_HELP}")
    imx.add_argument("--strength", type=float, default=0.5, help="how much each frame is redrawn, (0, 1] (default: 0.5)")
    imx.add_argument("--frames", type=int, default=24, help="frames, both ends included (default: 24)")
    imx.add_argument("--fps", type=float, default=12, help="frames per second (default: 12)")
    imx.add_argument("--seed", type=int, default=42, help="noise seed (default: 42)")
    imx.add_argument("--interpolation", default="slerp", choices=("slerp", "linear"), help="latent interpolation (default: slerp)")
    imx.add_argument("--out", default="outputs/image_morph.gif", help="output .gif, .mp4 or .webm (default: outputs/image_morph.gif)")
    imx.add_argument("--ping-pong", action="store_true", help="play forward, then back")
    _add_fit_arg(imx)
    _add_render_args(imx, batch_default=4, size_default=None)
    _add_workers_args(imx)

    gr = sub.add_parser(
        "grid", help="labelled comparison grid: prompts x seeds x guidance x steps",
        description="One row per prompt, one column per combination of --seeds, --guidances and "
        "--steps-list; same seed = same noise, so a column shows what a keyword does.",
        epilog='example:\n  python -m sdanim grid "a cat" "a fluffy cat" --seeds 1,2 --guidances 5,9\n\n' + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gr.add_argument("prompts", nargs="+", metavar="PROMPT", help=f"one row each; {MIX_HELP}")
    gr.add_argument("--seeds", type=_int_list, default=[42], metavar="S1,S2,...", help="seeds (default: 42)")
    gr.add_argument("--guidances", type=_float_list, default=None, metavar="G1,G2,...", help="guidance scales (default: --guidance)")
    gr.add_argument("--steps-list", type=_int_list, default=None, metavar="N1,N2,...", help="step counts (default: --steps)")
    gr.add_argument("--out", default="outputs/grid.png", help="output PNG (default: outputs/grid.png)")
    _add_render_args(gr, batch_default=4)

    st = sub.add_parser(
        "steps", help="show the image emerging, step by step",
        description="Decode the predicted clean image after chosen denoising steps of one generation: "
        "a labelled strip <out>_strip.png and an animation.",
        epilog='example:\n  python -m sdanim steps "a lighthouse in a storm" --seed 4 --show 1,5,10,25\n\n' + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    st.add_argument("prompt", help=f"what to draw; {MIX_HELP}")
    st.add_argument("--seed", type=int, default=42, help="seed (default: 42)")
    st.add_argument("--show", type=_int_list, default=None, metavar="S1,S2,...", help="1-based steps to show (default: 8 spread evenly)")
    st.add_argument("--fps", type=float, default=4, help="frames per second of the animation (default: 4)")
    st.add_argument("--out", default="outputs/steps.gif", help="output .gif or .mp4 (default: outputs/steps.gif)")
    _add_render_args(st, batch_default=1)

    ui = sub.add_parser(
        "ui", help="the browser app: animate and the image tools (Gradio; pip install \"sdanim[ui]\")",
        description="Start the browser app. The model is loaded on the first render (another only for "
        "another size) and reused; renders queue one at a time. Binds 127.0.0.1 unless --listen or --share.",
        epilog="example:\n  python -m sdanim ui --weights keras-cv --port 7860\n\n" + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ui.add_argument("--port", type=int, default=None, help="port (default: 7860, or the next free one)")
    ui.add_argument("--share", action="store_true", help="also a public gradio.live link (needs the internet)")
    ui.add_argument("--listen", action="store_true", help="bind 0.0.0.0: reachable from other machines")
    ui.add_argument("--auth", default=None, metavar="USER:PASS", help="ask for this user name and password")
    ui.add_argument("--out-dir", default="outputs/ui", help="where renders go (default: outputs/ui)")
    _add_model_args(ui)

    cv = sub.add_parser(
        "convert", help="write a checkpoint as KerasCV .h5 files, for fast --weights DIR loads",
        description="Map an SD 1.x/2.x checkpoint (.safetensors or .ckpt in the original layout, or a "
        "diffusers folder) onto KerasCV's classes and write their weights under KerasCV's file names. "
        ".ckpt pickles are read by a restricted unpickler that only rebuilds tensors.",
        epilog="example:\n  python -m sdanim convert v1-5-pruned-emaonly.safetensors --out weights/sd15\n"
        "  python -m sdanim morph \"a cat\" \"a dog\" --weights weights/sd15\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cv.add_argument("checkpoint", help="a .safetensors/.ckpt file or a diffusers folder")
    cv.add_argument("--out", required=True, help="folder for the .h5 files (created)")
    cv.add_argument("--model", default=None, choices=("1.4", "2.1"), help="expected architecture (default: detected)")
    return parser


MIX_HELP = "'a rabbit:0.5 | a frog:0.5' blends prompts by weight"


def _float_list(text: str):
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_images_args(p: argparse.ArgumentParser, count: int) -> None:
    p.add_argument("--num-images", type=int, default=count, help=f"how many images, image k from seed + k (default: {count})")
    p.add_argument("--seed", type=int, default=None, help="seed of the first image (default: random, printed)")
    p.add_argument("--out", default="outputs", help="output folder (default: outputs)")


def _add_fit_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fit", default="crop", choices=("crop", "resize"),
                   help="how the image meets --size: crop (centre-crop to the aspect ratio, then resize) "
                   "or resize (stretch) (default: crop)")


def _settings(args, image=None):
    from sdanim.images import auto_size
    from sdanim.settings import RenderSettings, parse_size

    if args.size is None:
        height, width = auto_size(image)
    else:
        height, width = parse_size(args.size)
    return RenderSettings(
        height=height, width=width, num_steps=args.steps, guidance_scale=args.guidance,
        scheduler=args.scheduler, batch_size=args.batch_size,
    )


def _spec(args):
    from sdanim.run import ModelSpec

    jit = {"auto": None, "on": True, "off": False}[args.jit]
    return ModelSpec(version=args.model, weights=args.weights, precision=args.precision, jit_compile=jit,
                     attention=args.attention, loras=tuple(args.lora))


def _load(args, settings):
    from sdanim.run import get_model

    return get_model(_spec(args), settings)


def _export(args):
    from sdanim.run import ExportSettings

    return ExportSettings(
        fps=args.fps, ping_pong=getattr(args, "ping_pong", False), double=getattr(args, "double", False),
        quality=getattr(args, "quality", 8.0), sheet=getattr(args, "sheet", False),
        audio=getattr(args, "audio", None), audio_mode=getattr(args, "audio_mode", "loudness"),
    )


def _workers(args):
    """Ray workers from --workers and friends, or None (Ray is then never imported)."""
    if getattr(args, "workers", None) is None:
        for flag in ("ray_address", "gpus_per_worker"):
            if getattr(args, flag, None) is not None:
                raise SdanimError(f"--{flag.replace('_', '-')} needs --workers N. Received: --workers not given")
        return None
    from sdanim.distributed import Workers

    return Workers(count=args.workers, address=args.ray_address, gpus_per_worker=args.gpus_per_worker,
                   max_attempts=args.max_attempts)


def _report(result, fps: float) -> None:
    per_frame = result.seconds / max(result.rendered, 1)
    print(f"wrote {result.out} ({len(result.frames)} frames at {fps:g} fps; "
          f"{result.rendered} rendered, {per_frame:.2f} s/frame)")
    print(f"frames: {result.frames_dir}")
    if result.sheet:
        print(f"contact sheet: {result.sheet}")
    smooth = result.smoothness
    print(f"smoothness: mean step {smooth['mean']:.4f}, 1-Gini {smooth['one_minus_gini']:.3f}, "
          f"variance {smooth['variance']:.2e} (1-Gini = 1: perfectly even steps)")


def _mix_pairs(tokens):
    """["a rabbit", "0.5", "a frog", "0.5"] -> (("a rabbit", 0.5), ("a frog", 0.5))."""
    from sdanim.keyframes import normalize_prompt

    if len(tokens) % 2:
        raise SdanimError(f"mix takes prompts each followed by a weight. Received: {tokens!r}")
    pairs = []
    for text, weight in zip(tokens[::2], tokens[1::2]):
        try:
            pairs.append((text, float(weight)))
        except ValueError:
            raise SdanimError(f"mix weights must be numbers. Received: weight={weight!r} for {text!r}") from None
    return normalize_prompt(pairs, "mix")


def _print_images(result) -> None:
    for seed, path in zip(result.seeds, result.paths):
        print(f"seed {seed}: {path}")


def _run_edit(args, progress: bool) -> int:
    from sdanim import api, edits
    from sdanim.images import extend_canvas, load_image
    from sdanim.keyframes import parse_prompt_text

    prompt = parse_prompt_text(args.prompt) if hasattr(args, "prompt") else None
    image = None
    if args.command in ("img2img", "inpaint", "outpaint"):
        image = load_image(args.image, "image")
    if args.command == "image-morph":
        image = load_image(args.image_a, "image_a")
    if args.command == "outpaint":
        canvas, _ = extend_canvas(image, args.left, args.right, args.top, args.bottom)
        size = f"{canvas.shape[1]}x{canvas.shape[0]}"
        if args.size is not None and args.size != size:
            raise SdanimError(f"outpaint's size is the image's plus the borders, {size}; leave out --size. "
                              f"Received: size={args.size}")
        args.size = size
    settings = _settings(args, image)
    common = dict(settings=settings, negative_prompt=args.negative, progress=progress)
    if args.command in ("img2img", "inpaint", "outpaint"):
        args.seed = api.check_generate_args(prompt, args.num_images, args.seed, args.out)
    if args.command == "img2img":
        from sdanim.schedulers import steps_for_strength

        steps_for_strength(args.strength, settings.num_steps)
        model = _load(args, settings) if args.strength > 0 else None
        result = edits.img2img(image, prompt, strength=args.strength, num_images=args.num_images, seed=args.seed,
                               fit=args.fit, out_dir=args.out, model=model, **common)
    elif args.command == "inpaint":
        from sdanim.images import load_mask

        with warnings.catch_warnings():  # said once, by inpaint itself
            warnings.simplefilter("ignore")
            load_mask(args.mask, image.shape, "mask")  # a bad mask must not cost a model build
        result = edits.inpaint(image, args.mask, prompt, num_images=args.num_images, seed=args.seed,
                               strength=args.strength, feather=args.feather, fit=args.fit, out_dir=args.out,
                               model=_load(args, settings), **common)
    elif args.command == "outpaint":
        result = edits.outpaint(image, prompt, left=args.left, right=args.right, top=args.top, bottom=args.bottom,
                                num_images=args.num_images, seed=args.seed, feather=args.feather, out_dir=args.out,
                                model=_load(args, settings), **common)
    elif args.command == "image-morph":
        image_b = load_image(args.image_b, "image_b")
        export = _export(args)
        edits.check_image_morph_args(prompt, args.out, args.frames, args.seed, args.strength,
                                     args.interpolation, settings, export)
        workers = _workers(args)
        result = edits.image_morph(image, image_b, prompt, out=args.out, frames=args.frames, export=export,
                                   seed=args.seed, strength=args.strength, interpolation=args.interpolation,
                                   fit=args.fit, model=_spec(args) if workers else _load(args, settings),
                                   workers=workers, **common)
        print(f"wrote {result.out} ({len(result.frames)} frames at {args.fps:g} fps)")
        print(f"frames: {result.frames_dir}")
        return 0
    elif args.command == "grid":
        prompts = [parse_prompt_text(p, "prompts") for p in args.prompts]
        edits.check_grid_args(prompts, args.seeds, args.guidances, args.steps_list, settings, args.out)
        result = edits.grid(prompts, seeds=args.seeds, guidance_scales=args.guidances, steps=args.steps_list,
                            out=args.out, model=_load(args, settings), **common)
        print(f"wrote {result.path} ({len(prompts)} rows x {len(result.columns)} columns)")
        return 0
    elif args.command == "steps":
        edits.check_steps_args(prompt, args.seed, args.show, settings, args.out, args.fps)
        result = edits.denoising_steps(prompt, seed=args.seed, show=args.show, out=args.out, fps=args.fps,
                                       model=_load(args, settings), **common)
        print(f"wrote {result.gif} and {result.strip} (steps {', '.join(map(str, result.steps))})")
        return 0
    _print_images(result)
    return 0


def _run_ui(args) -> int:
    import importlib.util

    auth = None
    if args.auth is not None:
        user, sep, password = args.auth.partition(":")
        if not (sep and user and password):
            raise SdanimError(f"auth must be USER:PASS. Received: auth={args.auth!r}")
        auth = (user, password)
    if args.port is not None and not 1 <= args.port <= 65535:
        raise SdanimError(f"port must be from 1 to 65535. Received: port={args.port}")
    if importlib.util.find_spec("gradio") is None:
        raise SdanimError('the app needs Gradio: pip install "sdanim[ui]". Received: command=ui')
    from sdanim import ui

    ui.launch(spec=_spec(args), out_dir=args.out_dir, port=args.port, share=args.share, listen=args.listen,
              auth=auth, inline=False, prevent_thread_lock=False)
    return 0


def _run(args) -> int:
    from sdanim import api

    if args.command == "ui":
        return _run_ui(args)
    if args.command == "convert":
        import time

        from sdanim.models import convert_checkpoint

        start = time.perf_counter()
        written = convert_checkpoint(args.checkpoint, args.out, version=args.model)
        print(f"wrote {', '.join(os.path.basename(p) for p in written.values())} to {args.out} "
              f"in {time.perf_counter() - start:.0f} s; use --weights {args.out}")
        return 0
    progress = not args.quiet
    if args.command in ("img2img", "inpaint", "outpaint", "image-morph", "grid", "steps"):
        return _run_edit(args, progress)
    settings = _settings(args)
    if args.command == "morph":
        from sdanim.keyframes import parse_prompt_text

        args.prompts = [parse_prompt_text(p, "prompts") for p in args.prompts]
        # Cheap checks first: a typo must not cost a model build.
        export = _export(args)
        api.check_morph_args(args.prompts, args.out, args.frames, args.seed, args.interpolation, args.noise,
                             args.seeds, export)
        workers = _workers(args)
        result = api.morph(
            args.prompts, out=args.out, frames=args.frames, seed=args.seed, settings=settings, export=export,
            model=_spec(args) if workers else _load(args, settings), negative_prompt=args.negative,
            interpolation=args.interpolation, noise=args.noise, seeds=args.seeds, easing=args.easing,
            spacing=args.spacing, preview_steps=args.preview_steps, workers=workers,
            overwrite=args.overwrite, progress=progress,
        )
        _report(result, args.fps)
        return 0
    if args.command in ("walk", "circle"):
        from sdanim.keyframes import circle_walk, load_walk

        walk = load_walk(args.file) if args.command == "walk" else circle_walk(args.prompt, args.seed, args.frames)
        export = _export(args)
        export.check_output(args.out)
        workers = _workers(args)
        result = api.animate(
            walk, out=args.out, settings=settings, export=export,
            model=_spec(args) if workers else _load(args, settings), negative_prompt=args.negative,
            spacing=getattr(args, "spacing", "linear"), preview_steps=getattr(args, "preview_steps", None),
            workers=workers, overwrite=args.overwrite, progress=progress,
        )
        _report(result, args.fps)
        return 0
    if args.command in ("generate", "mix"):
        from sdanim.keyframes import parse_prompt_text

        prompt = parse_prompt_text(args.prompt) if args.command == "generate" else _mix_pairs(args.pairs)
        args.seed = api.check_generate_args(prompt, args.num_images, args.seed, args.out)
        model = _load(args, settings)
        result = api.generate(
            prompt, num_images=args.num_images, seed=args.seed, settings=settings,
            negative_prompt=args.negative, out_dir=args.out, model=model, progress=progress,
        )
        _print_images(result)
        return 0
    raise SdanimError(f"unknown command. Received: {args.command!r}")  # pragma: no cover


def quiet_tensorflow() -> None:
    """Hides TensorFlow's C++ start-up lines (absl, oneDNN, cpu_feature_guard) unless
    the user chose a level: it must be set before TensorFlow is imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv: Optional[Sequence[str]] = None) -> int:
    quiet_tensorflow()
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # named against the subcommand's help, not the top level's
            raise _UsageError(f"unrecognized arguments: {' '.join(extra)} (see '{parser.prog} {args.command} --help')")
    except _UsageError as error:
        print(f"sdanim: error: {error}", file=sys.stderr)
        return 2
    warnings.simplefilter("default")
    warnings.formatwarning = lambda message, category, *a, **k: f"sdanim: warning: {message}\n"
    try:
        return _run(args)
    except SdanimError as error:
        from sdanim.distributed import FailedFrames  # does not import Ray

        print(f"sdanim: error: {error}", file=sys.stderr)
        return 1 if isinstance(error, FailedFrames) else 2  # failed frames: the input was fine
    except KeyboardInterrupt:
        print("sdanim: interrupted; frames already rendered are kept in the frames folder "
              "and the same command resumes", file=sys.stderr)
        return 130
