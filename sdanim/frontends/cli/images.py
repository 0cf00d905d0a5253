"""Commands that make stills: generate, mix, img2img, inpaint, outpaint, grid, steps."""

from __future__ import annotations

import os

from sdanim.config.errors import SdanimError
from sdanim.core.keyframes import normalize_prompt, parse_prompt_text
from sdanim.core.pixels import extend_canvas
from sdanim.formats.images import load_image
from sdanim.frontends.cli import options
from sdanim.frontends.cli.options import MIX_HELP, add_command
from sdanim.model.esrgan import check_upscaler
from sdanim.tasks import images, tools


def print_images(result) -> None:
    for seed, path in zip(result.seeds, result.paths):
        print(f"seed {seed}: {path}")


def check_upscale(args):
    """--upscale / --upscale-model resolved and checked before anything is rendered (or None)."""
    if args.upscale is None and args.upscale_model is None:
        return None
    return check_upscaler(args.upscale_model, args.upscale)


def upscale_images(args, upscaler, result) -> None:
    """Each image also enlarged, into <out>/x<scale>/ under its own name."""
    if upscaler is None:
        return
    folder = os.path.join(args.out, f"x{upscaler.arch.scale}")
    # The images were written by this command just now (over any of an earlier one with
    # their names): their enlarged copies follow them.
    written = tools.upscale(result.paths, out_dir=folder, scale=upscaler.arch.scale, model=upscaler.path,
                            progress=not args.quiet, overwrite=True)
    print(f"upscaled x{upscaler.arch.scale}: {len(written)} image(s) in {folder}")


def mix_pairs(tokens):
    """["a rabbit", "0.5", "a frog", "0.5"] -> (("a rabbit", 0.5), ("a frog", 0.5))."""
    if len(tokens) % 2:
        raise SdanimError(f"mix takes prompts each followed by a weight. Received: {tokens!r}")
    pairs = []
    for text, weight in zip(tokens[::2], tokens[1::2]):
        try:
            pairs.append((text, float(weight)))
        except ValueError:
            raise SdanimError(f"mix weights must be numbers. Received: weight={weight!r} for {text!r}") from None
    return normalize_prompt(pairs, "mix")


def common(args, settings) -> dict:
    return dict(settings=settings, negative_prompt=args.negative, progress=not args.quiet,
                model=options.model_for(args, settings), controlnets=options.controls(args))


def run_generate(args) -> int:
    upscaler = check_upscale(args)
    prompt = parse_prompt_text(args.prompt) if args.command == "generate" else mix_pairs(args.pairs)
    result = images.generate(prompt, num_images=args.num_images, seed=args.seed, out_dir=args.out,
                             **common(args, options.settings(args)))
    print_images(result)
    upscale_images(args, upscaler, result)
    return 0


def run_img2img(args) -> int:
    upscaler = check_upscale(args)
    image = load_image(args.image, "image")
    result = images.img2img(image, parse_prompt_text(args.prompt), strength=args.strength, num_images=args.num_images,
                            seed=args.seed, fit=args.fit, out_dir=args.out, **common(args, options.settings(args, image)))
    print_images(result)
    upscale_images(args, upscaler, result)
    return 0


def run_inpaint(args) -> int:
    upscaler = check_upscale(args)
    image = load_image(args.image, "image")
    result = images.inpaint(image, args.mask, parse_prompt_text(args.prompt), num_images=args.num_images,
                            seed=args.seed, strength=args.strength, feather=args.feather, fit=args.fit, out_dir=args.out,
                            **common(args, options.settings(args, image)))
    print_images(result)
    upscale_images(args, upscaler, result)
    return 0


def run_outpaint(args) -> int:
    upscaler = check_upscale(args)
    image = load_image(args.image, "image")
    canvas, _ = extend_canvas(image, args.left, args.right, args.top, args.bottom)
    size = f"{canvas.shape[1]}x{canvas.shape[0]}"
    if args.size is not None and args.size != size:
        raise SdanimError(f"outpaint's size is the image's plus the borders, {size}; leave out --size. "
                          f"Received: size={args.size}")
    args.size = size
    result = images.outpaint(image, parse_prompt_text(args.prompt), left=args.left, right=args.right, top=args.top,
                             bottom=args.bottom, num_images=args.num_images, seed=args.seed, feather=args.feather,
                             out_dir=args.out, **common(args, options.settings(args)))
    print_images(result)
    upscale_images(args, upscaler, result)
    return 0


def run_grid(args) -> int:
    prompts = [parse_prompt_text(p, "prompts") for p in args.prompts]
    result = images.grid(prompts, seeds=args.seeds, guidance_scales=args.guidances, steps=args.steps_list, out=args.out,
                         **common(args, options.settings(args)))
    print(f"wrote {result.path} ({len(prompts)} rows x {len(result.columns)} columns)")
    return 0


def run_steps(args) -> int:
    result = images.denoising_steps(parse_prompt_text(args.prompt), seed=args.seed, show=args.show, out=args.out,
                                    fps=args.fps, **common(args, options.settings(args)))
    print(f"wrote {result.gif} and {result.strip} (steps {', '.join(map(str, result.steps))})")
    return 0


def register(sub) -> None:
    g = add_command(
        sub, "generate", run_generate, help="text to image: a batch of seeded images",
        description="Generate images from one prompt; image k uses seed + k. Saved as PNG.",
        example='  python -m sdanim generate "a ford truck on a dirt road" --num-images 3 --seed 4',
    )
    g.add_argument("prompt", help=f"what to draw; {MIX_HELP}")
    options.add_images_args(g, 3)
    options.add_render_args(g, batch_default=3)

    mx = add_command(
        sub, "mix", run_generate, help="blend prompts by weight: text-to-image of a weighted mix",
        description="Blend several prompts' text embeddings with weights (normalised to sum 1) and "
        "generate images of the blend. The same mix works anywhere a prompt does as 'a rabbit:0.5 | a frog:0.5'.",
        example='  python -m sdanim mix "a rabbit" 0.5 "a frog" 0.5 --num-images 2 --seed 4',
    )
    mx.add_argument("pairs", nargs="+", metavar="PROMPT WEIGHT", help="prompts each followed by its weight")
    options.add_images_args(mx, 1)
    options.add_render_args(mx, batch_default=3)

    i2i = add_command(
        sub, "img2img", run_img2img, help="image to image: redraw an image with a prompt",
        description="Encode an image, noise it to --strength and redraw it with the prompt.",
        example='  python -m sdanim img2img rabbit.png "a wooden carving of a rabbit" --strength 0.6 --seed 1',
    )
    i2i.add_argument("image", help="input image (PNG, JPEG, ...)")
    i2i.add_argument("prompt", help=f"what to turn it into; {MIX_HELP}")
    i2i.add_argument("--strength", type=float, default=0.6, help="0 keeps the image, 1 ignores it (default: 0.6)")
    options.add_fit_arg(i2i)
    options.add_images_args(i2i, 1)
    options.add_render_args(i2i, batch_default=1, size_default=None)

    ip = add_command(
        sub, "inpaint", run_inpaint, help="repaint the white part of a mask",
        description="Repaint the region of the image that is white in the mask; every pixel outside "
        "the mask comes back unchanged.",
        example='  python -m sdanim inpaint room.png mask.png "a red armchair" --seed 3',
    )
    ip.add_argument("image", help="input image")
    ip.add_argument("mask", help="mask image of the same size: white = repaint, black = keep")
    ip.add_argument("prompt", help=f"what to paint there; {MIX_HELP}")
    ip.add_argument("--strength", type=float, default=1.0, help="1 paints from pure noise; lower keeps some of what was there (default: 1)")
    ip.add_argument("--feather", type=float, default=4.0, help="pixels over which the repaint blends in, inside the mask's edge (default: 4)")
    options.add_fit_arg(ip)
    options.add_images_args(ip, 1)
    options.add_render_args(ip, batch_default=1, size_default=None)

    op = add_command(
        sub, "outpaint", run_outpaint, help="extend an image beyond its borders",
        description="Extend the image by the given pixels on each side and paint the new borders. "
        "The extended size must be multiples of 64 (the image is not resized).",
        example='  python -m sdanim outpaint beach.png "a beach at sunset" --left 128 --right 128 --seed 2',
    )
    op.add_argument("image", help="input image")
    op.add_argument("prompt", help=f"what the whole extended picture shows; {MIX_HELP}")
    for side in ("left", "right", "top", "bottom"):
        op.add_argument(f"--{side}", type=int, default=0, help=f"pixels to add on the {side} (default: 0)")
    op.add_argument("--feather", type=float, default=4.0, help="blend width in pixels (default: 4)")
    options.add_images_args(op, 1)
    options.add_render_args(op, batch_default=1, size_default=None)

    gr = add_command(
        sub, "grid", run_grid, help="labelled comparison grid: prompts x seeds x guidance x steps",
        description="One row per prompt, one column per combination of --seeds, --guidances and "
        "--steps-list; same seed = same noise, so a column shows what a keyword does.",
        example='  python -m sdanim grid "a cat" "a fluffy cat" --seeds 1,2 --guidances 5,9',
    )
    gr.add_argument("prompts", nargs="+", metavar="PROMPT", help=f"one row each; {MIX_HELP}")
    gr.add_argument("--seeds", type=options.int_list, default=[42], metavar="S1,S2,...", help="seeds (default: 42)")
    gr.add_argument("--guidances", type=options.float_list, default=None, metavar="G1,G2,...",
                    help="guidance scales (default: --guidance)")
    gr.add_argument("--steps-list", type=options.int_list, default=None, metavar="N1,N2,...",
                    help="step counts (default: --steps)")
    gr.add_argument("--out", default="outputs/grid.png", help="output PNG (default: outputs/grid.png)")
    options.add_render_args(gr, batch_default=4)

    st = add_command(
        sub, "steps", run_steps, help="show the image emerging, step by step",
        description="Decode the predicted clean image after chosen denoising steps of one generation: "
        "a labelled strip <out>_strip.png and an animation.",
        example='  python -m sdanim steps "a lighthouse in a storm" --seed 4 --show 1,5,10,25',
    )
    st.add_argument("prompt", help=f"what to draw; {MIX_HELP}")
    st.add_argument("--seed", type=int, default=42, help="seed (default: 42)")
    st.add_argument("--show", type=options.int_list, default=None, metavar="S1,S2,...",
                    help="1-based steps to show (default: 8 spread evenly)")
    st.add_argument("--fps", type=float, default=4, help="frames per second of the animation (default: 4)")
    st.add_argument("--out", default="outputs/steps.gif", help="output .gif or .mp4 (default: outputs/steps.gif)")
    options.add_render_args(st, batch_default=1)
