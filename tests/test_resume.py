"""A render killed by a signal keeps its finished frames; the rerun completes them."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import morph_tiny

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(out, mode="0"):  # mode: morph_tiny.py's MODE
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen([sys.executable, os.path.join(HERE, "morph_tiny.py"), str(out), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _frames(folder):
    return {name: np.asarray(Image.open(os.path.join(folder, name)))
            for name in sorted(os.listdir(folder)) if name.startswith("frame_")}


def _kill_at(proc, marker, never: str) -> None:
    """SIGKILLs `proc` once it touches `marker` (where morph_tiny.py holds)."""
    deadline = time.time() + 240
    while time.time() < deadline and not marker.exists() and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), never
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)


def test_killed_render_resumes_to_the_same_frames(tmp_path, capsys):
    # A run killed while frame 4 (first of the third batch) is being written, in a process
    # of its own; the reference, one uninterrupted run, in this process meanwhile.
    proc = _run(tmp_path / "cut.gif", mode="hold-write")
    morph_tiny.main(str(tmp_path / "ref.gif"))
    reference = _frames(tmp_path / "ref_frames")
    assert len(reference) == 9
    folder = tmp_path / "cut_frames"
    _kill_at(proc, tmp_path / "cut.gif.writing", "the run never reached frame 4's write")
    kept = _frames(folder)
    assert sorted(kept) == [f"frame_{i:05d}.png" for i in range(4)]  # two whole batches
    assert not (tmp_path / "cut.gif").exists()  # no export of a half-done run
    leftovers = [n for n in os.listdir(folder) if not (n.startswith("frame_") or n == "manifest.json")]
    # The write cut short stays under its temporary name: never taken for a finished frame.
    assert len(leftovers) == 1 and leftovers[0].startswith(".frame_00004.") and ".partial" in leftovers[0], leftovers

    # Rerun (the same command, here in this process): only the missing frames, and the
    # same frames as the uninterrupted run.
    capsys.readouterr()
    morph_tiny.main(str(tmp_path / "cut.gif"))
    assert f"rendered {9 - len(kept)}" in capsys.readouterr().out
    resumed = _frames(folder)
    assert sorted(resumed) == sorted(reference)
    assert sorted(os.listdir(folder)) == sorted(reference) + ["manifest.json"]  # no stale temp files
    for name in reference:
        assert np.abs(resumed[name].astype(int) - reference[name].astype(int)).max() <= 1, name
    with Image.open(tmp_path / "cut.gif") as im:
        assert im.n_frames == 9


@pytest.mark.slow
@pytest.mark.once
def test_a_motion_clip_killed_mid_step_resumes_to_the_same_frames(tmp_path, capsys):
    """Motion modules couple the frames, so no frame is written before the clip is sampled:
    a run killed (SIGKILL) mid-step, after its state was saved, restarts from that state
    and gives the uninterrupted run's frames bit for bit."""
    proc = _run(tmp_path / "cut.gif", mode="motion-hold")
    morph_tiny.main(str(tmp_path / "ref.gif"), "motion")
    reference = _frames(tmp_path / "ref_frames")
    assert len(reference) == 7
    _kill_at(proc, tmp_path / "cut.gif.writing", "the run never saved its state mid-step")
    folder = tmp_path / "cut_frames"
    assert _frames(folder) == {} and os.path.isfile(folder / "motion_state.npz")

    calls = []
    from sdanim.render import motion as motion_render

    sample = motion_render.sample_clip

    def counted(eps_fn, *args, **kwargs):
        return sample(lambda *a, **k: calls.append(1) or eps_fn(*a, **k), *args, **kwargs)

    motion_render.sample_clip = counted
    try:
        capsys.readouterr()
        morph_tiny.main(str(tmp_path / "cut.gif"), "motion")
    finally:
        motion_render.sample_clip = sample
    assert "rendered 7" in capsys.readouterr().out
    assert len(calls) == 3 * 3 - 3 - 2  # 3 steps x 3 windows, less step 0 and step 1's first two windows
    resumed = _frames(folder)
    assert sorted(resumed) == sorted(reference)
    for name in reference:
        assert np.array_equal(resumed[name], reference[name]), name
