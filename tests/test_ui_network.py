"""The browser app reachable from the network (--listen; bound to 127.0.0.1 here, but in
network mode): visitors cannot read or load the server's files, switch the model for
everyone, exceed the operator's limits or download outside the output folder. Through
gradio_client and plain HTTP against a real server."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import free_port, require

from test_ui import ARGS  # the Animate tab's inputs, in order

pytestmark = pytest.mark.once  # end to end, no tolerance: once per CI, not on every CPU path

LIMITS = dict(max_frames=6, max_size=64, max_steps=3, max_images=2, max_batch=2)
PLAIN = dict(ARGS, kf="a red cube\na blue sphere")  # every transition takes the frames field


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A network-mode app: the operator offers "random" weights and a models folder with
    one LoRA file and one file that is neither a LoRA nor a checkpoint."""
    require("gradio")
    from safetensors.numpy import save_file

    import sdanim.ui as ui
    from sdanim.model.spec import ModelSpec
    from tiny import make_tiny_model

    models = tmp_path_factory.mktemp("models")
    rng = np.random.default_rng(0)
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": rng.standard_normal((4, 320)).astype(np.float32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": rng.standard_normal((320, 4)).astype(np.float32)},
              str(models / "style.safetensors"))
    (models / "notes.txt").write_text("not a model")
    _motion_module_file(str(models / "mm_sd_v15_v2.safetensors"))
    out = tmp_path_factory.mktemp("shared_out")
    secret = tmp_path_factory.mktemp("secret") / "private.txt"
    secret.write_text("the server's own file")
    app = ui.launch(model=make_tiny_model(), spec=ModelSpec(weights="random"), out_dir=str(out), port=free_port(),
                    listen=True, host="127.0.0.1", models_dir=str(models), limits=ui.Limits(**LIMITS),
                    inline=False, prevent_thread_lock=True)
    yield app, str(secret)
    app.close()


def _motion_module_file(path: str) -> None:
    """A file with every tensor name of v2 motion modules (shapes aside: the offer reads
    names and positions, nothing is built from it)."""
    from safetensors.numpy import save_file

    from sdanim.formats.motion_files import MODULE_TENSORS, module_names

    tensors = {}
    for name in module_names(True):
        tensors.update({f"{name}.{k}": np.zeros(1, np.float32) for k in MODULE_TENSORS})
        tensors[f"{name}.transformer_blocks.0.attn1.pos_embed.pe"] = np.zeros((1, 32, 4), np.float32)
    save_file(tensors, path)


def _client(app):
    client_lib = require("gradio_client")
    return client_lib, client_lib.Client(app.local_url, verbose=False)


def test_the_offer_is_by_name_and_typed_paths_reveal_nothing(shared):
    app, secret = shared
    client_lib, client = _client(app)
    holder = app.sdanim_context.holder
    model, spec = holder.model, holder.spec
    assert list(holder.access.weights) == ["random"] and list(holder.access.loras) == ["style.safetensors"]
    assert list(holder.access.motion_modules) == ["mm_sd_v15_v2.safetensors"]  # recognised by its tensors
    from sdanim.frontends.ui.common import motion_spec

    chosen = motion_spec(app.sdanim_context, "mm_sd_v15_v2.safetensors", 8, 2, "attention")
    assert chosen.file == holder.access.motion_modules["mm_sd_v15_v2.safetensors"] and chosen.context == 8
    for typed in (secret, "random", "/etc/passwd"):  # a network app opens nothing typed, not even "random"
        with pytest.raises(Exception, match=r"choose motion modules from the list this app offers"):
            motion_spec(app.sdanim_context, typed, 16, 4, "unet")
    messages = []
    for path in (secret, secret + ".missing", "/etc/passwd", "../../etc/hostname"):
        with pytest.raises(client_lib.exceptions.AppError) as error:
            client.predict(path, [], api_name="/use_model")
        messages.append(str(error.value).replace(path, "<path>"))
    assert len(set(messages)) == 1, messages  # an existing and a missing file read alike
    assert "is not in the list of choices" in messages[0] or "choose weights from the list" in messages[0]
    with pytest.raises(client_lib.exceptions.AppError):
        client.predict("random", [secret], api_name="/use_model")
    # The endpoint itself, past the widget: the holder refuses anything not offered.
    from sdanim.config.errors import SdanimError

    for weights, loras in ((secret, []), ("random", [secret]), ("random", ["notes.txt"])):
        with pytest.raises(SdanimError, match="this app offers"):
            holder.use(weights, loras)
    assert holder.model is model and holder.spec == spec  # nothing changed for anyone


def test_the_operators_limits_keep_the_network_defaults_they_do_not_name(shared):
    """launch(limits=Limits(max_frames=6, ...)) in network mode: the limits not named
    (here the output folder's) are the network defaults, not lifted."""
    app, _ = shared
    import sdanim.ui as ui

    limits = app.sdanim_context.limits
    assert (limits.max_frames, limits.max_size, limits.max_batch) == (6, 64, 2)
    assert limits.max_output_gb == ui.NETWORK_LIMITS.max_output_gb == 20.0


def test_limits_are_checked_by_the_server_and_the_next_render_works(shared):
    app, _ = shared
    client_lib, client = _client(app)
    too_much = {
        "frames": (dict(PLAIN, frames=9), r"at most 6 frames per request .*--max-frames.*Received: frames=10"),
        "size": (dict(PLAIN, size="128x128"), r"at most 64 pixels .*--max-size.*Received: pixels=128"),
        "steps": (dict(PLAIN, steps=40), r"at most 3 steps .*--max-steps.*Received: steps=40"),
    }
    for name, (args, match) in too_much.items():
        with pytest.raises(client_lib.exceptions.AppError, match=match):
            client.predict(*args.values(), api_name="/render")
    with pytest.raises(client_lib.exceptions.AppError, match=r"at most 2 images"):
        client.predict("a cat", "", 4, 5, "64x64", "ddim", 2, 0, 2, api_name="/generate")
    done = client.predict(*dict(PLAIN, frames=2).values(), api_name="/render")
    assert done[-1].startswith("Done: 3 frames rendered")


def test_downloads_only_from_the_output_folder(shared):
    app, secret = shared
    _, client = _client(app)
    done = client.predict(*dict(PLAIN, kf="a red cube [seed=5 frames=2]\na green cone").values(), api_name="/render")
    inside = done[1]["value"] if isinstance(done[1], dict) else done[1]
    assert os.path.exists(inside)
    base = app.local_url.rstrip("/")

    def status(path: str) -> int:
        try:
            with urllib.request.urlopen(f"{base}/gradio_api/file={path}", timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    rendered = os.path.join(app.sdanim_out_dir, os.path.basename(inside).replace(".gif", "_sheet.png"))
    assert status(rendered) == 200  # a visitor's own render
    beside = os.path.join(app.sdanim_out_dir, "..", "beside-the-out-dir.txt")
    with open(beside, "w") as f:  # it exists: a refusal is the server's, not a missing file's
        f.write("the server's own file, next to the output folder")
    try:
        for outside in (secret, "/etc/passwd", beside, os.path.normpath(beside)):
            assert os.path.exists(outside)
            assert status(outside) in (403, 404), outside
    finally:
        os.remove(beside)


def test_a_network_app_without_auth_warns(tmp_path, capfd):
    require("gradio")
    import sdanim.ui as ui
    from tiny import make_tiny_model

    app = ui.launch(model=make_tiny_model(), out_dir=str(tmp_path), port=free_port(), listen=True, host="127.0.0.1",
                    inline=False, prevent_thread_lock=True)
    try:
        err = capfd.readouterr().err
        assert "sdanim: warning: the app is reachable from the network without --auth" in err
        assert app.sdanim_context.limits == ui.NETWORK_LIMITS  # defaults when the operator sets none
    finally:
        app.close()


@pytest.mark.parametrize("argv, match", [
    (["ui", "--max-frames", "0"], "max_frames must be a number > 0. Received: max_frames=0"),
    (["ui", "--models-dir", "."], "models_dir offers files to visitors of a network app; add --listen or --share"),
    (["ui", "--listen", "--models-dir", "/no/such/folder"], "models_dir must be a folder. Received: models_dir='/no/such/folder'"),
])
def test_cli_sharing_options_bad_input(capsys, argv, match):
    require("gradio")
    from sdanim.frontends.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdanim: error: ") and match in err and err.count("\n") == 1


def test_cli_limits_replace_the_network_defaults():
    from sdanim.frontends.cli.app import limits
    from sdanim.frontends.cli.options import Parser
    from sdanim.frontends.cli import build_parser

    parser = build_parser()
    assert isinstance(parser, Parser)
    network = limits(parser.parse_args(["ui", "--listen", "--max-frames", "48"]))
    assert network.max_frames == 48 and network.max_size == 768  # the rest: network defaults
    local = limits(parser.parse_args(["ui", "--max-steps", "30"]))
    assert local.max_steps == 30 and local.max_frames is None


def test_a_full_output_folder_stops_new_renders(tmp_path):
    """--max-output-gb: once the output folder holds that much, a render is refused in one
    message and nothing is loaded; the server stays up."""
    require("gradio")
    client_lib = require("gradio_client")
    import sdanim.ui as ui
    from tiny import make_tiny_model

    (tmp_path / "earlier.bin").write_bytes(b"x" * 4096)
    app = ui.launch(model=make_tiny_model(), out_dir=str(tmp_path), port=free_port(), listen=True, host="127.0.0.1",
                    limits=ui.Limits(max_output_gb=2e-6), inline=False, prevent_thread_lock=True)  # about 2 KiB
    try:
        client = client_lib.Client(app.local_url, verbose=False)
        with pytest.raises(client_lib.exceptions.AppError, match=r"the app's output folder holds 0\.0 GB, its limit "
                                                                 r"\(the operator's --max-output-gb\)"):
            client.predict(*dict(PLAIN, frames=2).values(), api_name="/render")
        assert sorted(os.listdir(tmp_path)) == ["earlier.bin"]
        os.remove(tmp_path / "earlier.bin")
        assert client.predict(*dict(PLAIN, frames=2).values(), api_name="/render")[-1].startswith("Done")
    finally:
        app.close()
    from sdanim.frontends.cli import build_parser
    from sdanim.frontends.cli.app import limits

    assert limits(build_parser().parse_args(["ui", "--listen", "--max-output-gb", "0.5"])).max_output_gb == 0.5
