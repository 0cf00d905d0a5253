"""Command line: `python -m sdanim COMMAND`, one module per command family, each
registering its commands (`register(subparsers)`); `args.run(args)` runs the command.

Bad input prints one line, `sdanim: error: ...`, and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from typing import Optional, Sequence

from sdanim.config.errors import SdanimError
from sdanim.core.runtime import quiet_tensorflow_env
from sdanim.frontends.cli import animations, app, images, tools
from sdanim.frontends.cli.options import EPILOG, Parser, UsageError
from sdanim.model.device import choose_onednn, keep_weights_in_kernels
from sdanim.model.sd3 import is_sd3
from sdanim.render.ray import FailedFrames

# The command families, in the order `--help` lists them.
COMMANDS = (animations, images, app, tools)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m sdanim",
        description="Stable Diffusion latent-walk animations (KerasCV).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for family in COMMANDS:
        family.register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    quiet_tensorflow_env()
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # named against the subcommand's help, not the top level's
            raise UsageError(f"unrecognized arguments: {' '.join(extra)} (see '{parser.prog} {args.command} --help')")
    except UsageError as error:
        print(f"sdanim: error: {error}", file=sys.stderr)
        return 2
    with _command_warnings():
        return _run(args, argv)


@contextlib.contextmanager
def _command_warnings():
    """For the command only: every warning shown once per place, as one line
    "sdanim: warning: ..."; the caller's filters and `warnings.formatwarning` are put
    back after (main(argv) called from a script or a test leaves its process as it was)."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        previous = warnings.formatwarning
        warnings.formatwarning = lambda message, category, *a, **k: f"sdanim: warning: {message}\n"
        try:
            yield
        finally:
            warnings.formatwarning = previous


def _run(args, argv) -> int:
    try:
        family = "sd3" if is_sd3(getattr(args, "model", None)) else "sd"
        if args.one_job and argv is None and family == "sd":
            # The process's own command line (python -m sdanim, the sdanim script): it runs
            # this one command and nothing else. Called with argv (a test, a script), the
            # process may run anything else too, and keeps TensorFlow's defaults. Not for
            # SD3: its kept copies of the MMDiT's weights outgrow the memory (device.py).
            keep_weights_in_kernels()
        choose_onednn(getattr(args, "precision", "auto"), family)  # before anything imports TensorFlow
        return args.run(args)
    except SdanimError as error:
        print(f"sdanim: error: {error}", file=sys.stderr)
        return 1 if isinstance(error, FailedFrames) else 2  # failed frames: the input was fine
    except KeyboardInterrupt:
        print("sdanim: interrupted; frames already rendered are kept in the frames folder "
              "and the same command resumes", file=sys.stderr)
        return 130
