"""A browser app for morphs and the toolbox (Gradio Blocks), on sdanim's run API.

    python -m sdanim ui [--weights ...] [--port N] [--share] [--listen] [--auth USER:PASS]
    sdanim.ui.launch(model=model)          # a notebook: the app inline in Jupyter / Colab

    page -> checked settings (RenderSettings, ExportSettings, a Walk) -> one model, loaded
    once (another only for another size, with a message) -> sdanim.animate / generate /
    img2img / ... (one render at a time: Gradio's queue shows the others their place)
    -> frames on disk -> the page (newest frames while rendering, then the video)

The app adds only widgets and queueing: every check and every render is the same code
the CLI and the notebooks call. It runs offline: no analytics, system fonts only, and
it binds 127.0.0.1 unless `listen` or `share` is given. `pip install "sdanim[ui]"`.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import os
import re
import threading
from typing import Optional

import numpy as np

from sdanim.errors import SdanimError, check
from sdanim.run import ModelSpec

SIZES = ("512x512", "768x512", "512x768", "640x640", "384x384", "256x256", "128x128", "64x64")
KEYFRAMES_HELP = (
    "One keyframe per line: the prompt, then optionally [seed=1 frames=24 easing=ease-in-out] "
    "(frames to the next keyframe). A weighted mix: a rabbit:0.5 | a frog:0.5"
)
EXAMPLE_KEYFRAMES = "a ford truck on a dirt road, mountains [seed=42 frames=12]\nan electric car in a city, skyline"


class Stopped(Exception):
    """Raised from a render's batch callback when the user pressed Stop."""


def parse_keyframes(text: str, seed: int, frames: int, easing: str, loop: bool, interpolation: str, noise: str):
    """The Animate tab's keyframe lines -> a checked `Walk` (errors name the line)."""
    from sdanim.keyframes import parse_prompt_text, parse_walk

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
            "seed": int(seed) if noise == "fixed" else options.get("seed", int(seed) + i),
            "frames": options.get("frames", int(frames)),
            "easing": options.get("easing", easing),
        })
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


class ModelHolder:
    """One model for the app, reused; another is loaded (and the old one dropped) only
    for another image size, with a message. A model handed in without a spec is the only one."""

    def __init__(self, model=None, spec: Optional[ModelSpec] = None):
        if spec is None and model is not None and hasattr(model, "weights") and hasattr(model, "version"):
            spec = ModelSpec(version=model.version, weights=model.weights, precision=model.precision,
                             loras=tuple(getattr(model, "loras", ())))
        self.model = model
        self.spec = spec if (spec is not None or model is not None) else ModelSpec()
        self.lock = threading.Lock()

    def get(self, settings, notify=print):
        with self.lock:
            if self.model is not None and (self.model.height, self.model.width) == (settings.height, settings.width):
                return self.model
            check(self.spec is not None,
                  f"this app's model is built for {self.model.width}x{self.model.height}; choose that size. "
                  f"Received: size={settings.width}x{settings.height}")
            notify(f"Loading the model for {settings.width}x{settings.height} (about a minute on a GPU, "
                   "more on a CPU); it is kept for the next renders.")
            self.model = None
            gc.collect()
            self.model = self.spec.load(settings.height, settings.width)
            return self.model

    def use(self, weights: str, loras: str) -> str:
        """Switches the weight source and/or LoRAs (comma-separated FILE[:SCALE]). Checked
        first; LoRAs alone change in place (no rebuild), new weights load at the next render."""
        import dataclasses

        from sdanim.lora import as_loras, check_lora_files
        from sdanim.models import weight_source_kind

        weights = str(weights or "").strip()
        check(self.spec is not None,
              "this app was started with a model object of its own; start it with --weights "
              f"(or launch(spec=...)) to switch weights. Received: weights={weights!r}")
        weights = weights or self.spec.weights
        check(weight_source_kind(weights) in ("keras-cv", "random") or os.path.exists(weights),
              "weights must be keras-cv, random, a folder of .h5 files or a checkpoint that exists. "
              f"Received: weights={weights!r}")  # here, not a minute into the next render
        wanted = check_lora_files(as_loras([x.strip() for x in str(loras or "").split(",") if x.strip()]))
        with self.lock:
            if weights == self.spec.weights:
                self.spec = dataclasses.replace(self.spec, loras=wanted)
                if self.model is not None and self.model.loras != wanted:
                    self.model.set_loras(wanted)
                return f"Using {weights} with {len(wanted)} LoRA(s); the loaded model was changed in place."
            self.spec = dataclasses.replace(self.spec, weights=weights, version=None, loras=wanted)
            self.model = None
            gc.collect()
            return f"Using {weights} with {len(wanted)} LoRA(s): the model loads at the next render."


def _settings(size: str, steps, guidance, sampler: str, batch):
    from sdanim.settings import RenderSettings, parse_size

    height, width = parse_size(size)
    return RenderSettings(height=height, width=width, num_steps=int(steps) if steps else None,
                          guidance_scale=float(guidance) if guidance not in (None, "") and float(guidance) > 0 else None,
                          scheduler=sampler, batch_size=int(batch))


def _gallery(items) -> list:
    """(image, frame index) pairs -> the gallery's (image, caption), in frame order."""
    return [(image, f"frame {i}") for image, i in sorted(items, key=lambda item: item[1])]


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def build_app(model=None, spec: Optional[ModelSpec] = None, out_dir: str = "outputs/ui"):
    """The Gradio Blocks app (not launched). `model`: a loaded model to use; `spec`: how
    to load one (or another size). Renders go to `out_dir`."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from sdanim import api, edits
    from sdanim.frames import FrameStore
    from sdanim.interpolation import EASINGS
    from sdanim.run import ExportSettings
    from sdanim.settings import SCHEDULERS

    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    holder = ModelHolder(model, spec)
    stop = threading.Event()
    default_size = f"{model.width}x{model.height}" if model is not None else "512x512"
    sizes = list(dict.fromkeys([default_size, *SIZES]))

    def friendly(fn):
        """Errors become one readable message in the page; the server keeps running."""
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

    def sampling_inputs():
        with gr.Row():
            size = gr.Dropdown(sizes, value=default_size, label="Size (WxH)", allow_custom_value=True)
            sampler = gr.Dropdown(list(SCHEDULERS), value="ddim", label="Sampler")
            steps = gr.Number(value=0, precision=0, label="Steps (0 = the sampler's default)")
            guidance = gr.Number(value=0, label="Guidance (0 = the sampler's default)")
            batch = gr.Number(value=4, precision=0, label="Batch size", minimum=1)
        return size, sampler, steps, guidance, batch

    with gr.Blocks(title="sdanim", analytics_enabled=False) as app:
        gr.Markdown("# sdanim: Stable Diffusion latent walks")
        with gr.Accordion("Model", open=False):
            with gr.Row():
                weights_box = gr.Textbox(holder.spec.weights if holder.spec else "the model given to launch()",
                                         label="Weights: keras-cv, random, a folder of .h5 files or a checkpoint")
                loras_box = gr.Textbox(", ".join(f"{x.path}:{x.scale:g}" for x in (holder.spec.loras if holder.spec else ())),
                                       label="LoRAs: FILE[:SCALE], comma-separated")
                use_btn = gr.Button("Use")
            model_status = gr.Markdown("")

            @friendly
            def use_model(weights, loras):
                return holder.use(weights, loras)

            use_btn.click(use_model, [weights_box, loras_box], model_status, api_name="use_model",
                          concurrency_limit=1, concurrency_id="model")
        with gr.Tab("Animate"):
            with gr.Row():
                with gr.Column(scale=3):
                    keyframes = gr.Textbox(EXAMPLE_KEYFRAMES, lines=5, label="Keyframes", info=KEYFRAMES_HELP,
                                           elem_id="keyframes")
                    negative = gr.Textbox("", label="Negative prompt")
                with gr.Column(scale=2):
                    with gr.Row():
                        seed = gr.Number(value=42, precision=0, label="Seed")
                        frames = gr.Number(value=12, precision=0, label="Frames to the next keyframe", elem_id="frames")
                        fps = gr.Number(value=12, label="fps")
                    with gr.Row():
                        interpolation = gr.Dropdown(["slerp", "linear"], value="slerp", label="Interpolation")
                        noise = gr.Dropdown(["fixed", "per keyframe"], value="fixed", label="Noise")
                        easing = gr.Dropdown(list(EASINGS), value="linear", label="Easing")
                        spacing = gr.Dropdown(["linear", "uniform"], value="linear", label="Spacing")
                    with gr.Row():
                        loop = gr.Checkbox(False, label="Loop back to the first")
                        ping_pong = gr.Checkbox(False, label="Ping-pong")
                        fmt = gr.Dropdown(["gif", "mp4"], value="gif", label="Format")
            size, sampler, steps, guidance, batch = sampling_inputs()
            with gr.Row():
                render_btn = gr.Button("Render", variant="primary", elem_id="render")
                stop_btn = gr.Button("Stop", elem_id="stop")
            status = gr.Markdown("", elem_id="status")
            with gr.Row():
                newest = gr.Gallery(label="Newest frames", columns=4, height=260, elem_id="newest", format="png")
                gif = gr.Image(label="Animation", type="filepath", elem_id="animation", visible=True)
                video = gr.Video(label="Animation", elem_id="video", visible=False)
            with gr.Row():
                sheet = gr.Image(label="Contact sheet", type="filepath")
                with gr.Column():
                    smooth = gr.JSON(label="Smoothness (consecutive-frame distances)")
                    files = gr.File(label="Downloads", file_count="multiple")
            with gr.Row():
                walk_in = gr.File(label="Load a walk file (.yaml / .json)", file_types=[".yaml", ".yml", ".json"])
                walk_btn = gr.Button("Save these keyframes as a walk file")
                walk_out = gr.File(label="Walk file")

            @friendly
            def render(kf, neg, seed_, frames_, fps_, interp, noise_, easing_, spacing_, loop_, pp, fmt_,
                       size_, sampler_, steps_, guidance_, batch_, progress=gr.Progress()):
                walk = parse_keyframes(kf, seed_, frames_, easing_, loop_, interp, noise_)
                settings = _settings(size_, steps_, guidance_, sampler_, batch_)
                export = ExportSettings(fps=fps_, ping_pong=pp, sheet=True)
                out = os.path.join(out_dir, f"walk-{_digest(walk.record(), neg, spacing_, settings.__dict__)}.{fmt_}")
                export.check_output(out)
                model_ = holder.get(settings, gr.Info)
                total = len(walk)
                store = FrameStore(os.path.splitext(out)[0] + "_frames")
                stop.clear()
                state: dict = {"latest": []}

                def on_batch(indices, images):
                    state["latest"] = ([(img, i) for i, img in zip(indices, images)] + state["latest"])[:8]
                    if stop.is_set():
                        raise Stopped()

                def run():
                    try:
                        state["result"] = api.animate(walk, out=out, settings=settings, export=export, model=model_,
                                                      negative_prompt=neg or None, spacing=spacing_, progress=False,
                                                      on_batch=on_batch)
                    except BaseException as error:  # noqa: BLE001 - handed to the page below
                        state["error"] = error

                worker = threading.Thread(target=run, daemon=True)
                worker.start()
                while worker.is_alive():
                    worker.join(0.5)
                    done = sum(store.has(i) for i in range(total)) if os.path.isdir(store.folder) else 0
                    progress((done, total), desc="rendering", unit="frames")
                    yield _gallery(state["latest"]), gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), \
                        f"Rendering: {done} of {total} frames on disk"
                error = state.get("error")
                if isinstance(error, Stopped):
                    done = sum(store.has(i) for i in range(total))
                    yield _gallery(state["latest"]), gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), \
                        f"Stopped: {done} of {total} frames kept. Press Render with the same settings to resume."
                    return
                if error is not None:
                    raise error
                result = state["result"]
                manifest = os.path.join(result.frames_dir, "manifest.json")
                reused = total - result.rendered
                yield (_gallery(state["latest"] or [(f, i) for i, f in list(enumerate(result.frames))[-8:]]),
                       gr.update(value=out if fmt_ == "gif" else None, visible=fmt_ == "gif"),
                       gr.update(value=out if fmt_ == "mp4" else None, visible=fmt_ == "mp4"),
                       result.sheet, result.smoothness, [out, result.sheet, manifest],
                       f"Done: {result.rendered} frames rendered, {reused} already on disk; {out}")

            inputs = [keyframes, negative, seed, frames, fps, interpolation, noise, easing, spacing, loop, ping_pong,
                      fmt, size, sampler, steps, guidance, batch]
            event = render_btn.click(render, inputs, [newest, gif, video, sheet, smooth, files, status],
                                     api_name="render", concurrency_limit=1, concurrency_id="model")

            def stop_render():
                stop.set()
                return "Stopping after the current batch; every frame rendered so far is kept."

            stop_btn.click(stop_render, None, status, queue=False)

            @friendly
            def load_walk_file(path, seed_):
                from sdanim.keyframes import load_walk

                walk = load_walk(path, int(seed_))
                return walk_to_text(walk), walk.loop, walk.interpolation, "per keyframe"

            walk_in.upload(load_walk_file, [walk_in, seed], [keyframes, loop, interpolation, noise])

            @friendly
            def save_walk_file(kf, seed_, frames_, easing_, loop_, interp, noise_):
                import yaml

                walk = parse_keyframes(kf, seed_, frames_, easing_, loop_, interp, noise_)
                path = os.path.join(out_dir, f"walk-{_digest(walk.record())}.yaml")
                with open(path, "w", encoding="utf-8") as f:
                    yaml.safe_dump(walk.record(), f, sort_keys=False, allow_unicode=True)
                return path

            walk_btn.click(save_walk_file, [keyframes, seed, frames, easing, loop, interpolation, noise], walk_out)

        with gr.Tab("Generate"):
            g_prompt = gr.Textbox("a ford truck on a dirt road", label="Prompt (a mix: a rabbit:0.5 | a frog:0.5)")
            g_negative = gr.Textbox("", label="Negative prompt")
            with gr.Row():
                g_seed = gr.Number(value=4, precision=0, label="Seed of the first image (image k: seed + k)")
                g_count = gr.Number(value=4, precision=0, label="Images", minimum=1)
            g_size, g_sampler, g_steps, g_guidance, g_batch = sampling_inputs()
            g_btn = gr.Button("Generate", variant="primary")
            g_out = gr.Gallery(label="Images", columns=4, format="png")  # lossless (Gradio's default is WebP)

            @friendly
            def generate(prompt, neg, seed_, count, size_, sampler_, steps_, guidance_, batch_):
                from sdanim.keyframes import parse_prompt_text

                settings = _settings(size_, steps_, guidance_, sampler_, batch_)
                result = api.generate(parse_prompt_text(prompt), num_images=int(count), seed=int(seed_),
                                      settings=settings, negative_prompt=neg or None, out_dir=out_dir,
                                      model=holder.get(settings, gr.Info), progress=False)
                return [(img, f"seed {s}") for img, s in zip(result.images, result.seeds)]

            g_btn.click(generate, [g_prompt, g_negative, g_seed, g_count, g_size, g_sampler, g_steps, g_guidance, g_batch],
                        g_out, api_name="generate", concurrency_limit=1, concurrency_id="model")

        with gr.Tab("Image to image"):
            with gr.Row():
                i_image = gr.Image(label="Image", type="numpy")
                i_mask = gr.ImageEditor(label="Inpaint: paint the area to redraw", type="numpy",
                                        brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"))
            i_prompt = gr.Textbox("a wooden carving", label="Prompt")
            with gr.Row():
                i_strength = gr.Slider(0, 1, value=0.6, label="Strength (img2img)")
                i_seed = gr.Number(value=1, precision=0, label="Seed")
                i_border = gr.Number(value=64, precision=0, label="Outpaint border (each side, multiple of 64)")
            i_size, i_sampler, i_steps, i_guidance, i_batch = sampling_inputs()
            with gr.Row():
                i2i_btn = gr.Button("Image to image", variant="primary")
                inpaint_btn = gr.Button("Inpaint")
                outpaint_btn = gr.Button("Outpaint")
            i_out = gr.Gallery(label="Result", columns=2, format="png")

            def _fitted_settings(image, size_, sampler_, steps_, guidance_, batch_):
                check(image is not None, "upload an image first. Received: image=None")
                return _settings(size_, steps_, guidance_, sampler_, batch_)

            @friendly
            def img2img(image, prompt, strength, seed_, size_, sampler_, steps_, guidance_, batch_):
                settings = _fitted_settings(image, size_, sampler_, steps_, guidance_, batch_)
                result = edits.img2img(image, prompt, strength=float(strength), seed=int(seed_), settings=settings,
                                       out_dir=out_dir, model=holder.get(settings, gr.Info), progress=False)
                return list(result.images)

            @friendly
            def inpaint(editor, prompt, seed_, size_, sampler_, steps_, guidance_, batch_):
                check(editor is not None and editor.get("background") is not None,
                      "upload an image into the inpaint editor and paint over the area to redraw. Received: no image")
                image = np.asarray(editor["background"])[..., :3]
                layers = [np.asarray(layer) for layer in editor.get("layers") or []]
                check(layers and any(layer[..., -1].any() for layer in layers),
                      "paint over the area to redraw with the brush. Received: an empty mask")
                mask = (np.max([layer[..., -1] for layer in layers], axis=0) > 0).astype(np.uint8) * 255
                settings = _fitted_settings(image, size_, sampler_, steps_, guidance_, batch_)
                result = edits.inpaint(image, mask, prompt, seed=int(seed_), settings=settings, out_dir=out_dir,
                                       model=holder.get(settings, gr.Info), progress=False)
                return list(result.images)

            @friendly
            def outpaint(image, prompt, seed_, border, size_, sampler_, steps_, guidance_, batch_):
                check(image is not None, "upload an image first. Received: image=None")
                from sdanim.images import extend_canvas

                b = int(border)
                canvas, _ = extend_canvas(image, b, b, b, b)
                size_ = f"{canvas.shape[1]}x{canvas.shape[0]}"
                settings = _settings(size_, steps_, guidance_, sampler_, batch_)
                result = edits.outpaint(image, prompt, left=b, right=b, top=b, bottom=b, seed=int(seed_),
                                        settings=settings, out_dir=out_dir, model=holder.get(settings, gr.Info),
                                        progress=False)
                return list(result.images)

            common = [i_size, i_sampler, i_steps, i_guidance, i_batch]
            i2i_btn.click(img2img, [i_image, i_prompt, i_strength, i_seed, *common], i_out, concurrency_limit=1, concurrency_id="model")
            inpaint_btn.click(inpaint, [i_mask, i_prompt, i_seed, *common], i_out, concurrency_limit=1, concurrency_id="model")
            outpaint_btn.click(outpaint, [i_image, i_prompt, i_seed, i_border, *common], i_out, concurrency_limit=1, concurrency_id="model")

        with gr.Tab("Image morph"):
            with gr.Row():
                m_a = gr.Image(label="Image A", type="numpy")
                m_b = gr.Image(label="Image B", type="numpy")
            with gr.Row():
                m_prompt = gr.Textbox("", label="Prompt guiding the redraw (optional)")
                m_frames = gr.Number(value=12, precision=0, label="Frames")
                m_strength = gr.Slider(0.05, 1, value=0.5, label="Strength")
            m_size, m_sampler, m_steps, m_guidance, m_batch = sampling_inputs()
            m_btn = gr.Button("Morph", variant="primary")
            m_out = gr.Image(label="Image morph", type="filepath")

            @friendly
            def image_morph(a, b, prompt, count, strength, size_, sampler_, steps_, guidance_, batch_):
                check(a is not None and b is not None, "upload both images. Received: a missing image")
                settings = _settings(size_, steps_, guidance_, sampler_, batch_)
                out = os.path.join(out_dir, f"image-morph-{_digest(str(np.asarray(a).sum()), str(np.asarray(b).sum()), prompt, count, strength)}.gif")
                result = edits.image_morph(a, b, prompt, out=out, frames=int(count), strength=float(strength),
                                           settings=settings, model=holder.get(settings, gr.Info), progress=False)
                return result.out

            m_btn.click(image_morph, [m_a, m_b, m_prompt, m_frames, m_strength, m_size, m_sampler, m_steps, m_guidance,
                                      m_batch], m_out, concurrency_limit=1, concurrency_id="model")

        with gr.Tab("Steps"):
            s_prompt = gr.Textbox("a lighthouse in a storm", label="Prompt")
            s_seed = gr.Number(value=4, precision=0, label="Seed")
            s_size, s_sampler, s_steps, s_guidance, s_batch = sampling_inputs()
            s_btn = gr.Button("Show the steps", variant="primary")
            s_out = gr.Image(label="The predicted image after each shown step", type="filepath")

            @friendly
            def steps_view(prompt, seed_, size_, sampler_, steps_, guidance_, batch_):
                settings = _settings(size_, steps_, guidance_, sampler_, 1)
                out = os.path.join(out_dir, f"steps-{_digest(prompt, seed_, settings.__dict__)}.gif")
                result = edits.denoising_steps(prompt, seed=int(seed_), settings=settings, out=out,
                                               model=holder.get(settings, gr.Info), progress=False)
                return result.strip

            s_btn.click(steps_view, [s_prompt, s_seed, s_size, s_sampler, s_steps, s_guidance, s_batch], s_out,
                        concurrency_limit=1, concurrency_id="model")

    # Every event that uses the model shares one queue ("model"): one render at a time.
    app.queue(default_concurrency_limit=1)
    app.sdanim_out_dir = out_dir
    app.sdanim_render_event = event
    return app


def launch(model=None, spec: Optional[ModelSpec] = None, out_dir: str = "outputs/ui", port: Optional[int] = None,
           share: bool = False, listen: bool = False, auth: Optional[tuple] = None, inline: Optional[bool] = None,
           prevent_thread_lock: Optional[bool] = None):
    """Starts the app. In a notebook it shows inline (Jupyter, Colab) and returns at once.

    Args:
        model: a loaded model (`sdanim.load_model`) to use; None loads one on the first
            render (from `spec`, default KerasCV's weights) so the page opens at once.
        spec: `ModelSpec` for loading (and for another image size).
        out_dir: str. Where renders go. Defaults to "outputs/ui".
        port: int or None. Defaults to Gradio's (7860, or the next free one).
        share: bool. A public gradio.live link (needs the internet). Defaults to False.
        listen: bool. Bind 0.0.0.0 (reachable from the network) instead of 127.0.0.1.
        auth: (user, password) or None.

    Returns:
        The Gradio app (`app.local_url`; `app.close()` stops it).

    Example:
    ```python
    model = sdanim.load_model(weights="keras-cv", height=512, width=512)
    app = sdanim.ui.launch(model=model)
    ```
    """
    app = build_app(model, spec, out_dir)
    in_notebook = _in_notebook()
    import gradio as gr

    app.launch(
        server_name="0.0.0.0" if listen else "127.0.0.1", server_port=port, share=share, auth=auth,
        inline=in_notebook if inline is None else inline,
        prevent_thread_lock=in_notebook if prevent_thread_lock is None else prevent_thread_lock,
        allowed_paths=[app.sdanim_out_dir], show_error=True, quiet=False,
        theme=gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                font_mono=["ui-monospace", "Consolas", "monospace"]),
        footer_links=[],
    )
    return app


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython

        shell = get_ipython()
        return shell is not None and "IPKernelApp" in getattr(shell, "config", {})
    except ImportError:
        return False


__all__ = ["build_app", "launch", "parse_keyframes", "walk_to_text", "ModelHolder", "Stopped"]
