"""The Animate tab: keyframe lines -> a walk -> `sdanim.animate`, with live frames, Stop
and resume, walk files, and a plot of how evenly the walk moves."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import threading

from sdanim.config.choices import ATTENTION_INTERPS, AUDIO_MODES, INTERPOLATIONS, SPACINGS
from sdanim.config.export import ExportSettings
from sdanim.core.interpolation import EASINGS
from sdanim.formats.digest import data_key, file_sha256
from sdanim.formats.walk_files import load_walk
from sdanim.frontends.ui.common import (
    EXAMPLE_KEYFRAMES, KEYFRAMES_HELP, AppContext, Stopped, control_inputs, control_specs, friendly, gallery,
    motion_inputs, motion_spec, parse_keyframes, sampling_inputs, walk_to_text,
)
from sdanim.render.export import check_output
from sdanim.render.plots import smoothness_figure
from sdanim.render.store import FrameStore
from sdanim.tasks import walks


_ATTENTION_KEYS = ("attention", "attention_warmup")


def _path_only(walk_record: dict) -> dict:
    """A walk's record without how its frames attend: renders of one path, lerp or AID."""
    return {k: v for k, v in walk_record.items() if k not in _ATTENTION_KEYS}


def _label(manifest: dict) -> str:
    walk, timing, render = manifest.get("walk", {}), manifest.get("timing", {}), manifest.get("render", {})
    attention = walk.get("attention", "off")
    parts = [("attention", "lerp" if attention == "off" else f"{attention} (warm-up {walk.get('attention_warmup')})"),
             ("spacing", timing.get("spacing")), ("sampler", render.get("scheduler"))]
    return ", ".join(f"{k}={v}" for k, v in parts if v)


def _compare(out_dir: str, walk_record: dict, current: str, report: dict) -> dict:
    """This render's smoothness, and that of every other render of the same walk in the
    output folder (embedding lerp or attention interpolation, another spacing or
    sampler), for one plot: lerp vs attention side by side."""
    reports = {}
    this = None
    for path in sorted(glob.glob(os.path.join(out_dir, "walk-*_frames", "manifest.json"))):
        try:
            with open(path, encoding="utf-8") as f:
                other = json.load(f)
        except (OSError, ValueError):
            continue
        if os.path.dirname(path) == current:
            this = other
            continue
        if _path_only(other.get("walk", {})) == _path_only(walk_record) and "smoothness" in other:
            reports[_label(other) or os.path.basename(os.path.dirname(path))] = other["smoothness"]
    label = "this render" + (f" ({_label(this)})" if this else "")
    return {label: report, **reports}


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
                attention = gr.Dropdown(list(ATTENTION_INTERPS), value="off", label="Attention interpolation (AID)",
                                        info="off: embeddings only; fused (AID's default), inner, outer: gradual "
                                        "changes instead of hard cuts, about 1.2-1.5x the time")
                warmup = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="AID warm-up (fraction of steps)")
            with gr.Row():
                audio = gr.Audio(type="filepath", label="Audio that times the walk (MP4 only)", sources=["upload"])
                with gr.Column():
                    audio_mode = gr.Dropdown(list(AUDIO_MODES), value="loudness", label="Audio mode",
                                             info="loudness / onsets: speed; beats: keyframes on beats")
                    beats = gr.Number(value=4, precision=0, label="Beats per keyframe (beats mode)")
            with gr.Row():
                loop = gr.Checkbox(False, label="Loop back to the first")
                ping_pong = gr.Checkbox(False, label="Ping-pong")
                fmt = gr.Dropdown(["gif", "mp4"], value="gif", label="Format")
    size, sampler, steps, guidance, batch = sampling_inputs(context)
    control = control_inputs(context)
    motion = motion_inputs(context)
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
            audio_plot = gr.Image(label="Audio and the walk's speed", type="filepath", visible=False)
            files = gr.File(label="Downloads", file_count="multiple")
    with gr.Row():
        walk_in = gr.File(label="Load a walk file (.yaml / .json)", file_types=[".yaml", ".yml", ".json"])
        walk_btn = gr.Button("Save these keyframes as a walk file")
        walk_out = gr.File(label="Walk file")

    @friendly
    def render(kf, neg, seed_, frames_, fps_, interp, noise_, easing_, spacing_, loop_, pp, fmt_,
               size_, sampler_, steps_, guidance_, batch_, attention_="off", warmup_=0.5, audio_=None,
               audio_mode_="loudness", beats_=4, net_=None, picture_=None, preprocess_="canny", scale_=1.0,
               start_=0.0, end_=1.0, guess_=False, module_=None, window_=16, stride_=4, blend_="unet",
               progress=gr.Progress(), request=None):
        walk = parse_keyframes(kf, seed_, frames_, easing_, loop_, interp, noise_)
        walk = dataclasses.replace(walk, attention=attention_ or "off",
                                   attention_warmup=0.5 if warmup_ is None else float(warmup_))
        settings = context.settings(size_, steps_, guidance_, sampler_, batch_)
        timing = {} if not audio_ else {"audio": audio_, "audio_mode": audio_mode_ or "loudness",
                                         "beats_per_keyframe": int(beats_ or 4)}
        export = ExportSettings(fps=fps_, ping_pong=pp, sheet=True, **timing)
        sound = [file_sha256(audio_), audio_mode_, beats_] if audio_ else None
        nets = control_specs(context, net_, picture_, preprocess_, scale_, start_, end_, guess_)
        steer = [[dataclasses.replace(s, image=None), file_sha256(s.image)] for s in nets]  # the picture's bytes
        motion = motion_spec(context, module_, window_, stride_, blend_)
        moved = [] if motion is None else [dataclasses.asdict(motion)]  # (no motion: the names renders had before)
        key = data_key(walk.record(), neg, spacing_, settings.record(), sound, steer, *moved)
        out = os.path.join(context.out_dir, f"walk-{key}.{fmt_}")
        check_output(export, out)
        context.check_disk()

        def model():  # loaded by `animate` once the final plan is within the limits
            return context.model(settings, gr.Info)

        total = len(walk)
        store = FrameStore(os.path.splitext(out)[0] + "_frames")
        stop = context.stop(request)
        stop.clear()
        state: dict = {"latest": []}

        def on_batch(indices, images):
            state["latest"] = ([(img, i) for i, img in zip(indices, images)] + state["latest"])[:8]
            if stop.is_set():
                raise Stopped()

        def run():
            try:
                state["result"] = walks.animate(walk, out=out, settings=settings, export=export, model=model,
                                                negative_prompt=neg or None, spacing=spacing_, progress=False,
                                                on_batch=on_batch, limits=context.limits, controlnets=nets,
                                                motion=motion)
            except BaseException as error:  # noqa: BLE001 - handed to the page below
                state["error"] = error

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.5)
            done = sum(store.has(i) for i in range(total)) if os.path.isdir(store.folder) else 0
            progress((done, total), desc="rendering", unit="frames")
            yield gallery(state["latest"]), gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), \
                gr.update(), f"Rendering: {done} of {total} frames on disk"
        error = state.get("error")
        if isinstance(error, Stopped):
            done = sum(store.has(i) for i in range(total))
            yield gallery(state["latest"]), gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), \
                gr.update(), f"Stopped: {done} of {total} frames kept. Press Render with the same settings to resume."
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
               result.sheet, figure, [out, result.sheet, manifest] + ([result.audio_plot] if result.audio_plot else []),
               gr.update(value=result.audio_plot, visible=result.audio_plot is not None),
               f"Done: {result.rendered} frames rendered, {reused} already on disk; {out}"
               + (f" (tempo {result.tempo:.1f} BPM)" if result.tempo else ""))

    # New inputs go at the end: API clients that send the earlier ones keep working.
    inputs = [keyframes, negative, seed, frames, fps, interpolation, noise, easing, spacing, loop, ping_pong,
              fmt, size, sampler, steps, guidance, batch, attention, warmup, audio, audio_mode, beats, *control,
              *motion]
    # New outputs go before the status (clients read the status last).
    event = render_btn.click(render, inputs, [newest, gif, video, sheet, smooth, files, audio_plot, status],
                             api_name="render", concurrency_limit=1, concurrency_id="model")

    def stop_render(request=None):
        context.stop(request).set()  # this visitor's render only
        return "Stopping after the current batch; every frame rendered so far is kept."

    # Gradio hands a handler the visitor's request where its signature asks for one (the
    # module's postponed annotations are strings: the class itself is set here).
    render.__annotations__["request"] = stop_render.__annotations__["request"] = gr.Request

    stop_btn.click(stop_render, None, status, queue=False)

    @friendly
    def load_walk_file(path, seed_):
        walk = load_walk(path, int(seed_))
        return walk_to_text(walk), walk.loop, walk.interpolation, "per keyframe", walk.attention, walk.attention_warmup

    walk_in.upload(load_walk_file, [walk_in, seed], [keyframes, loop, interpolation, noise, attention, warmup])

    @friendly
    def save_walk_file(kf, seed_, frames_, easing_, loop_, interp, noise_, attention_="off", warmup_=0.5):
        import yaml

        walk = parse_keyframes(kf, seed_, frames_, easing_, loop_, interp, noise_)
        walk = dataclasses.replace(walk, attention=attention_ or "off",
                                   attention_warmup=0.5 if warmup_ is None else float(warmup_))
        path = os.path.join(context.out_dir, f"walk-{data_key(walk.record())}.yaml")
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(walk.record(), f, sort_keys=False, allow_unicode=True)
        return path

    walk_btn.click(save_walk_file, [keyframes, seed, frames, easing, loop, interpolation, noise, attention, warmup],
                   walk_out)
    return event
