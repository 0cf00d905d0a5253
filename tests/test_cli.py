"""CLI: bad input is one line on stderr, exit 2, no traceback, before any model build."""

import os
import subprocess
import sys

import pytest

from sdanim.cli import main

M = ["morph", "a cat", "a dog"]


@pytest.mark.parametrize(
    "argv, match",
    [
        (M + ["--frames", "1"], "frames must be at least 2. Received: frames=1"),
        (M + ["--fps", "0"], "fps must be > 0. Received: fps=0.0"),
        (M + ["--steps", "0"], "steps must be at least 1. Received: steps=0"),
        (M + ["--guidance", "-1"], "guidance must be >= 0. Received: guidance=-1.0"),
        (M + ["--batch-size", "0"], "batch_size must be at least 1. Received: batch_size=0"),
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
    assert err.count("\n") == 1 and "Traceback" not in err


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


def test_subprocess_bad_input_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sdanim", "morph", "a", "b", "--frames", "1"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "sdanim: error: frames must be at least 2. Received: frames=1"
    assert not os.path.exists(tmp_path / "outputs")
