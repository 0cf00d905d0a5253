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
    assert "keras-cv|random|DIR" in out and "example:" in out


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
