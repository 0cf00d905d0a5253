"""Commands that make an animation: morph, walk, circle, image-morph."""

from __future__ import annotations

import dataclasses

from sdanim.config.choices import MORPH_NOISES
from sdanim.core.interpolation import EASINGS
from sdanim.core.keyframes import circle_walk, parse_prompt_text
from sdanim.formats.images import load_image
from sdanim.formats.walk_files import load_walk
from sdanim.frontends.cli import options
from sdanim.frontends.cli.options import MIX_HELP, add_command
from sdanim.tasks import walks

WALK_EXAMPLE = """\
  loop: true
  keyframes:
    - {prompt: a red barn at dawn, seed: 1, frames: 24, easing: ease-in-out}
    - {prompt: {a rabbit: 0.5, a frog: 0.5}, seed: 2, frames: 24}
    - {prompt: a snowy forest, seed: 3, frames: 24}
  attention: fused          # optional: AID's attention interpolation (off|inner|outer|fused)
  attention_warmup: 0.5     # optional: fraction of the steps that interpolate
"""


def report(result, fps: float) -> None:
    per_frame = result.seconds / max(result.rendered, 1)
    print(f"wrote {result.out} ({len(result.frames)} frames at {fps:g} fps; "
          f"{result.rendered} rendered, {per_frame:.2f} s/frame)")
    print(f"frames: {result.frames_dir}")
    if result.sheet:
        print(f"contact sheet: {result.sheet}")
    if result.audio_plot:
        tempo = f"tempo {result.tempo:.1f} BPM; " if result.tempo else ""
        print(f"audio: {tempo}plot of its strength and the walk's speed: {result.audio_plot}")
    smooth = result.smoothness
    print(f"smoothness: mean step {smooth['mean']:.4f}, 1-Gini {smooth['one_minus_gini']:.3f}, "
          f"variance {smooth['variance']:.2e} (1-Gini = 1: perfectly even steps)")


def run_morph(args) -> int:
    prompts = [parse_prompt_text(p, "prompts") for p in args.prompts]
    settings = options.settings(args)
    result = walks.morph(
        prompts, out=args.out, frames=args.frames, seed=args.seed, settings=settings,
        export=options.export(args), model=options.model_for(args, settings), negative_prompt=args.negative,
        interpolation=args.interpolation, noise=args.noise, seeds=args.seeds, easing=args.easing,
        spacing=args.spacing, preview_steps=args.preview_steps, workers=options.workers(args),
        overwrite=args.overwrite, progress=not args.quiet, attention_interp=args.attention_interp,
        attention_warmup=args.attention_warmup,
        guide=None if args.guide is None else parse_prompt_text(args.guide, "guide"), controlnets=options.controls(args),
        motion=options.motion(args),
    )
    report(result, args.fps)
    return 0


def run_walk(args) -> int:
    walk = load_walk(args.file) if args.command == "walk" else circle_walk(args.prompt, args.seed, args.frames)
    if args.attention_interp is not None or args.attention_warmup is not None:  # over the walk file's
        walk = dataclasses.replace(
            walk, attention=walk.attention if args.attention_interp is None else args.attention_interp,
            attention_warmup=walk.attention_warmup if args.attention_warmup is None else args.attention_warmup)
    settings = options.settings(args)
    result = walks.animate(
        walk, out=args.out, settings=settings, export=options.export(args),
        model=options.model_for(args, settings), negative_prompt=args.negative,
        spacing=getattr(args, "spacing", "linear"), preview_steps=getattr(args, "preview_steps", None),
        workers=options.workers(args), overwrite=args.overwrite, progress=not args.quiet,
        controlnets=options.controls(args), motion=options.motion(args),
    )
    report(result, args.fps)
    return 0


def run_image_morph(args) -> int:
    image = load_image(args.image_a, "image_a")
    settings = options.settings(args, image)
    result = walks.image_morph(
        image, load_image(args.image_b, "image_b"), parse_prompt_text(args.prompt), out=args.out, frames=args.frames,
        export=options.export(args), seed=args.seed, strength=args.strength, interpolation=args.interpolation,
        fit=args.fit, model=options.model_for(args, settings), workers=options.workers(args),
        settings=settings, negative_prompt=args.negative, progress=not args.quiet, controlnets=options.controls(args),
    )
    print(f"wrote {result.out} ({len(result.frames)} frames at {args.fps:g} fps)")
    print(f"frames: {result.frames_dir}")
    return 0


def register(sub) -> None:
    m = add_command(
        sub, "morph", run_morph, help="animate from one prompt to the next (GIF or MP4)",
        description="Render a prompt-to-prompt morph: interpolate the prompts' text embeddings "
        "over fixed seeded noise and export a GIF or MP4. PNG frames go to <out>_frames/.",
        example='  python -m sdanim morph "a ford truck on a dirt road" "an electric car in a city" \\\n'
        "      --frames 24 --fps 12 --seed 42 --out outputs/morph.gif",
    )
    m.add_argument("prompts", nargs="+", metavar="PROMPT", help="two or more prompts, in order")
    m.add_argument("--frames", type=int, default=24, help="total frames, keyframes included (default: 24)")
    m.add_argument("--fps", type=float, default=12, help="frames per second (default: 12)")
    m.add_argument("--seed", type=int, default=42, help="noise seed (default: 42)")
    m.add_argument("--out", default="outputs/morph.gif", help="output .gif, .mp4 or .webm (default: outputs/morph.gif)")
    options.add_interpolation_arg(m, "embedding")
    m.add_argument("--noise", default="fixed", choices=MORPH_NOISES,
                   help="fixed: one noise for every frame; slerp: between per-prompt seeds (default: fixed)")
    m.add_argument("--seeds", type=options.int_list, default=None, metavar="S1,S2,...", help="per-prompt seeds for --noise slerp")
    m.add_argument("--easing", default="linear", choices=tuple(EASINGS), help="easing of each transition (default: linear)")
    options.add_attention_interp_args(m, guide=True)
    options.add_timing_args(m)
    options.add_output_args(m)
    options.add_render_args(m, batch_default=4)
    options.add_motion_args(m)
    options.add_workers_args(m)

    w = add_command(
        sub, "walk", run_walk, help="animate through the keyframes of a YAML/JSON walk file",
        description="Render a keyframe walk: each keyframe a prompt (or a weighted mix), a seed, "
        "the frames to the next and an easing; optionally looping back to the first.",
        epilog="walk file:\n" + WALK_EXAMPLE + "\n" + options.EPILOG,
    )
    w.add_argument("file", help="walk file (.yaml, .yml or .json)")
    options.add_attention_interp_args(w, from_file=True)
    options.add_timing_args(w)
    w.add_argument("--fps", type=float, default=12, help="frames per second (default: 12)")
    w.add_argument("--out", default="outputs/walk.gif", help="output .gif, .mp4 or .webm (default: outputs/walk.gif)")
    options.add_output_args(w)
    options.add_render_args(w, batch_default=4)
    options.add_motion_args(w)
    options.add_workers_args(w)

    c = add_command(
        sub, "circle", run_walk, help="a seamless loop in noise space around one prompt",
        description="Walk a circle in noise space, cos(t) n1 + sin(t) n2 from seeds SEED and SEED+1, "
        "around one prompt: the last frame leads back into the first.",
        example='  python -m sdanim circle "a lighthouse in a storm" --frames 48 --fps 24',
    )
    c.add_argument("prompt", help="what to draw")
    c.add_argument("--frames", type=int, default=24, help="frames in one loop (default: 24)")
    c.add_argument("--seed", type=int, default=42, help="first basis seed (default: 42)")
    c.add_argument("--fps", type=float, default=12, help="frames per second (default: 12)")
    c.add_argument("--out", default="outputs/circle.gif", help="output .gif, .mp4 or .webm (default: outputs/circle.gif)")
    options.add_attention_interp_args(c)  # anything but off is refused with the reason: a circle has one prompt
    options.add_output_args(c)
    options.add_render_args(c, batch_default=4)
    options.add_workers_args(c)

    imx = add_command(
        sub, "image-morph", run_image_morph, help="morph between two of your own images",
        description="Encode two images, interpolate their latents and redraw every frame at --strength "
        "with the prompt over one fixed noise; export a GIF or MP4.",
        example='  python -m sdanim image-morph cat.png dog.png --prompt "a photo" --frames 16 --strength 0.5',
    )
    imx.add_argument("image_a", help="first image")
    imx.add_argument("image_b", help="last image")
    imx.add_argument("--prompt", default="", help=f"prompt guiding the redraw (default: none); {MIX_HELP}")
    imx.add_argument("--strength", type=float, default=0.5, help="how much each frame is redrawn, (0, 1] (default: 0.5)")
    imx.add_argument("--frames", type=int, default=24, help="frames, both ends included (default: 24)")
    imx.add_argument("--fps", type=float, default=12, help="frames per second (default: 12)")
    imx.add_argument("--seed", type=int, default=42, help="noise seed (default: 42)")
    options.add_interpolation_arg(imx, "latent")
    imx.add_argument("--out", default="outputs/image_morph.gif", help="output .gif, .mp4 or .webm (default: outputs/image_morph.gif)")
    imx.add_argument("--ping-pong", action="store_true", help="play forward, then back")
    options.add_post_args(imx)
    options.add_fit_arg(imx)
    options.add_render_args(imx, batch_default=4, size_default=None)
    options.add_workers_args(imx)
