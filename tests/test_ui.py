"""The browser app (sdanim.ui) on a tiny model: through its API with gradio_client, in a
real headless Chromium (Debian's package; every non-local request blocked), and launched
inside a notebook kernel."""

import io
import os
import shutil
import urllib.request

import numpy as np
import pytest
from PIL import Image

from conftest import free_port, missing, require

pytestmark = pytest.mark.once  # end to end, no tolerance: once per CI, not on every CPU path

HERE = os.path.dirname(os.path.abspath(__file__))
KEYFRAMES = "a red cube [seed=1 frames=4]\na blue sphere"
# render's inputs, in the Animate tab's order
ARGS = dict(kf=KEYFRAMES, neg="", seed=42, frames=4, fps=8, interp="slerp", noise="fixed", easing="linear",
            spacing="linear", loop=False, pp=False, fmt="gif", size="64x64", sampler="ddim", steps=2, guidance=0, batch=2,
            attention="off", warmup=0.5, audio=None, audio_mode="loudness", beats=4)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    require("gradio")
    from tiny import make_tiny_model

    import sdanim.ui as ui

    out = tmp_path_factory.mktemp("ui")
    app = ui.launch(model=make_tiny_model(attention=True), out_dir=str(out), port=free_port(), inline=False, prevent_thread_lock=True)
    yield app
    app.close()


def _frames_of(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as im:
        return im.n_frames


def test_api_renders_resumes_and_explains_bad_input(app):
    client_lib = require("gradio_client")
    client = client_lib.Client(app.local_url, verbose=False)
    args = dict(ARGS, kf="a green cone [seed=3 frames=3]\na yellow star")
    first = client.predict(*args.values(), api_name="/render")
    assert first[-1].startswith("Done: 4 frames rendered, 0 already on disk")
    with open(first[1]["value"], "rb") as f:
        assert _frames_of(f.read()) == 4
    again = client.predict(*args.values(), api_name="/render")
    assert again[-1].startswith("Done: 0 frames rendered, 4 already on disk")
    with pytest.raises(Exception, match=r"keyframes needs at least 2 lines \(one prompt each\)\. Received: 1 line\(s\)"):
        client.predict(*dict(args, kf="only one").values(), api_name="/render")
    with pytest.raises(Exception, match=r"this app's model is built for 64x64; choose that size\. Received: size=128x128"):
        client.predict(*dict(args, size="128x128").values(), api_name="/render")
    images = client.predict("a cat", "", 4, 3, "64x64", "ddim", 2, 0, 2, api_name="/generate")
    assert len(images) == 3
    # The same walk with attention interpolation: a render of its own, compared with the lerp one.
    aid = client.predict(*dict(args, attention="fused", warmup=1.0).values(), api_name="/render")
    assert aid[-1].startswith("Done: 4 frames rendered, 0 already on disk")
    import json

    with open(aid[5][2]["path"] if isinstance(aid[5][2], dict) else aid[5][2], encoding="utf-8") as f:
        walk = json.load(f)["walk"]
    assert walk["attention"] == "fused" and walk["attention_warmup"] == 1.0
    with pytest.raises(Exception, match=r"sideways is not in the list of choices"):
        client.predict(*dict(args, attention="sideways").values(), api_name="/render")
    # Motion modules from the Animate tab reach the render (this tiny model is not SD 1.x-shaped:
    # refused in one line, before anything is written).
    motion = [*args.values(), "", None, "canny", 1.0, 0.0, 1.0, False, "random", 8, 2, "unet"]
    with pytest.raises(Exception, match=r"motion modules are for SD 1.x"):
        client.predict(*motion, api_name="/render")


def _chromium() -> str:
    for name in ("chromium-headless-shell", "chromium"):
        path = shutil.which(name) or f"/usr/lib/chromium/{name}"
        if os.path.exists(path):
            return path
    missing("Chromium", "apt-get install chromium-headless-shell; .ci/run installs it")


def test_in_a_real_browser_offline(app, tmp_path):
    """Type two prompts, Render, check the GIF's frame count; Render again resumes (no
    frame rendered); a bad value shows its message and the page stays usable. Every
    request that is not to the app itself is blocked (and must not be needed)."""
    playwright = require("playwright.sync_api")
    executable = _chromium()
    outside = []

    def route(r):
        url = r.request.url
        if url.startswith(app.local_url.rstrip("/")) or url.startswith(("data:", "blob:")):
            r.continue_()
        else:
            outside.append(url)
            r.abort()

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.route("**/*", route)
        page.goto(app.local_url)
        page.locator("#keyframes textarea").fill(KEYFRAMES)
        page.locator("#frames input").fill("4")
        page.locator("#render").click()
        status = page.locator("#status")
        status.get_by_text("Done: 5 frames rendered, 0 already on disk").wait_for(timeout=120_000)
        src = page.locator("#animation img").get_attribute("src")
        with urllib.request.urlopen(src if src.startswith("http") else app.local_url.rstrip("/") + src) as r:
            assert _frames_of(r.read()) == 5
        page.screenshot(path=str(tmp_path / "animate.png"), full_page=True)
        if os.environ.get("SDANIM_UI_SCREENSHOT"):  # the README's screenshot
            page.screenshot(path=os.environ["SDANIM_UI_SCREENSHOT"], full_page=False)

        page.locator("#render").click()  # the same settings: resumes, renders nothing
        status.get_by_text("Done: 0 frames rendered, 5 already on disk").wait_for(timeout=60_000)

        page.locator("#keyframes textarea").fill("a red cube [seed=1]\na blue sphere")
        page.locator("#frames input").fill("0")
        page.locator("#render").click()
        page.get_by_text("keyframes[0].frames must be a whole number >= 1. Received: frames=0").first.wait_for(timeout=30_000)
        page.locator("#keyframes textarea").fill("a red cube [seed=1]\na blue sphere")  # frames from the field
        page.locator("#frames input").fill("3")
        page.locator("#render").click()
        status.get_by_text("Done: 4 frames rendered, 0 already on disk").wait_for(timeout=60_000)
        browser.close()
    assert (tmp_path / "animate.png").stat().st_size > 10_000
    assert outside == [], outside[:5]  # nothing fetched from a CDN, no analytics


@pytest.mark.slow
def test_launch_inside_a_notebook_kernel(tmp_path):
    """sdanim.ui.launch() in a Jupyter kernel: shown inline, returns at once, serves."""
    nbformat = require("nbformat")
    nbclient = require("nbclient")
    require("gradio")
    port = free_port()
    cells = [
        f"import sys; sys.path.insert(0, {HERE!r})\nfrom tiny import make_tiny_model\nimport sdanim.ui",
        f"app = sdanim.ui.launch(model=make_tiny_model(), out_dir={str(tmp_path / 'out')!r}, port={port})",
        "import urllib.request\nprint('status', urllib.request.urlopen(app.local_url).status)\napp.close()",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    shown = str(nb.cells[1].outputs)
    assert "iframe" in shown.lower() or "IFrame" in shown, shown[:500]  # inline in the notebook
    assert "status 200" in str(nb.cells[2].outputs)


def test_cli_ui_bad_input(capsys):
    from sdanim.frontends.cli import main

    assert main(["ui", "--auth", "nopassword"]) == 2
    assert capsys.readouterr().err == "sdanim: error: auth must be USER:PASS. Received: auth='nopassword'\n"
    assert main(["ui", "--port", "70000"]) == 2
    assert capsys.readouterr().err == "sdanim: error: port must be from 1 to 65535. Received: port=70000\n"


def test_keyframe_lines_round_trip():
    from sdanim.frontends.ui import parse_keyframes, walk_to_text

    walk = parse_keyframes("a barn [seed=3 frames=5 easing=ease-in]\na rabbit:0.5 | a frog:0.5\na forest", 42, 7,
                           "linear", True, "slerp", "per keyframe")
    assert [k.seed for k in walk.keyframes] == [3, 43, 44] and [k.frames for k in walk.keyframes] == [5, 7, 7]
    assert walk.keyframes[1].prompt == (("a rabbit", 0.5), ("a frog", 0.5)) and walk.loop
    again = parse_keyframes(walk_to_text(walk), 0, 1, "linear", True, "slerp", "per keyframe")
    assert again.record() == walk.record()
    fixed = parse_keyframes("a\nb", 9, 2, "linear", False, "slerp", "fixed")
    assert [k.seed for k in fixed.keyframes] == [9, 9]  # fixed noise: one seed for all, the Seed field's
    typed = parse_keyframes("a [seed=3]\nb", 9, 2, "linear", False, "slerp", "fixed")
    assert [k.seed for k in typed.keyframes] == [3, 3]  # a seed typed on a line is that noise's seed, not ignored
    with pytest.raises(Exception, match=r"the keyframe lines give seeds 3, 5, but noise 'fixed' draws one noise for every "
                                        r"frame: choose noise 'per keyframe'.*Received: seeds=\[3, 5\]"):
        parse_keyframes("a [seed=3]\nb [seed=5]", 9, 2, "linear", False, "slerp", "fixed")
    with pytest.raises(Exception, match=r"keyframe line 1: options are seed=N frames=N easing=NAME\. Received: 'speed=2'"):
        parse_keyframes("a [speed=2]\nb", 1, 2, "linear", False, "slerp", "fixed")


@pytest.mark.slow
def test_stop_keeps_frames_and_render_resumes(app):
    import re
    import time

    client_lib = require("gradio_client")
    client = client_lib.Client(app.local_url, verbose=False)
    other = client_lib.Client(app.local_url, verbose=False)  # another visitor, connected before the render starts
    # Long enough (301 frames, 4 steps each) that Stop lands mid-render on a loaded machine.
    args = dict(ARGS, kf="a slow walk [seed=5 frames=300]\nits end", batch=1, steps=4)
    job = client.submit(*args.values(), api_name="/render")
    deadline = time.time() + 120
    while time.time() < deadline:
        statuses = [out[-1] for out in job.outputs()]
        if any(re.match(r"Rendering: [1-9]", s or "") for s in statuses):
            break
        time.sleep(0.1)
    # Another visitor (another browser session) pressing Stop does not stop this render.
    other.predict(api_name="/stop_render")
    seen = len(job.outputs())
    while len(job.outputs()) < seen + 3 and not job.done():  # the render goes on for three more updates
        time.sleep(0.1)
    assert not job.done() or not job.result()[-1].startswith("Stopped"), job.result()[-1]
    client.predict(api_name="/stop_render")
    final = job.result()[-1]
    match = re.match(r"Stopped: (\d+) of 301 frames kept\. Press Render with the same settings to resume\.", final)
    assert match, final
    kept = int(match.group(1))
    assert 0 < kept < 301
    again = client.predict(*args.values(), api_name="/render")[-1]
    assert again.startswith(f"Done: {301 - kept} frames rendered, {kept} already on disk")


def test_image_tabs_through_the_api(app, tmp_path):
    client_lib = require("gradio_client")
    client = client_lib.Client(app.local_url, verbose=False)
    rng = np.random.default_rng(0)
    image = tmp_path / "image.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    other = tmp_path / "other.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(other)
    mask = np.zeros((64, 64, 4), np.uint8)
    mask[32:, :, :] = 255  # the painted stroke: the lower half
    Image.fromarray(mask).save(tmp_path / "mask.png")
    f = client_lib.handle_file
    common = ("64x64", "ddim", 2, 0, 1)
    assert len(client.predict(f(str(image)), "a carving", 0.6, 1, *common, api_name="/img2img")) == 1
    painted = client.predict({"background": f(str(image)), "layers": [f(str(tmp_path / "mask.png"))], "composite": None},
                             "a cat", 1, *common, api_name="/inpaint")
    with Image.open(painted[0]["image"]) as im:
        result = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(result[:32], np.asarray(Image.open(image))[:32])  # unpainted half kept
    # Outpainting grows the canvas (64 + 2 x 64): this app's one tiny model cannot, and says so.
    with pytest.raises(client_lib.exceptions.AppError, match=r"built for 64x64; choose that size\. Received: size=192x192"):
        client.predict(f(str(image)), "a field", 1, 64, "64x64", "ddim", 2, 0, 1, api_name="/outpaint")
    with open(client.predict(f(str(image)), f(str(other)), "", 4, 0.5, *common, api_name="/image_morph"), "rb") as g:
        assert _frames_of(g.read()) == 4
    assert os.path.exists(client.predict("a lighthouse", 4, *common, api_name="/steps_view"))


def test_switching_weights_and_loras_is_checked_first(app, tmp_path):
    from sdanim.config.errors import SdanimError
    from sdanim.model.spec import ModelSpec
    from sdanim.frontends.ui import ModelHolder

    client_lib = require("gradio_client")
    client = client_lib.Client(app.local_url, verbose=False)
    with pytest.raises(client_lib.exceptions.AppError, match=r"started with a model object of its own.*Received: weights='random'"):
        client.predict("random", "", "auto", api_name="/use_model")
    holder = ModelHolder(spec=ModelSpec(weights="random"))
    with pytest.raises(SdanimError, match=r"weights must be keras-cv \(keras-hub\), random, a folder of \.h5 files, a checkpoint or an SD3 file or folder that exists\. Received: weights='.*nowhere'"):
        holder.use(str(tmp_path / "nowhere"), "")
    with pytest.raises(SdanimError, match=r"lora must be FILE or FILE:SCALE.*Received: lora='x.safetensors:abc'"):
        holder.use("random", "x.safetensors:abc")
    assert holder.spec.weights == "random" and holder.spec.loras == ()  # nothing changed
    assert holder.use("keras-cv", "") == "Using keras-cv with 0 LoRA(s): the model loads at the next render."
    assert holder.spec.weights == "keras-cv" and holder.model is None


def test_an_app_serving_sd3_offers_its_sampler_first(tmp_path):
    """The operator's SD3 model (`python -m sdanim ui --model sd3-medium`) takes only the
    flow-matching sampler: every tab's sampler starts there, not at DDIM."""
    require("gradio")
    from tiny import make_tiny_model, make_tiny_sd3_model

    from sdanim.frontends.ui.app import build_app

    def samplers(model):
        blocks = build_app(model=model, out_dir=str(tmp_path))
        values = [c["props"].get("value") for c in blocks.config["components"]
                  if c["props"].get("label") == "Sampler"]
        assert values  # every tab has one
        return set(values)

    assert samplers(make_tiny_sd3_model()) == {"flow_euler"}
    assert samplers(make_tiny_model()) == {"ddim"}


def _names_only_sd3_file(path, layers: int = 24, dual: int = 0, qk_norm: bool = False) -> str:
    """A Stability SD3 single file's tensor names for a transformer of `layers` blocks
    (values of one element: the model choice reads names only)."""
    from safetensors.numpy import save_file

    one = np.zeros(1, np.float32)
    names = [f"model.diffusion_model.joint_blocks.{i}.x_block.attn.qkv.weight" for i in range(layers)]
    names += [f"model.diffusion_model.joint_blocks.{i}.x_block.attn2.qkv.weight" for i in range(dual)]
    names += [f"model.diffusion_model.joint_blocks.{i}.x_block.attn.ln_q.weight" for i in range(layers) if qk_norm]
    names += ["text_encoders.clip_l.transformer.x", "text_encoders.clip_g.transformer.x", "first_stage_model.x"]
    save_file({n: one for n in names}, str(path))
    return str(path)


def test_the_model_section_switches_family_checked_first_and_resets_the_samplers(tmp_path):
    """A local app started on SD 1.x switches to an SD3-family model and back: the weights
    are checked against the model from their headers before anything changes, "auto" reads
    the model off an SD3 file, and every tab's sampler moves to the family's own."""
    require("gradio")
    from tiny import make_tiny_model

    from sdanim.config.errors import SdanimError
    from sdanim.frontends.ui.app import build_app
    from sdanim.model.spec import ModelSpec

    blocks = build_app(model=make_tiny_model(), spec=ModelSpec(weights="random"), out_dir=str(tmp_path))
    holder = blocks.sdanim_context.holder
    use = next(f for f in blocks.fns.values() if f.api_name == "use_model").fn
    samplers = len(blocks.sdanim_context.samplers)
    assert samplers >= 5  # every tab's

    def switch(*request):
        message, *updates = next(iter(use(*request)))
        return message, [u.get("value") for u in updates]

    message, values = switch("random", "", "sd3-medium")
    assert message == "Using random as sd3-medium with 0 LoRA(s): the model loads at the next render."
    assert holder.spec.version == "sd3-medium" and holder.model is None
    assert values == ["flow_euler"] * samplers
    medium = _names_only_sd3_file(tmp_path / "sd3_medium.safetensors")
    large = _names_only_sd3_file(tmp_path / "sd3.5_large.safetensors", layers=38, qk_norm=True)
    assert switch(medium, "", "auto")[0].startswith(f"Using {medium} as sd3-medium")  # read off the file
    assert switch(large, "", "auto")[1] == [None] * samplers  # the same family: samplers left alone
    assert holder.spec.version == "sd3.5-large"
    before = holder.spec
    refused = {
        ("1.4", medium): r"holds an SD3-family model \(sd3-medium\), not Stable Diffusion 1\.x/2\.x: choose the "
                         r"model sd3-medium\. Received: model='1\.4'",
        ("sd3.5-medium", medium): r"transformer has 24 layers \(dual attention in 0, qk_norm None\), not "
                                  r"sd3\.5-medium's 24 \(dual attention in 13, qk_norm rms_norm\)",
        ("sd3-large", "random"): r"model must be auto or one of .*Received: model='sd3-large'",
        ("auto", "keras-hub"): r"weights 'keras-hub' are KerasHub's SD3 presets: choose an SD3-family model for them\. "
                               r"Received: model='auto'",
    }
    for (model, weights), match in refused.items():
        with pytest.raises(SdanimError, match=match):
            holder.use(weights, "", model)
        assert holder.spec == before  # nothing changed
    message, values = switch("random", "", "2.1")
    assert holder.spec.version == "2.1" and values == ["ddim"] * samplers


def test_a_network_app_loads_each_offered_weight_as_the_operators_model(tmp_path):
    """Network mode: an SD3 file in --models-dir is offered with the model it holds; a
    visitor picks it by name and cannot make it load as another model."""
    from sdanim.config.errors import SdanimError
    from sdanim.frontends.ui import ModelHolder
    from sdanim.frontends.ui.model import offered_models
    from sdanim.model.spec import ModelSpec

    _names_only_sd3_file(tmp_path / "sd3.5_medium.safetensors", dual=13, qk_norm=True)
    spec = ModelSpec(weights="random")
    access = offered_models(spec, models_dir=str(tmp_path))
    assert access.models == {"random": None, "sd3.5_medium.safetensors": "sd3.5-medium"}
    holder = ModelHolder(spec=spec, access=access)
    with pytest.raises(SdanimError, match=r"loads sd3\.5_medium\.safetensors as the model sd3\.5-medium \(the operator's "
                                          r"choice\)\. Received: model='sd3\.5-large'"):
        holder.use("sd3.5_medium.safetensors", [], "sd3.5-large")
    assert holder.spec == spec
    holder.use("sd3.5_medium.safetensors", [], "auto")
    assert (holder.spec.version, holder.spec.weights) == ("sd3.5-medium", str(tmp_path / "sd3.5_medium.safetensors"))
