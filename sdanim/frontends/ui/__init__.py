"""The browser app (Gradio Blocks): one module per tab over the task functions.

    sdanim.ui.launch(model=model)   # inline in a notebook; python -m sdanim ui elsewhere

Gradio is imported when the app is built, not when this package is.
"""

from sdanim.frontends.ui.app import build_app, launch
from sdanim.frontends.ui.common import Stopped, parse_keyframes, walk_to_text
from sdanim.config.limits import NETWORK_LIMITS, Limits
from sdanim.frontends.ui.model import Access, ModelHolder, offered_models

__all__ = ["build_app", "launch", "parse_keyframes", "walk_to_text", "ModelHolder", "Stopped", "Limits", "Access",
           "NETWORK_LIMITS", "offered_models"]
