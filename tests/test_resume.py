"""A render killed by a signal keeps its finished frames; the rerun completes them."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(out, slow="0"):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen([sys.executable, os.path.join(HERE, "morph_tiny.py"), str(out), slow],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _frames(folder):
    return {name: np.asarray(Image.open(os.path.join(folder, name)))
            for name in sorted(os.listdir(folder)) if name.startswith("frame_")}


def test_killed_render_resumes_to_the_same_frames(tmp_path):
    # Reference: one uninterrupted run.
    ref = _run(tmp_path / "ref.gif")
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-2000:]
    reference = _frames(tmp_path / "ref_frames")
    assert len(reference) == 9

    # Interrupted run: killed once at least one batch is on disk.
    proc = _run(tmp_path / "cut.gif", slow="1.5")
    folder = tmp_path / "cut_frames"
    deadline = time.time() + 240
    while time.time() < deadline:
        if folder.is_dir() and any(n.startswith("frame_") for n in os.listdir(folder)):
            break
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    kept = _frames(folder)
    assert 0 < len(kept) < 9, f"kill came too late or too early: {len(kept)} frames"
    assert not (tmp_path / "cut.gif").exists()  # no export of a half-done run
    leftovers = [n for n in os.listdir(folder) if not (n.startswith("frame_") or n == "manifest.json")]
    for name in leftovers:  # a write cut mid-way stays under a temporary name
        assert name.startswith(".") and ".partial" in name, name

    # Rerun: only the missing frames, and the same frames as the uninterrupted run.
    again = _run(tmp_path / "cut.gif")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-2000:]
    assert f"rendered {9 - len(kept)}" in out
    resumed = _frames(folder)
    assert sorted(resumed) == sorted(reference)
    assert sorted(os.listdir(folder)) == sorted(reference) + ["manifest.json"]  # no stale temp files
    for name in reference:
        assert np.abs(resumed[name].astype(int) - reference[name].astype(int)).max() <= 1, name
    with Image.open(tmp_path / "cut.gif") as im:
        assert im.n_frames == 9
