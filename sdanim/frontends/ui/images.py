"""The image tabs: Generate, Image to image (with inpaint and outpaint), Image morph, Steps."""

from __future__ import annotations

import hashlib
import os

import numpy as np

from sdanim.config.errors import check
from sdanim.core.keyframes import parse_prompt_text
from sdanim.core.pixels import extend_canvas
from sdanim.formats.digest import data_key
from sdanim.formats.images import load_image
from sdanim.frontends.ui.common import AppContext, control_inputs, control_specs, friendly, sampling_inputs
from sdanim.tasks import images, walks

QUEUE = dict(concurrency_limit=1, concurrency_id="model")  # every model-using event: one queue


def generate_tab(context: AppContext) -> None:
    import gradio as gr

    prompt = gr.Textbox("a ford truck on a dirt road", label="Prompt (a mix: a rabbit:0.5 | a frog:0.5)")
    negative = gr.Textbox("", label="Negative prompt")
    with gr.Row():
        seed = gr.Number(value=4, precision=0, label="Seed of the first image (image k: seed + k)")
        count = gr.Number(value=4, precision=0, label="Images", minimum=1)
    sampling = sampling_inputs(context)
    control = control_inputs(context)
    button = gr.Button("Generate", variant="primary")
    out = gr.Gallery(label="Images", columns=4, format="png")  # lossless (Gradio's default is WebP)

    @friendly
    def generate(prompt_, neg, seed_, count_, size_, sampler_, steps_, guidance_, batch_, net_=None, picture_=None,
                 preprocess_="canny", scale_=1.0, start_=0.0, end_=1.0, guess_=False):
        # The ControlNet inputs have defaults, so API callers that send none still work.
        context.limits.check_images(int(count_))
        settings = context.settings(size_, steps_, guidance_, sampler_, batch_)
        nets = control_specs(context, net_, picture_, preprocess_, scale_, start_, end_, guess_)
        context.check_disk()
        result = images.generate(parse_prompt_text(prompt_), num_images=int(count_), seed=int(seed_), settings=settings,
                                 negative_prompt=neg or None, out_dir=context.out_dir,
                                 model=lambda: context.model(settings, gr.Info), progress=False, controlnets=nets)
        return [(img, f"seed {s}") for img, s in zip(result.images, result.seeds)]

    button.click(generate, [prompt, negative, seed, count, *sampling, *control], out, api_name="generate", **QUEUE)


def edit_tab(context: AppContext) -> None:
    import gradio as gr

    with gr.Row():
        # Uploads arrive as files and go through sdanim's loader (orientation, bit depth,
        # colour modes, transparency over white: `load_image`).
        image = gr.Image(label="Image", type="filepath")
        editor = gr.ImageEditor(label="Inpaint: paint the area to redraw", type="numpy",
                                brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"))
    prompt = gr.Textbox("a wooden carving", label="Prompt")
    with gr.Row():
        strength = gr.Slider(0, 1, value=0.6, label="Strength (img2img)")
        seed = gr.Number(value=1, precision=0, label="Seed")
        border = gr.Number(value=64, precision=0, label="Outpaint border (each side, multiple of 64)")
    sampling = sampling_inputs(context)
    with gr.Row():
        i2i_btn = gr.Button("Image to image", variant="primary")
        inpaint_btn = gr.Button("Inpaint")
        outpaint_btn = gr.Button("Outpaint")
    out = gr.Gallery(label="Result", columns=2, format="png")

    def fitted(picture, size_, sampler_, steps_, guidance_, batch_):
        check(picture is not None, "upload an image first. Received: image=None")
        return context.settings(size_, steps_, guidance_, sampler_, batch_)

    @friendly
    def img2img(picture, prompt_, strength_, seed_, size_, sampler_, steps_, guidance_, batch_):
        settings = fitted(picture, size_, sampler_, steps_, guidance_, batch_)
        picture = load_image(picture, "image")
        result = images.img2img(picture, prompt_, strength=float(strength_), seed=int(seed_), settings=settings,
                                out_dir=context.out_dir, model=context.model(settings, gr.Info), progress=False)
        return list(result.images)

    @friendly
    def inpaint(painted, prompt_, seed_, size_, sampler_, steps_, guidance_, batch_):
        check(painted is not None and painted.get("background") is not None,
              "upload an image into the inpaint editor and paint over the area to redraw. Received: no image")
        picture = load_image(np.asarray(painted["background"]), "image")  # transparency over white
        layers = [np.asarray(layer) for layer in painted.get("layers") or []]
        check(layers and any(layer[..., -1].any() for layer in layers),
              "paint over the area to redraw with the brush. Received: an empty mask")
        mask = (np.max([layer[..., -1] for layer in layers], axis=0) > 0).astype(np.uint8) * 255
        settings = fitted(picture, size_, sampler_, steps_, guidance_, batch_)
        result = images.inpaint(picture, mask, prompt_, seed=int(seed_), settings=settings, out_dir=context.out_dir,
                                model=context.model(settings, gr.Info), progress=False)
        return list(result.images)

    @friendly
    def outpaint(picture, prompt_, seed_, border_, size_, sampler_, steps_, guidance_, batch_):
        check(picture is not None, "upload an image first. Received: image=None")
        picture = load_image(picture, "image")
        b = int(border_)
        canvas, _ = extend_canvas(picture, b, b, b, b)
        settings = context.settings(f"{canvas.shape[1]}x{canvas.shape[0]}", steps_, guidance_, sampler_, batch_)
        result = images.outpaint(picture, prompt_, left=b, right=b, top=b, bottom=b, seed=int(seed_), settings=settings,
                                 out_dir=context.out_dir, model=context.model(settings, gr.Info), progress=False)
        return list(result.images)

    i2i_btn.click(img2img, [image, prompt, strength, seed, *sampling], out, api_name="img2img", **QUEUE)
    inpaint_btn.click(inpaint, [editor, prompt, seed, *sampling], out, api_name="inpaint", **QUEUE)
    outpaint_btn.click(outpaint, [image, prompt, seed, border, *sampling], out, api_name="outpaint", **QUEUE)


def image_morph_tab(context: AppContext) -> None:
    import gradio as gr

    with gr.Row():
        first = gr.Image(label="Image A", type="filepath")
        last = gr.Image(label="Image B", type="filepath")
    with gr.Row():
        prompt = gr.Textbox("", label="Prompt guiding the redraw (optional)")
        frames = gr.Number(value=12, precision=0, label="Frames")
        strength = gr.Slider(0.05, 1, value=0.5, label="Strength")
    sampling = sampling_inputs(context)
    button = gr.Button("Morph", variant="primary")
    out = gr.Image(label="Image morph", type="filepath")

    @friendly
    def image_morph(a, b, prompt_, count, strength_, size_, sampler_, steps_, guidance_, batch_):
        check(a is not None and b is not None, "upload both images. Received: a missing image")
        a, b = load_image(a, "image_a"), load_image(b, "image_b")
        settings = context.settings(size_, steps_, guidance_, sampler_, batch_)
        pixels = [hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest() for x in (a, b)]
        name = data_key(pixels, prompt_, count, strength_, settings.record())
        context.check_disk()
        result = walks.image_morph(a, b, prompt_, out=os.path.join(context.out_dir, f"image-morph-{name}.gif"),
                                   frames=int(count), strength=float(strength_), settings=settings,
                                   model=lambda: context.model(settings, gr.Info), progress=False,
                                   limits=context.limits)
        return result.out

    button.click(image_morph, [first, last, prompt, frames, strength, *sampling], out, api_name="image_morph", **QUEUE)


def steps_tab(context: AppContext) -> None:
    import gradio as gr

    prompt = gr.Textbox("a lighthouse in a storm", label="Prompt")
    seed = gr.Number(value=4, precision=0, label="Seed")
    sampling = sampling_inputs(context)
    button = gr.Button("Show the steps", variant="primary")
    out = gr.Image(label="The predicted image after each shown step", type="filepath")

    @friendly
    def steps_view(prompt_, seed_, size_, sampler_, steps_, guidance_, batch_):
        settings = context.settings(size_, steps_, guidance_, sampler_, 1)
        out_path = os.path.join(context.out_dir, f"steps-{data_key(prompt_, seed_, settings.record())}.gif")
        result = images.denoising_steps(prompt_, seed=int(seed_), settings=settings, out=out_path,
                                        model=context.model(settings, gr.Info), progress=False)
        return result.strip

    button.click(steps_view, [prompt, seed, *sampling], out, **QUEUE)
