"""What every tab shares: the app's context (model, limits, output folder), the sampling
widgets, readable errors, and the keyframe lines of the Animate tab."""

from __future__ import annotations

import dataclasses
import functools
import re
import threading
from typing import Optional

import numpy as np

from sdanim.config.choices import FLOW_SCHEDULERS, PREPROCESSORS, SCHEDULERS
from sdanim.config.control import ControlNetSpec
from sdanim.config.errors import SdanimError, check
from sdanim.config.limits import Limits
from sdanim.config.motion import BLENDS, MotionSpec
from sdanim.config.settings import RenderSettings, render_settings
from sdanim.core.hints import make_hint
from sdanim.core.keyframes import parse_prompt_text, parse_walk
from sdanim.formats.images import load_pictures
from sdanim.frontends.ui.model import ModelHolder, check_disk

SIZES = ("512x512", "768x512", "512x768", "640x640", "384x384", "256x256", "128x128", "64x64")
KEYFRAMES_HELP = (
    "One keyframe per line: the prompt, then optionally [seed=1 frames=24 easing=ease-in-out] "
    "(frames to the next keyframe; with noise 'fixed' one seed for all, over the Seed field). "
    "A weighted mix: a rabbit:0.5 | a frog:0.5"
)
EXAMPLE_KEYFRAMES = "a ford truck on a dirt road, mountains [seed=42 frames=12]\nan electric car in a city, skyline"


class Stopped(Exception):
    """Raised from a render's batch callback when the user pressed Stop."""


@dataclasses.dataclass
class AppContext:
    """What the tabs share: the model holder, the limits, the output folder, and each
    visitor's Stop (one per browser session: a visitor stops only their own render)."""

    holder: ModelHolder
    limits: Limits
    out_dir: str
    default_size: str
    stops: dict = dataclasses.field(default_factory=dict)  # session -> threading.Event
    samplers: list = dataclasses.field(default_factory=list)  # every tab's sampler widget
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def stop(self, request) -> threading.Event:
        """The Stop of the visitor making `request` (a gr.Request; None: the app's own)."""
        session = getattr(request, "session_hash", None)
        with self._lock:
            return self.stops.setdefault(session, threading.Event())

    def settings(self, size: str, steps, guidance, sampler: str, batch) -> RenderSettings:
        """The request's settings (0 in the steps or guidance field: the sampler's
        default), checked against the limits."""
        settings = render_settings(str(size), steps or None, guidance or None, sampler, batch)
        self.limits.check_settings(settings)
        return settings

    def check_disk(self) -> None:
        """No new render once the output folder holds the operator's --max-output-gb."""
        check_disk(self.limits, self.out_dir)

    def model(self, settings: RenderSettings, notify):
        """The model for `settings`, after the output folder's limit is checked."""
        self.check_disk()
        return self.holder.get(settings, notify)


def friendly(fn):
    """Errors become one readable message in the page; the server keeps running."""
    import gradio as gr

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
            if hasattr(result, "__next__"):
                yield from result
            else:
                yield result
        except SdanimError as error:
            raise gr.Error(str(error)) from None
    return wrapped


def first_sampler(family: str) -> str:
    """The sampler a model family's tabs start at: flow_euler for SD3 (the only kind it
    takes), DDIM (KerasCV's) for SD 1.x/2.x."""
    return FLOW_SCHEDULERS[0] if family == "sd3" else "ddim"


def sampling_inputs(context: AppContext):
    """The sampling row every tab has: size, sampler, steps, guidance, batch size."""
    import gradio as gr

    sizes = list(dict.fromkeys([context.default_size, *SIZES]))
    with gr.Row():
        size = gr.Dropdown(sizes, value=context.default_size, label="Size (WxH)", allow_custom_value=True)
        # The model decides the sampler's family: SD3 (`--model sd3-medium`) takes flow_euler only.
        sampler = gr.Dropdown(list(SCHEDULERS), value=first_sampler(context.holder.family), label="Sampler")
        context.samplers.append(sampler)  # set again when the Model section switches family
        steps = gr.Number(value=0, precision=0, label="Steps (0 = the sampler's default)")
        guidance = gr.Number(value=0, label="Guidance (0 = the sampler's default)")
        batch = gr.Number(value=4, precision=0, label="Batch size", minimum=1)
    return size, sampler, steps, guidance, batch


def _offered_or_typed(context: AppContext, offer: dict, offered_label: str, typed_label: str):
    """A file widget: the operator's offer by name in a network app, a typed path locally."""
    import gradio as gr

    if context.holder.access.network:
        return gr.Dropdown(["none", *offer], value="none", label=offered_label)
    return gr.Textbox("", label=typed_label)


def control_inputs(context: AppContext):
    """The ControlNet section (Animate and Generate): the net (typed in a local app,
    chosen from the operator's offer in a network app), the image or video it follows,
    its preprocessor, scale, steps and guess mode, and the hint it makes. Returns the
    inputs in order (the render events take them after their own)."""
    import gradio as gr

    with gr.Accordion("ControlNet: structure that holds while the prompt travels", open=False):
        with gr.Row():
            net = _offered_or_typed(context, context.holder.access.controlnets, "ControlNet (offered by this app)",
                                    "ControlNet weights: a diffusers folder or a ControlNet-v1-1 .pth/.safetensors "
                                    "(empty: none)")
            picture = gr.File(label="Control image or video (one image for every frame, a video: one per frame)",
                              file_types=["image", "video"], type="filepath")
            hint = gr.Image(label="Hint (what the net follows)", type="numpy", interactive=False, format="png")
        with gr.Row():
            preprocess = gr.Dropdown([p for p in PREPROCESSORS if p != "inpaint"], value="canny", label="Preprocess")
            scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Scale")
            start = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="Start (fraction of the steps)")
            end = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="End")
            guess = gr.Checkbox(False, label="Guess mode")

    @friendly
    def show_hint(path, preprocess_):
        if not path:
            return None
        made = make_hint(load_pictures(path, "control_image", first=True)[0], preprocess_)
        return made if made.dtype == np.uint8 else None

    picture.change(show_hint, [picture, preprocess], hint, queue=False)
    preprocess.change(show_hint, [picture, preprocess], hint, queue=False)
    return net, picture, preprocess, scale, start, end, guess


def motion_inputs(context: AppContext):
    """The Animate tab's motion-module section: the modules (typed in a local app, "random"
    for the architecture with random weights; chosen from the operator's offer in a
    network app), the window, its stride and where windows blend. Returns the inputs in
    order."""
    import gradio as gr

    with gr.Accordion("Motion modules (AnimateDiff, SD 1.x): frames denoised together, so they move", open=False):
        with gr.Row():
            module = _offered_or_typed(context, context.holder.access.motion_modules,
                                       "Motion modules (offered by this app)",
                                       "Motion modules: mm_sd_v15*.ckpt/.safetensors, AnimateLCM's, a diffusers "
                                       "MotionAdapter folder, or random (empty: none)")
            window = gr.Number(value=16, precision=0, label="Context (frames per window)")
            stride = gr.Number(value=4, precision=0, label="Context stride")
            blend = gr.Dropdown(list(BLENDS), value="unet", label="Blend windows in",
                                info="unet: memory of one window at any length; attention: FreeNoise/diffusers")
    return module, window, stride, blend


def motion_spec(context: AppContext, module, window, stride, blend) -> Optional[MotionSpec]:
    """The request's motion modules, or None; a network app takes only modules it offers."""
    chosen = str(module or "").strip()
    if not chosen or chosen == "none":
        return None
    return MotionSpec(context.holder.access.motion_module(chosen), context=16 if window is None else int(window),
                      stride=4 if stride is None else int(stride), blend=blend or "unet")


def control_specs(context: AppContext, net, picture, preprocess, scale, start, end, guess) -> list:
    """The request's ControlNets (none without a net), checked: a network app takes only
    nets it offers, by name."""
    chosen = str(net or "").strip()
    if not chosen or chosen == "none":
        return []
    check(picture, "a ControlNet needs a control image or video; upload one. Received: control_image=None")
    return [ControlNetSpec(context.holder.access.controlnet(chosen), image=str(picture), preprocess=preprocess or "none",
                           scale=float(scale), start=float(start), end=float(end), guess_mode=bool(guess))]


def gallery(items) -> list:
    """(image, frame index) pairs -> the gallery's (image, caption), in frame order."""
    return [(image, f"frame {i}") for image, i in sorted(items, key=lambda item: item[1])]


def parse_keyframes(text: str, seed: int, frames: int, easing: str, loop: bool, interpolation: str, noise: str):
    """The Animate tab's keyframe lines -> a checked `Walk` (errors name the line)."""
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    keyframes = []
    for i, line in enumerate(lines):
        options = {}
        match = re.match(r"^(.*?)\s*\[([^\[\]]*)\]\s*$", line)
        if match:
            line, body = match.group(1), match.group(2)
            for token in body.replace(",", " ").split():
                key, sep, value = token.partition("=")
                check(sep and key in ("seed", "frames", "easing"),
                      f"keyframe line {i + 1}: options are seed=N frames=N easing=NAME. Received: {token!r}")
                if key == "easing":
                    options[key] = value
                else:
                    check(value.lstrip("-").isdigit(), f"keyframe line {i + 1}: {key} must be a whole number. Received: {key}={value!r}")
                    options[key] = int(value)
        prompt = parse_prompt_text(line, f"keyframes[{i}].prompt")
        keyframes.append({
            "prompt": prompt if isinstance(prompt, str) else [list(p) for p in prompt],
            "seed": options.get("seed", int(seed) + i),
            "frames": options.get("frames", int(frames)),
            "easing": options.get("easing", easing),
            "typed": "seed" in options,
        })
    if noise == "fixed":
        # One noise for every frame: a seed typed on the lines is that noise's seed (over
        # the Seed field); lines that type different seeds ask for per-keyframe noise.
        typed = sorted({k["seed"] for k in keyframes if k["typed"]})
        check(len(typed) <= 1,
              f"the keyframe lines give seeds {', '.join(map(str, typed))}, but noise 'fixed' draws one noise for "
              "every frame: choose noise 'per keyframe' to use each line's seed, or type one seed. "
              f"Received: seeds={typed}")
        for k in keyframes:
            k["seed"] = typed[0] if typed else int(seed)
    for k in keyframes:
        del k["typed"]
    check(len(keyframes) >= (1 if loop else 2),
          f"keyframes needs at least {'1 line' if loop else '2 lines'} (one prompt each). Received: {len(keyframes)} line(s)")
    return parse_walk({"keyframes": keyframes, "loop": bool(loop), "interpolation": interpolation})


def walk_to_text(walk) -> str:
    """A `Walk` as keyframe lines (the inverse of `parse_keyframes`)."""
    lines = []
    for k in walk.keyframes:
        prompt = k.prompt if isinstance(k.prompt, str) else " | ".join(f"{t}:{w:g}" for t, w in k.prompt)
        lines.append(f"{prompt} [seed={k.seed} frames={k.frames} easing={k.easing}]")
    return "\n".join(lines)
