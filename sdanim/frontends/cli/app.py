"""The `ui` command: the browser app."""

from __future__ import annotations

import importlib.util

from sdanim.config.errors import SdanimError
from sdanim.frontends.cli import options
from sdanim.frontends.cli.options import add_command
from sdanim.frontends.ui import app
from sdanim.config.limits import NETWORK_LIMITS, Limits

LIMIT_FLAGS = ("max_frames", "max_size", "max_steps", "max_images", "max_batch", "max_output_gb")


def limits(args) -> Limits:
    """The operator's limits: each flag given replaces its default (none for a local
    app, `NETWORK_LIMITS` in network mode)."""
    given = Limits(**{name: getattr(args, name) for name in LIMIT_FLAGS})
    return given.over(NETWORK_LIMITS) if args.listen or args.share else given


def run_ui(args) -> int:
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
    app.launch(spec=options.spec(args), out_dir=args.out_dir, port=args.port, share=args.share, listen=args.listen,
               auth=auth, inline=False, prevent_thread_lock=False, models_dir=args.models_dir, limits=limits(args),
               controlnets=args.controlnet, motion_modules=args.motion_module)
    return 0


def register(sub) -> None:
    ui = add_command(
        sub, "ui", run_ui, help="the browser app: animate and the image tools (Gradio; pip install \"sdanim[ui]\")",
        description="Start the browser app. The model is loaded on the first render (another only for "
        "another size) and reused; renders queue one at a time. Binds 127.0.0.1 unless --listen or --share.",
        example="  python -m sdanim ui --weights keras-cv --port 7860",
        one_job=False,  # a server: LoRAs and models change while it runs
    )
    ui.add_argument("--port", type=int, default=None, help="port (default: 7860, or the next free one)")
    ui.add_argument("--share", action="store_true", help="also a public gradio.live link (needs the internet)")
    ui.add_argument("--listen", action="store_true", help="bind 0.0.0.0: reachable from other machines")
    ui.add_argument("--auth", default=None, metavar="USER:PASS", help="ask for this user name and password")
    ui.add_argument("--out-dir", default="outputs/ui", help="where renders go (default: outputs/ui)")
    net = ui.add_argument_group(
        "sharing (--listen / --share): visitors choose only the weights and LoRAs named here, by name, and every "
        "request is checked against these limits")
    net.add_argument("--models-dir", default=None, metavar="DIR",
                     help="also offer the checkpoints, ControlNets, motion modules and LoRA files in DIR, listed by name "
                     "(network mode only)")
    net.add_argument("--controlnet", action="append", default=[], metavar="FILE",
                     help="offer this ControlNet (file or diffusers folder) by name (network mode; repeatable)")
    net.add_argument("--motion-module", action="append", default=[], metavar="FILE",
                     help="offer these AnimateDiff motion modules (file or diffusers folder) by name (network mode; "
                     "repeatable)")
    defaults = {f: getattr(NETWORK_LIMITS, f) for f in LIMIT_FLAGS}
    net.add_argument("--max-frames", type=int, default=None, help=f"frames per animation (network default: {defaults['max_frames']})")
    net.add_argument("--max-size", type=int, default=None, help=f"pixels on an image's longer side (network default: {defaults['max_size']})")
    net.add_argument("--max-steps", type=int, default=None, help=f"denoising steps (network default: {defaults['max_steps']})")
    net.add_argument("--max-images", type=int, default=None, help=f"images per generate request (network default: {defaults['max_images']})")
    net.add_argument("--max-batch", type=int, default=None, help=f"images per model call (network default: {defaults['max_batch']})")
    net.add_argument("--max-output-gb", type=float, default=None,
                     help=f"no new render once the output folder holds this much (network default: {defaults['max_output_gb']:g})")
    options.add_model_args(ui)
