"""Command line: `python -m sdanim morph ...` and `python -m sdanim generate ...`.

Bad input prints one line, `sdanim: error: ...`, and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Optional, Sequence

from sdanim.errors import SdanimError

EPILOG = """\
Real images need Stable Diffusion weights: with --weights keras-cv (the default) KerasCV
downloads them once (about 4 GB) into ~/.keras/datasets. Offline, pass a folder that
holds the .h5 files (--weights DIR) or try the pipeline with --weights random.
"""


def _int_list(text: str):
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_render_args(p: argparse.ArgumentParser, batch_default: int) -> None:
    from sdanim.models import ATTENTIONS, PRECISIONS, VERSIONS
    from sdanim.settings import SCHEDULERS

    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=int, default=25, help="denoising steps (default: 25)")
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    g.add_argument("--scheduler", default="ddim", choices=SCHEDULERS, help="sampler (default: ddim, as KerasCV)")
    g.add_argument("--negative", default=None, metavar="PROMPT", help="negative prompt")
    g.add_argument("--size", default="512x512", metavar="WxH", help="image size, multiples of 64 (default: 512x512)")
    g.add_argument("--batch-size", type=int, default=batch_default, help=f"images per model call (default: {batch_default})")
    m = p.add_argument_group("model")
    m.add_argument("--model", default="1.4", choices=VERSIONS, help="Stable Diffusion version (default: 1.4)")
    m.add_argument("--weights", default="keras-cv", metavar="keras-cv|random|DIR",
                   help="weight source: KerasCV's download/cache, seeded random weights, or a folder of .h5 files")
    m.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="dtype policy (default: auto = mixed_float16 on CUDA, float32 elsewhere)")
    m.add_argument("--jit", default="auto", choices=("auto", "on", "off"),
                   help="XLA-compile the sampling step (default: auto = on for CUDA only)")
    m.add_argument("--attention", default="auto", choices=ATTENTIONS,
                   help="fused: keras.ops.dot_product_attention (flash kernels where available); "
                   "keras-cv: KerasCV's own (default: auto = fused on CUDA only)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


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


def build_parser() -> argparse.ArgumentParser:
    from sdanim.interpolation import EASINGS

    parser = argparse.ArgumentParser(
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

    g = sub.add_parser(
        "generate", help="text to image: a batch of seeded images",
        description="Generate images from one prompt; image k uses seed + k. Saved as PNG.",
        epilog='example:\n  python -m sdanim generate "a ford truck on a dirt road" --num-images 3 --seed 4\n\n' + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g.add_argument("prompt", help="what to draw")
    g.add_argument("--num-images", type=int, default=3, help="how many images (default: 3)")
    g.add_argument("--seed", type=int, default=None, help="seed of the first image (default: random, printed)")
    g.add_argument("--out", default="outputs", help="output folder (default: outputs)")
    _add_render_args(g, batch_default=3)
    return parser


def _settings(args):
    from sdanim.settings import RenderSettings, parse_size

    height, width = parse_size(args.size)
    return RenderSettings(
        height=height, width=width, num_steps=args.steps, guidance_scale=args.guidance,
        scheduler=args.scheduler, batch_size=args.batch_size,
    )


def _load(args, settings):
    from sdanim.models import clip_vocab_path, load_model

    clip_vocab_path()  # fail before a minute of model building if the vocab is missing
    jit = {"auto": None, "on": True, "off": False}[args.jit]
    return load_model(
        version=args.model, weights=args.weights, height=settings.height, width=settings.width,
        precision=args.precision, jit_compile=jit, attention=args.attention,
    )


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


def _run(args) -> int:
    from sdanim import api

    settings = _settings(args)
    progress = not args.quiet
    if args.command == "morph":
        # Cheap checks first: a typo must not cost a model build.
        api.check_morph_args(args.prompts, args.out, args.frames, args.fps, args.seed,
                             args.interpolation, args.noise, args.seeds, args.audio)
        model = _load(args, settings)
        result = api.morph(
            args.prompts, out=args.out, frames=args.frames, fps=args.fps, seed=args.seed,
            settings=settings, negative_prompt=args.negative, interpolation=args.interpolation,
            noise=args.noise, seeds=args.seeds, easing=args.easing, spacing=args.spacing,
            preview_steps=args.preview_steps, audio=args.audio, audio_mode=args.audio_mode,
            double=args.double, quality=args.quality, ping_pong=args.ping_pong,
            sheet=args.sheet, model=model, overwrite=args.overwrite, progress=progress,
        )
        _report(result, args.fps)
        return 0
    if args.command in ("walk", "circle"):
        from sdanim.keyframes import circle_walk, load_walk

        walk = load_walk(args.file) if args.command == "walk" else circle_walk(args.prompt, args.seed, args.frames)
        api.check_output_args(args.out, args.fps, args.audio)
        model = _load(args, settings)
        result = api.animate(
            walk, out=args.out, fps=args.fps, settings=settings, negative_prompt=args.negative,
            ping_pong=args.ping_pong, sheet=args.sheet, model=model, overwrite=args.overwrite,
            progress=progress, spacing=getattr(args, "spacing", "linear"),
            preview_steps=getattr(args, "preview_steps", None), audio=args.audio,
            audio_mode=args.audio_mode, double=args.double, quality=args.quality,
        )
        _report(result, args.fps)
        return 0
    if args.command == "generate":
        args.seed = api.check_generate_args(args.prompt, args.num_images, args.seed, args.out)
        model = _load(args, settings)
        result = api.generate(
            args.prompt, num_images=args.num_images, seed=args.seed, settings=settings,
            negative_prompt=args.negative, out_dir=args.out, model=model, progress=progress,
        )
        for seed, path in zip(result.seeds, result.paths):
            print(f"seed {seed}: {path}")
        return 0
    raise SdanimError(f"unknown command. Received: {args.command!r}")  # pragma: no cover


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.simplefilter("default")
    warnings.formatwarning = lambda message, category, *a, **k: f"sdanim: warning: {message}\n"
    try:
        return _run(args)
    except SdanimError as error:
        print(f"sdanim: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdanim: interrupted; frames already rendered are kept in the frames folder "
              "and the same command resumes", file=sys.stderr)
        return 130
