"""CLI: bad input is one line on stderr, exit 2, no traceback, before any model build."""

import os
import subprocess
import sys

import pytest

from sdanim.frontends.cli import main

M = ["morph", "a cat", "a dog"]


@pytest.mark.parametrize(
    "argv, match",
    [
        (M + ["--frames", "1"], "frames must be at least 2. Received: frames=1"),
        (M + ["--fps", "0"], "fps must be > 0. Received: fps=0.0"),
        (M + ["--steps", "0"], "steps must be at least 1. Received: steps=0"),
        (M + ["--guidance", "-1"], "guidance must be >= 0. Received: guidance=-1.0"),
        (M + ["--batch-size", "0"], "batch_size must be at least 1. Received: batch_size=0"),
        (M + ["--scheduler", "lcm", "--steps", "60"],
         "steps must be from 1 to 50 with the lcm sampler (its 50-step distillation schedule). Received: steps=60"),
        (M + ["--size", "500x512"], "width must be a positive multiple of 64"),
        (M + ["--size", "huge"], "size must look like 512x512 (WIDTHxHEIGHT). Received: size='huge'"),
        (M + ["--out", "outputs/x.avi"], "out must end in .gif, .mp4, .webm. Received: out='outputs/x.avi'"),
        (["morph", "only one"], "morph needs at least 2 prompts. Received: 1 prompt(s)"),
        (["generate", "a cat", "--num-images", "0"], "num_images must be at least 1. Received: num_images=0"),
        (["generate", "a cat", "--seed", "-3"], "seed must be an integer in [0, 2**63). Received: seed=-3"),
    ],
)
def test_bad_input_one_line_exit_2(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdanim: error: ") and match in err
    assert err.count("\n") == 1  # in-process: a traceback would have been raised, not printed


def test_output_folder_that_cannot_be_created(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(M + ["--out", str(blocker / "sub" / "m.gif")]) == 2
    err = capsys.readouterr().err
    assert "cannot create the output folder" in err and "Received: out=" in err and err.count("\n") == 1


def test_unreadable_weights_dir_via_cli(capsys, tmp_path):
    assert main(M + ["--weights", str(tmp_path / "missing"), "--size", "64x64"]) == 2
    err = capsys.readouterr().err
    assert "weights must be 'keras-cv', 'random' or a directory" in err and err.count("\n") == 1


def test_missing_weights_via_cli(capsys, tmp_path):
    assert main(M + ["--weights", str(tmp_path), "--size", "64x64"]) == 2
    err = capsys.readouterr().err
    assert "kcv_diffusion_model.h5" in err and "--weights random" in err and err.count("\n") == 1


def test_help_reads_well():
    out = subprocess.run([sys.executable, "-m", "sdanim", "morph", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--frames", "--fps", "--seed", "--steps", "--guidance", "--size", "--batch-size", "--out", "--weights", "--scheduler"):
        assert flag in out
    assert "keras-cv|keras-hub|random|DIR" in out and "sd3-medium" in out and "example:" in out


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["morph", "a", "b", "--frames", "1"], "sdanim: error: frames must be at least 2. Received: frames=1"),
        (["morph", "a", "b", "--frames", "abc"],
         "sdanim: error: argument --frames: invalid int value: 'abc' (see 'python -m sdanim morph --help')"),
        (["morph", "a", "b", "--easing", "wobble"],
         "sdanim: error: argument --easing: invalid choice: 'wobble' (choose from"),
        (["morph", "a", "b", "--no-such-flag"],
         "sdanim: error: unrecognized arguments: --no-such-flag (see 'python -m sdanim morph --help')"),
        (["generate"], "sdanim: error: the following arguments are required: prompt (see 'python -m sdanim generate --help')"),
        (["wobble"], "sdanim: error: argument COMMAND: invalid choice: 'wobble'"),
    ],
)
def test_real_cli_errors_are_one_line(tmp_path, argv, expected):
    """The real process: every error, argparse's included, is one line on stderr and
    exit 2, with no usage block and no traceback; nothing is written."""
    proc = subprocess.run([sys.executable, "-m", "sdanim", *argv], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr
    assert proc.stdout == "" and not os.listdir(tmp_path)


def test_metal_plugin_that_fails_to_load_is_one_line(tmp_path):
    """tensorflow-metal built for another TensorFlow fails inside `import tensorflow`
    (dlopen: Symbol not found). Simulated by a keras that raises that error on import."""
    fake = tmp_path / "fake" / "keras"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise RuntimeError('dlopen(/venv/lib/python3.11/site-packages/tensorflow-plugins/libmetal_plugin.dylib, "
        "0x0006): Symbol not found: __ZN3tsl8internal10LogMessageC1EPKci')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "fake"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "sdanim", "morph", "a", "b", "--weights", "random", "--size", "64x64",
                           "--out", str(tmp_path / "m.gif")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("sdanim: error: TensorFlow could not load the tensorflow-metal plugin")
    assert "'tensorflow>=2.18,<2.19' 'tensorflow-metal==1.2.0'" in lines[0] and "Symbol not found" in lines[0]


def test_main_leaves_the_callers_warning_settings_as_they_were(tmp_path, monkeypatch, capsys):
    """main(argv) from a script or a test shows its warnings as "sdanim: warning: ..."
    lines while the command runs, and gives the caller's filters and formatter back."""
    import warnings

    from sdanim.frontends.cli import options
    from tiny import make_tiny_model

    monkeypatch.setattr(options, "model_for", lambda args, settings: make_tiny_model())
    mask = tmp_path / "mask.png"
    from PIL import Image

    Image.new("L", (64, 64), 255).save(mask)  # all white: inpaint warns that everything is repainted
    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "image.png")
    shown = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: shown.append(
            warnings.formatwarning(message, category, filename, lineno, line))
        filters, formatter = list(warnings.filters), warnings.formatwarning
        assert main(["inpaint", str(tmp_path / "image.png"), str(mask), "x", "--steps", "1", "--out",
                     str(tmp_path / "out"), "--quiet"]) == 0
        assert warnings.filters == filters and warnings.formatwarning is formatter
    assert any(s.startswith("sdanim: warning: mask is all white") for s in shown), shown


def test_new_files_get_the_umask_of_when_they_are_written(tmp_path):
    """A frame, a manifest or a video gets 0666 less the umask at the time it is written
    (not one read when sdanim was imported), and a umask is never set to read it."""
    import numpy as np

    from sdanim.render.store import FrameStore

    store = FrameStore(str(tmp_path))
    image = np.zeros((8, 8, 3), np.uint8)
    previous = os.umask(0o027)
    try:
        store.write(0, image)
        os.umask(0o002)
        store.write(1, image)
        store.write_manifest({"a": 1})
    finally:
        os.umask(previous)
    modes = [os.stat(p).st_mode & 0o777 for p in (store.path(0), store.path(1), store.manifest_path)]
    assert modes == [0o640, 0o664, 0o664]
