"""What every command shares: the parser whose errors are one line, the option groups
(sampling, model, output, workers), and the settings and specs built from them."""

from __future__ import annotations

import argparse
from typing import Optional

from sdanim.config.choices import (
    ATTENTION_INTERPS, ATTENTIONS, AUDIO_MODES, BETA_SCHEDULES, DECODERS, INTERPOLATIONS, PRECISIONS, PREPROCESSORS, SCHEDULERS,
    SPACINGS, MODELS, FLOW_SCHEDULERS,
)
from sdanim.config.control import ControlNetSpec, parse_controlnet
from sdanim.config.errors import SdanimError
from sdanim.config.export import ExportSettings
from sdanim.config.motion import BLENDS, MOTION_NORMS, WEIGHTINGS, MotionSpec
from sdanim.config.settings import RenderSettings, render_settings
from sdanim.core.pixels import auto_size
from sdanim.model.sd3 import SD3_CONFIGS
from sdanim.model.spec import ModelSpec
from sdanim.render.ray import Workers

EPILOG = """\
Real images need Stable Diffusion weights: with --weights keras-cv (the default) KerasCV
downloads them once (about 4 GB) into ~/.keras/datasets. Offline, pass a folder that
holds the .h5 files (--weights DIR) or try the pipeline with --weights random. Any SD
1.x/2.x checkpoint works too: --weights model.safetensors, model.ckpt or a diffusers
folder (sdanim convert writes it as .h5 files once, for faster loads).
"""
MIX_HELP = "'a rabbit:0.5 | a frog:0.5' blends prompts by weight"


class UsageError(Exception):
    """argparse's complaint, raised instead of printing usage and exiting."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, like the rest of the CLI's.

    argparse prints the whole usage block before its message; here `main` prints
    `sdanim: error: <what> (see 'python -m sdanim morph --help')` and returns 2.
    Subcommand parsers inherit the class (argparse builds them with type(parent)).
    """

    def error(self, message):  # noqa: D102 - argparse's hook
        raise UsageError(f"{message} (see '{self.prog} --help')")


def add_command(sub, name: str, run, help: str, description: str, example: str = "", epilog: str = EPILOG,
                one_job: bool = True):
    """A subcommand parser whose `args.run(args)` is `run`. one_job: the process runs
    this one command and exits (so it may keep weights in oneDNN's kernels:
    `sdanim.model.device.keep_weights_in_kernels`); False for a server."""
    parser = sub.add_parser(
        name, help=help, description=description,
        epilog=(f"example:\n{example}\n\n" if example else "") + epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(run=run, one_job=one_job)
    return parser


def int_list(text: str):
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str):
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_render_args(p: argparse.ArgumentParser, batch_default: int, size_default: Optional[str] = "512x512") -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: 25; 4 for lcm and tcd)")
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale; 1 = one UNet pass per step (default: 7.5; 1 for lcm and tcd)")
    g.add_argument("--scheduler", default=None, choices=SCHEDULERS,
                   help="sampler (default: ddim, as KerasCV; flow_euler for the SD3 models, the only one they take); "
                   "lcm and tcd are for step-distilled weights (LCM-LoRA, TCD-LoRA)")
    g.add_argument("--negative", default=None, metavar="PROMPT", help="negative prompt")
    if size_default is None:
        g.add_argument("--size", default=None, metavar="WxH",
                       help="image size, multiples of 64 (default: the input image's, rounded down to multiples of 64)")
    else:
        g.add_argument("--size", default=size_default, metavar="WxH", help=f"image size, multiples of 64 (default: {size_default})")
    g.add_argument("--batch-size", type=int, default=batch_default, help=f"images per model call (default: {batch_default})")
    g.add_argument("--decoder", default="full", choices=DECODERS,
                   help="full: the SD VAE decoder; tiny: TAESD, about 40x less decoding work, softer detail, for "
                   "drafts (default: full)")
    add_model_args(p)
    add_control_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_control_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "ControlNet: structure that holds (each option once for every net, or once per --controlnet, in order)")
    g.add_argument("--controlnet", action="append", default=[], metavar="FILE[:SCALE]",
                   help="a ControlNet for SD 1.x/2.x: a diffusers folder, lllyasviel's ControlNet-v1-1 .pth/.safetensors, "
                   "or an SD 2.1 net's file; SCALE its conditioning scale (default 1); repeat for several")
    g.add_argument("--control-image", action="append", default=[], metavar="IMAGE|FOLDER|VIDEO",
                   help="what the frames follow: one image for every frame, or a folder of images (sorted by name) or "
                   "a video: one per frame, spread evenly over the frames (frame i of F takes image "
                   "round(i (M-1)/(F-1)) of M); a walk file's keyframes may give control_image instead")
    g.add_argument("--control-preprocess", action="append", default=[], choices=PREPROCESSORS,
                   help="turn the image into the net's hint first: canny, lineart (standard), shuffle, tile, inpaint "
                   "(the inpaint command's mask) or none (default: none, the image is the hint)")
    g.add_argument("--control-start", action="append", default=[], type=float, metavar="FRACTION",
                   help="the fraction of the steps before the net starts acting (default: 0)")
    g.add_argument("--control-end", action="append", default=[], type=float, metavar="FRACTION",
                   help="the fraction of the steps after which it stops (default: 1)")
    g.add_argument("--guess-mode", action="store_true",
                   help="the nets decide the content: their residuals weighted 0.1 .. 1 and, under guidance, given to "
                   "the conditional half only (for empty or vague prompts)")


def add_motion_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("motion modules (AnimateDiff, SD 1.x): frames denoised together, so they move")
    g.add_argument("--motion-module", default=None, metavar="FILE|random",
                   help="AnimateDiff motion modules: guoyww's mm_sd_v15*.ckpt/.safetensors (v1, v2, v3), AnimateLCM's, "
                   "or a diffusers MotionAdapter folder; random: the architecture with seeded random weights")
    g.add_argument("--context", type=int, default=16, metavar="FRAMES",
                   help="frames denoised together in one window (default: 16)")
    g.add_argument("--context-stride", type=int, default=4, metavar="FRAMES",
                   help="frames between the starts of consecutive windows (default: 4)")
    g.add_argument("--context-weighting", default="pyramid", choices=WEIGHTINGS,
                   help="how overlapping windows blend: pyramid (by how central a frame is) or flat (default: pyramid)")
    g.add_argument("--motion-norm", default="frame", choices=MOTION_NORMS,
                   help="the motion GroupNorm's statistics: per frame (as the modules were trained) or over the "
                   "window (diffusers) (default: frame)")
    g.add_argument("--context-blend", default="unet", choices=BLENDS,
                   help="where windows are blended: unet (each window through the whole UNet, predictions blended; "
                   "memory of one window at any length) or attention (inside the motion modules' attention, FreeNoise "
                   "and diffusers; memory grows with the length) (default: unet)")
    g.add_argument("--betas", default="linear", choices=BETA_SCHEDULES,
                   help="the sampler's noise schedule: linear (what AnimateDiff, AnimateLCM and Lightning were trained "
                   "on) or scaled_linear (SD's) (default: linear). Lightning: --scheduler euler_trailing --guidance 1")
    g.add_argument("--spatial-chunk", type=int, default=None, metavar="ROWS",
                   help="UNet rows (two per frame under guidance) the spatial layers take at once, the motion modules "
                   "still seeing the whole window: less memory at 512 px and up, where attention's maps dominate; only "
                   "slower at small sizes (default: all at once)")


def motion(args):
    """The `MotionSpec` of --motion-module and its options, or None."""
    if getattr(args, "motion_module", None) is None:
        for flag, default in (("context", 16), ("context_stride", 4), ("context_weighting", "pyramid"),
                              ("motion_norm", "frame"), ("context_blend", "unet"), ("betas", "linear"),
                              ("spatial_chunk", None)):
            if getattr(args, flag, default) != default:
                raise SdanimError(f"--{flag.replace('_', '-')} needs --motion-module FILE. "
                                  "Received: --motion-module not given")
        return None
    return MotionSpec(args.motion_module, context=args.context, stride=args.context_stride,
                      weighting=args.context_weighting, norm=args.motion_norm, blend=args.context_blend,
                      betas=args.betas, spatial_chunk=args.spatial_chunk)


def add_model_args(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, choices=MODELS,
                   help="architecture: 1.4 (SD 1.x) or 2.1 (SD 2.x) on KerasCV (default: what --weights holds, else "
                   "1.4); sd3-medium, sd3.5-medium, sd3.5-large, sd3.5-large-turbo on KerasHub (pip install "
                   "'sdanim[sd3]'; 28/40/28/4 steps, guidance 7/4.5/3.5/1 unless given)")
    m.add_argument("--weights", default="keras-cv", metavar="keras-cv|keras-hub|random|DIR|CHECKPOINT",
                   help="weight source: KerasCV's download/cache (SD3: KerasHub's preset from Kaggle), seeded random "
                   "weights, a folder of .h5 files, or an SD 1.x/2.x checkpoint (.safetensors, .ckpt, diffusers folder)")
    m.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="merge a LoRA file (kohya/AUTOMATIC1111 or diffusers/PEFT .safetensors) into the weights, "
                   "scaled by SCALE (default 1); repeat to stack several")
    m.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="dtype policy (default: auto = mixed_float16 on CUDA, mixed_bfloat16 on CPUs with "
                   "native bfloat16 (AVX512_BF16/AMX) under TensorFlow, float32 elsewhere)")
    m.add_argument("--jit", default="auto", choices=("auto", "on", "off"),
                   help="XLA-compile the sampling step (default: auto = on for CUDA only)")
    m.add_argument("--taesd", default=None, metavar="FILE|DIR",
                   help="TAESD weights for --decoder tiny and previews: taesd_decoder.pth/.safetensors or a diffusers "
                   "AutoencoderTiny folder (default: downloaded once from madebyollin/taesd); SD3 models: "
                   "taesd3_decoder.pth/.safetensors or the madebyollin/taesd3 folder (no download)")
    m.add_argument("--attention", default="auto", choices=ATTENTIONS,
                   help="fused: keras.ops.dot_product_attention (flash kernels where available); "
                   "keras-cv: KerasCV's own (default: auto = fused on CUDA only)")


def add_timing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spacing", default="linear", choices=SPACINGS,
                   help="uniform: preview the frames, then re-place them so consecutive frames are "
                   "equally far apart; beta: AID's Beta(3, 3) prior, more frames mid-transition (default: linear)")
    p.add_argument("--preview-steps", type=int, default=None, help="steps of the uniform-spacing preview (default: steps/4, at least 2)")


def add_attention_interp_args(p: argparse.ArgumentParser, guide: bool = False, from_file: bool = False) -> None:
    g = p.add_argument_group("attention interpolation (AID): gradual changes instead of hard cuts")
    default = "the walk file's, else off" if from_file else "off"
    g.add_argument("--attention-interp", default=None if from_file else "off", choices=ATTENTION_INTERPS,
                   help="in-between frames attend to keys/values interpolated from their two keyframes' "
                   f"(inner, outer, or fused: AID's default); off: text embeddings interpolated only (default: {default})")
    default = "the walk file's, else 0.5" if from_file else "0.5"
    g.add_argument("--attention-warmup", type=float, default=None if from_file else 0.5, metavar="FRACTION",
                   help=f"fraction of the steps that interpolate attention, [0, 1] (default: {default})")
    if guide:
        g.add_argument("--guide", default=None, metavar="PROMPT",
                       help=f"PAID's guide prompt: in-between frames take its embedding instead of the blend; {MIX_HELP}")


def add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ping-pong", action="store_true", help="play forward, then back")
    p.add_argument("--double", action="store_true", help="double the frames in the video by blending neighbours (plays at 2x fps)")
    p.add_argument("--quality", type=float, default=8.0, help="MP4/WebM quality 0-10 (default: 8)")
    p.add_argument("--audio", default=None, metavar="FILE",
                   help="audio (WAV, MP3, M4A/AAC, FLAC, Ogg, or a video's sound track) that times the walk; "
                   "muxed into MP4/WebM; a plot of it and the walk's speed goes to <out>_audio.png")
    p.add_argument("--audio-mode", default="loudness", choices=AUDIO_MODES,
                   help="loudness or onsets: faster where the music is louder / on hits; beats: every keyframe "
                   "on a beat (default: loudness)")
    p.add_argument("--beats-per-keyframe", type=int, default=4, metavar="K",
                   help="with --audio-mode beats: keyframe j lands on beat j*K (default: 4)")
    p.add_argument("--sheet", action="store_true", help="also write a contact sheet of all frames")
    p.add_argument("--overwrite", action="store_true", help="replace frames of a different run in the frames folder")
    add_post_args(p)


def add_post_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("after rendering: in-betweens (RIFE) and upscaling (Real-ESRGAN)")
    g.add_argument("--interpolate", type=int, default=1, metavar="N",
                   help="video frames per rendered frame: N-1 RIFE in-betweens between neighbours (default: 1, none); "
                   "--fps is the video's rate")
    g.add_argument("--rife", default=None, metavar="FILE",
                   help="RIFE weights (flownet.pkl of v4.22-v4.26; default: the pinned v4.26 heavy, downloaded once)")
    g.add_argument("--upscale", type=int, default=None, choices=(2, 4), help="enlarge every video frame with Real-ESRGAN")
    g.add_argument("--upscale-model", default=None, metavar="NAME|FILE",
                   help="upscaler weights: a .pth/.safetensors, or realesrgan-x4plus, realesrgan-x2plus, "
                   "realesrgan-x4plus-anime, realesr-general-x4v3, realesr-animevideov3 (downloaded once; "
                   "default: realesrgan-x4plus or -x2plus for --upscale)")


def add_workers_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several devices (Ray; pip install \"sdanim[ray]\")")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="render on N Ray workers, one model each (default: this process, no Ray)")
    g.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT|ray://HOST:PORT",
                   help="join an existing Ray cluster (default: start one on this machine)")
    g.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs each worker holds (default: 1 if the cluster has GPUs, else 0)")
    g.add_argument("--max-attempts", type=int, default=3,
                   help="tries per frame before it is reported as failed (default: 3)")


def add_images_args(p: argparse.ArgumentParser, count: int) -> None:
    p.add_argument("--num-images", type=int, default=count, help=f"how many images, image k from seed + k (default: {count})")
    p.add_argument("--seed", type=int, default=None, help="seed of the first image (default: random, printed)")
    p.add_argument("--out", default="outputs", help="output folder (default: outputs)")
    g = p.add_argument_group("upscaling (Real-ESRGAN)")
    g.add_argument("--upscale", type=int, default=None, choices=(2, 4),
                   help="also write each image enlarged 2x or 4x, to <out>/x2 or <out>/x4")
    g.add_argument("--upscale-model", default=None, metavar="NAME|FILE",
                   help="upscaler weights: a .pth/.safetensors or a pinned name (default: realesrgan-x4plus or -x2plus)")


def add_fit_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fit", default="crop", choices=("crop", "resize"),
                   help="how the image meets --size: crop (centre-crop to the aspect ratio, then resize) "
                   "or resize (stretch) (default: crop)")


def add_interpolation_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--interpolation", default="slerp", choices=INTERPOLATIONS, help=f"{what} interpolation (default: slerp)")


def settings(args, image=None) -> RenderSettings:
    """The sampling settings of a command (an image tool's size defaults to the image's)."""
    size = args.size
    if size is None:
        height, width = auto_size(image)
        size = f"{width}x{height}"
    scheduler, steps, guidance = args.scheduler, args.steps, args.guidance
    sd3 = SD3_CONFIGS.get(getattr(args, "model", None))
    if sd3 is not None and scheduler in (None, *FLOW_SCHEDULERS):  # the model's own defaults
        scheduler = FLOW_SCHEDULERS[0]
        steps = sd3.steps if steps is None else steps
        guidance = sd3.guidance if guidance is None else guidance
    return render_settings(size, steps, guidance, scheduler or "ddim", args.batch_size, args.decoder)


def spec(args) -> ModelSpec:
    """The model a command asks for (loaded by the task, after its cheap checks)."""
    jit = {"auto": None, "on": True, "off": False}[args.jit]
    return ModelSpec(version=args.model, weights=args.weights, precision=args.precision, jit_compile=jit,
                     attention=args.attention, loras=tuple(args.lora), taesd=args.taesd)


def model_for(args, settings: RenderSettings):
    """What a command hands the task as its model for `settings`: the `ModelSpec` of its
    options (the task loads it after its cheap checks). Tests replace this to hand in a
    model they already hold."""
    return spec(args)


def export(args) -> ExportSettings:
    return ExportSettings(
        fps=args.fps, ping_pong=getattr(args, "ping_pong", False), double=getattr(args, "double", False),
        quality=getattr(args, "quality", 8.0), sheet=getattr(args, "sheet", False),
        audio=getattr(args, "audio", None), audio_mode=getattr(args, "audio_mode", "loudness"),
        beats_per_keyframe=getattr(args, "beats_per_keyframe", 4),
        interpolate=getattr(args, "interpolate", 1), rife=getattr(args, "rife", None),
        upscale=getattr(args, "upscale", None), upscale_model=getattr(args, "upscale_model", None),
    )


def controls(args) -> list:
    """The `ControlNetSpec`s of --controlnet and its options (each option given once for
    every net, or once per net)."""
    nets = [parse_controlnet(text) for text in getattr(args, "controlnet", [])]
    per_net = {}
    for flag in ("control_image", "control_preprocess", "control_start", "control_end"):
        values = getattr(args, flag, [])
        if values and not nets:
            raise SdanimError(f"--{flag.replace('_', '-')} needs --controlnet FILE. Received: --controlnet not given")
        if len(values) not in (0, 1, len(nets)):
            raise SdanimError(f"--{flag.replace('_', '-')} is given {len(values)} times for {len(nets)} ControlNets: "
                              f"give it once (for every net) or once per net. Received: {values}")
        per_net[flag] = [values[0] if len(values) == 1 else values[k] if values else None for k in range(len(nets))]
    if getattr(args, "guess_mode", False) and not nets:
        raise SdanimError("--guess-mode needs --controlnet FILE. Received: --controlnet not given")
    specs = []
    for k, (path, scale) in enumerate(nets):
        given = {name: per_net[flag][k] for name, flag in (("image", "control_image"), ("preprocess", "control_preprocess"),
                                                           ("start", "control_start"), ("end", "control_end"))
                 if per_net[flag][k] is not None}
        specs.append(ControlNetSpec(path, scale=scale, guess_mode=bool(getattr(args, "guess_mode", False)), **given))
    return specs


def workers(args):
    """Ray workers from --workers and friends, or None (Ray is then never imported)."""
    if getattr(args, "workers", None) is None:
        for flag in ("ray_address", "gpus_per_worker"):
            if getattr(args, flag, None) is not None:
                raise SdanimError(f"--{flag.replace('_', '-')} needs --workers N. Received: --workers not given")
        return None
    return Workers(count=args.workers, address=args.ray_address, gpus_per_worker=args.gpus_per_worker,
                   max_attempts=args.max_attempts)
