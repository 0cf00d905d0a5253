"""A browser app for morphs and the toolbox (Gradio Blocks), on sdanim's task functions.

    python -m sdanim ui [--weights ...] [--port N] [--share] [--listen] [--auth USER:PASS]
    sdanim.ui.launch(model=model)          # a notebook: the app inline in Jupyter / Colab

    page -> checked settings (RenderSettings, ExportSettings, a Walk) within the server's
    limits -> one model, loaded once (another only for another size, with a message) ->
    sdanim.animate / generate / img2img / ... (one render at a time: Gradio's queue shows
    the others their place) -> frames on disk -> the page

The app adds only widgets, queueing and what visitors may ask (`sdanim.frontends.ui.model`):
every check and every render is the same code the CLI and the notebooks call. It runs
offline: no analytics, system fonts only. It binds 127.0.0.1 unless `listen` or `share`
is given; then it is in network mode: visitors choose among the weights and LoRAs the
operator named at start, every request is bounded by `Limits`, and only files under
the output folder can be downloaded. `pip install "sdanim[ui]"`.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from sdanim.config.choices import MODELS
from sdanim.config.errors import SdanimError
from sdanim.config.limits import NETWORK_LIMITS, Limits
from sdanim.frontends.ui import animate, images
from sdanim.frontends.ui.common import AppContext, first_sampler, friendly
from sdanim.frontends.ui.model import AUTO, Access, ModelHolder, offered_models
from sdanim.model.spec import ModelSpec


def _model_section(context: AppContext):
    """Switching the model, its weights and LoRAs: a model choice and typed paths in a
    local app, the operator's offer by name in a network app (the model comes with the
    weights; the endpoint accepts nothing else). Returns what `_wire_model_section`
    connects once every tab's sampler exists."""
    import gradio as gr

    holder = context.holder
    with gr.Accordion("Model", open=False):
        with gr.Row():
            if holder.access.network:
                current = next((n for n, s in holder.access.weights.items() if holder.spec and s == holder.spec.weights), None)
                weights = gr.Dropdown(list(holder.access.weights), value=current, label="Weights (offered by this app)")
                loras = gr.Dropdown(list(holder.access.loras), value=[n for n, p in holder.access.loras.items()
                                                                       if holder.spec and any(x.path == p for x in holder.spec.loras)],
                                    multiselect=True, label="LoRAs (offered by this app)")
                model = gr.State(AUTO)  # the offer names each weight source's model
            else:
                model = gr.Dropdown([AUTO, *MODELS], value=(holder.spec.version if holder.spec else None) or AUTO,
                                    label="Model (auto: the one the weights hold)")
                weights = gr.Textbox(holder.spec.weights if holder.spec else "the model given to launch()",
                                     label="Weights: keras-cv, random, a folder of .h5 files, a checkpoint, an SD3 file or folder")
                loras = gr.Textbox(", ".join(f"{x.path}:{x.scale:g}" for x in (holder.spec.loras if holder.spec else ())),
                                   label="LoRAs: FILE[:SCALE], comma-separated")
            button = gr.Button("Use")
        status = gr.Markdown("")
    return button, [weights, loras, model], status


def _wire_model_section(context: AppContext, section) -> None:
    """The Model section's button: switches (checked first) and, when the family changes,
    sets every tab's sampler to the new family's (SD3 takes flow_euler only)."""
    import gradio as gr

    button, inputs, status = section
    holder = context.holder

    @friendly
    def use_model(weights_, loras_, model_):
        family = holder.family
        message = holder.use(weights_, loras_, model_)
        changed = holder.family != family
        return (message, *[gr.update(value=first_sampler(holder.family)) if changed else gr.update()
                           for _ in context.samplers])

    button.click(use_model, inputs, [status, *context.samplers], api_name="use_model", concurrency_limit=1,
                 concurrency_id="model")


def build_app(model=None, spec: Optional[ModelSpec] = None, out_dir: str = "outputs/ui",
              access: Optional[Access] = None, limits: Optional[Limits] = None):
    """The Gradio Blocks app (not launched). `model`: a loaded model to use; `spec`: how
    to load one (or another size); `access`: what visitors may choose (default: a local
    app); `limits`: what one request may ask for. Renders go to `out_dir`."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    holder = ModelHolder(model, spec, access)
    default_size = f"{model.width}x{model.height}" if model is not None else "512x512"
    context = AppContext(holder, limits or Limits(), out_dir, default_size)

    with gr.Blocks(title="sdanim", analytics_enabled=False) as app:
        gr.Markdown("# sdanim: Stable Diffusion latent walks")
        section = _model_section(context)
        with gr.Tab("Animate"):
            event = animate.build(context)
        with gr.Tab("Generate"):
            images.generate_tab(context)
        with gr.Tab("Image to image"):
            images.edit_tab(context)
        with gr.Tab("Image morph"):
            images.image_morph_tab(context)
        with gr.Tab("Steps"):
            images.steps_tab(context)
        _wire_model_section(context, section)

    # Every event that uses the model shares one queue ("model"): one render at a time.
    app.queue(default_concurrency_limit=1)
    app.sdanim_out_dir = out_dir
    app.sdanim_render_event = event
    app.sdanim_context = context
    return app


def launch(model=None, spec: Optional[ModelSpec] = None, out_dir: str = "outputs/ui", port: Optional[int] = None,
           share: bool = False, listen: bool = False, auth: Optional[tuple] = None, inline: Optional[bool] = None,
           prevent_thread_lock: Optional[bool] = None, models_dir: Optional[str] = None,
           limits: Optional[Limits] = None, host: Optional[str] = None, controlnets=(), motion_modules=()):
    """Starts the app. In a notebook it shows inline (Jupyter, Colab) and returns at once.

    Args:
        model: a loaded model (`sdanim.load_model`) to use; None loads one on the first
            render (from `spec`, default KerasCV's weights) so the page opens at once.
        spec: `ModelSpec` for loading (and for another image size).
        out_dir: str. Where renders go; the only folder visitors can download from.
            Defaults to "outputs/ui".
        port: int or None. Defaults to Gradio's (7860, or the next free one).
        share: bool. A public gradio.live link (needs the internet). Network mode.
        listen: bool. Reachable from the network: binds 0.0.0.0. Network mode.
        auth: (user, password) or None. Without it a network app says so on stderr.
        models_dir: str or None. Network mode: its checkpoints and LoRAs are offered by
            name beside `spec`'s weights and LoRAs.
        limits: `Limits` or None: what one request may ask for. A local app has none but
            these; in network mode every limit left None is `NETWORK_LIMITS`'s (pass
            math.inf to lift one). Defaults to None.
        host: str or None. The address to bind; defaults to 0.0.0.0 with `listen`, else
            127.0.0.1 (tests bind a network-mode app to 127.0.0.1).
        controlnets: ControlNet files or folders offered to visitors by name (network
            mode, beside those in `models_dir`); a local app takes typed paths.
        motion_modules: AnimateDiff motion module files or folders offered by name
            (network mode, beside those in `models_dir`); a local app takes typed paths.

    Returns:
        The Gradio app (`app.local_url`; `app.close()` stops it).

    Example:
    ```python
    model = sdanim.load_model(weights="keras-cv", height=512, width=512)
    app = sdanim.ui.launch(model=model)
    ```
    """
    network = bool(listen or share)
    if models_dir is not None and not network:
        raise SdanimError(f"models_dir offers files to visitors of a network app; add --listen or --share. "
                          f"Received: models_dir={models_dir!r}")
    access = (offered_models(spec or ModelHolder(model).spec, models_dir, controlnets, motion_modules) if network
              else Access())
    if network and auth is None:
        print("sdanim: warning: the app is reachable from the network without --auth: anyone who reaches it can "
              "render on this machine and see every render in its output folder", file=sys.stderr)
    limits = limits or Limits()
    app = build_app(model, spec, out_dir, access, limits.over(NETWORK_LIMITS) if network else limits)
    in_notebook = _in_notebook()
    import gradio as gr

    app.launch(
        server_name=host or ("0.0.0.0" if listen else "127.0.0.1"), server_port=port, share=share, auth=auth,
        inline=in_notebook if inline is None else inline,
        prevent_thread_lock=in_notebook if prevent_thread_lock is None else prevent_thread_lock,
        allowed_paths=[app.sdanim_out_dir], show_error=True, quiet=False,
        max_file_size="50mb" if network else None,
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
