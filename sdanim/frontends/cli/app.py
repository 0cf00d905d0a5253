"""The `ui` command: the browser app."""

from __future__ import annotations

import importlib.util

from sdanim.config.errors import SdanimError
from sdanim.frontends.cli import options
from sdanim.frontends.cli.options import add_command
from sdanim.frontends.ui import app


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
               auth=auth, inline=False, prevent_thread_lock=False)
    return 0


def register(sub) -> None:
    ui = add_command(
        sub, "ui", run_ui, help="the browser app: animate and the image tools (Gradio; pip install \"sdanim[ui]\")",
        description="Start the browser app. The model is loaded on the first render (another only for "
        "another size) and reused; renders queue one at a time. Binds 127.0.0.1 unless --listen or --share.",
        example="  python -m sdanim ui --weights keras-cv --port 7860",
    )
    ui.add_argument("--port", type=int, default=None, help="port (default: 7860, or the next free one)")
    ui.add_argument("--share", action="store_true", help="also a public gradio.live link (needs the internet)")
    ui.add_argument("--listen", action="store_true", help="bind 0.0.0.0: reachable from other machines")
    ui.add_argument("--auth", default=None, metavar="USER:PASS", help="ask for this user name and password")
    ui.add_argument("--out-dir", default="outputs/ui", help="where renders go (default: outputs/ui)")
    options.add_model_args(ui)
