"""The Animate tab: keyframe lines -> a walk -> `sdanim.animate`, with live frames, Stop
and resume, walk files, and a plot of how evenly the walk moves."""

from __future__ import annotations

import glob
import json
import os
import threading

from sdanim.config.choices import INTERPOLATIONS, SPACINGS
from sdanim.config.export import ExportSettings
from sdanim.core.interpolation import EASINGS
from sdanim.core.keyframes import load_walk
from sdanim.frontends.ui.common import (
    EXAMPLE_KEYFRAMES, KEYFRAMES_HELP, AppContext, Stopped, digest, friendly, gallery, parse_keyframes,
    sampling_inputs, walk_to_text,
)
from sdanim.render.export import check_output
from sdanim.render.plots import smoothness_figure
from sdanim.render.store import FrameStore
from sdanim.tasks import walks


def _compare(out_dir: str, walk_record: dict, current: str, report: dict) -> dict:
    """This render's smoothness, and that of every other render of the same walk in the
    output folder (another spacing, sampler or interpolation), for one plot."""
    reports = {"this render": report}
    for path in sorted(glob.glob(os.path.join(out_dir, "walk-*_frames", "manifest.json"))):
        if os.path.dirname(path) == current:
            continue
        try:
            with open(path, encoding="utf-8") as f:
                other = json.load(f)
        except (OSError, ValueError):
            continue
        if other.get("walk") == walk_record and "smoothness" in other:
            label = ", ".join(f"{k}={v}" for k, v in (("spacing", other.get("timing", {}).get("spacing")),
                                                       ("sampler", other.get("render", {}).get("scheduler"))) if v)
            reports[label or os.path.basename(os.path.dirname(path))] = other["smoothness"]
    return reports


def build(context: AppContext):
    """The tab's widgets and events. Returns the Render event (tests wait on it)."""
    import gradio as gr

    with gr.Row():
        with gr.Column(scale=3):
            keyframes = gr.Textbox(EXAMPLE_KEYFRAMES, lines=5, label="Keyframes", info=KEYFRAMES_HELP, elem_id="keyframes")
            negative = gr.Textbox("", label="Negative prompt")
        with gr.Column(scale=2):
            with gr.Row():
                seed = gr.Number(value=42, precision=0, label="Seed")
                frames = gr.Number(value=12, precision=0, label="Frames to the next keyframe", elem_id="frames")
                fps = gr.Number(value=12, label="fps")
            with gr.Row():
                interpolation = gr.Dropdown(list(INTERPOLATIONS), value="slerp", label="Interpolation")
                noise = gr.Dropdown(["fixed", "per keyframe"], value="fixed", label="Noise")
                easing = gr.Dropdown(list(EASINGS), value="linear", label="Easing")
                spacing = gr.Dropdown(list(SPACINGS), value="linear", label="Spacing")
            with gr.Row():
                loop = gr.Checkbox(False, label="Loop back to the first")
                ping_pong = gr.Checkbox(False, label="Ping-pong")
                fmt = gr.Dropdown(["gif", "mp4"], value="gif", label="Format")
    size, sampler, steps, guidance, batch = sampling_inputs(context)
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
            smooth = gr.Plot(label="Consecutive-frame distances (smoothness)", elem_id="smoothness")
            files = gr.File(label="Downloads", file_count="multiple")
    with gr.Row():
        walk_in = gr.File(label="Load a walk file (.yaml / .json)", file_types=[".yaml", ".yml", ".json"])
        walk_btn = gr.Button("Save these keyframes as a walk file")
        walk_out = gr.File(label="Walk file")

    @friendly
    def render(kf, neg, seed_, frames_, fps_, interp, noise_, easing_, spacing_, loop_, pp, fmt_,
               size_, sampler_, steps_, guidance_, batch_, progress=gr.Progress()):
        walk = parse_keyframes(kf, seed_, frames_, easing_, loop_, interp, noise_)
        context.limits.check_frames(len(walk))
        settings = context.settings(size_, steps_, guidance_, sampler_, batch_)
        export = ExportSettings(fps=fps_, ping_pong=pp, sheet=True)
        out = os.path.join(context.out_dir, f"walk-{digest(walk.record(), neg, spacing_, settings.record())}.{fmt_}")
        check_output(export, out)
        model = context.model(settings, gr.Info)
        total = len(walk)
        store = FrameStore(os.path.splitext(out)[0] + "_frames")
        context.stop.clear()
        state: dict = {"latest": []}

        def on_batch(indices, images):
            state["latest"] = ([(img, i) for i, img in zip(indices, images)] + state["latest"])[:8]
            if context.stop.is_set():
                raise Stopped()

        def run():
            try:
                state["result"] = walks.animate(walk, out=out, settings=settings, export=export, model=model,
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
            yield gallery(state["latest"]), gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), \
                f"Rendering: {done} of {total} frames on disk"
        error = state.get("error")
        if isinstance(error, Stopped):
            done = sum(store.has(i) for i in range(total))
            yield gallery(state["latest"]), gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), \
                f"Stopped: {done} of {total} frames kept. Press Render with the same settings to resume."
            return
        if error is not None:
            raise error
        result = state["result"]
        manifest = os.path.join(result.frames_dir, "manifest.json")
        reused = total - result.rendered
        figure = smoothness_figure(_compare(context.out_dir, walk.record(), result.frames_dir, result.smoothness))
        yield (gallery(state["latest"] or [(f, i) for i, f in list(enumerate(result.frames))[-8:]]),
               gr.update(value=out if fmt_ == "gif" else None, visible=fmt_ == "gif"),
               gr.update(value=out if fmt_ == "mp4" else None, visible=fmt_ == "mp4"),
               result.sheet, figure, [out, result.sheet, manifest],
               f"Done: {result.rendered} frames rendered, {reused} already on disk; {out}")

    inputs = [keyframes, negative, seed, frames, fps, interpolation, noise, easing, spacing, loop, ping_pong,
              fmt, size, sampler, steps, guidance, batch]
    event = render_btn.click(render, inputs, [newest, gif, video, sheet, smooth, files, status],
                             api_name="render", concurrency_limit=1, concurrency_id="model")

    def stop_render():
        context.stop.set()
        return "Stopping after the current batch; every frame rendered so far is kept."

    stop_btn.click(stop_render, None, status, queue=False)

    @friendly
    def load_walk_file(path, seed_):
        walk = load_walk(path, int(seed_))
        return walk_to_text(walk), walk.loop, walk.interpolation, "per keyframe"

    walk_in.upload(load_walk_file, [walk_in, seed], [keyframes, loop, interpolation, noise])

    @friendly
    def save_walk_file(kf, seed_, frames_, easing_, loop_, interp, noise_):
        import yaml

        walk = parse_keyframes(kf, seed_, frames_, easing_, loop_, interp, noise_)
        path = os.path.join(context.out_dir, f"walk-{digest(walk.record())}.yaml")
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(walk.record(), f, sort_keys=False, allow_unicode=True)
        return path

    walk_btn.click(save_walk_file, [keyframes, seed, frames, easing, loop, interpolation, noise], walk_out)
    return event
