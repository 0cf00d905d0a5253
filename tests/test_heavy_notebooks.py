"""Both notebooks execute headless with random weights at 64x64 and 2 steps.

The Colab notebook runs in a Jupyter kernel on TensorFlow (Keras's default, as on
Colab). The Apple-silicon notebook runs in a kernel of its own on Keras's torch backend
(KERAS_BACKEND=torch: on a Mac sdanim picks it by itself; on this Linux machine torch
computes on the CPU), so the backend a Mac user gets runs the notebook's cells end to end.
No Mac is needed; MPS itself is not exercised (README, Apple silicon).

The toolbox part ("## The rest of the toolbox" onwards) is the same code in both
notebooks (asserted cell by cell): it runs once, in the Colab notebook; the Apple
notebook runs everything before it (its install and doctor cells, its own load_model,
generate, the morph and the few-step morph). Every tool on the torch backend is also
checked with the tiny models (tests/test_backends.py).
"""

import os

import pytest
from PIL import Image

from conftest import require
from sdanim.core.runtime import START_UP_LINES

nbformat = require("nbformat")
nbclient = require("nbclient")
require("ipykernel")

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "notebooks")
NAMES = ["sdanim_colab.ipynb", "sdanim_apple_silicon.ipynb"]
pytestmark = [pytest.mark.heavy, pytest.mark.own_process]


def _check_outputs(nb, folder):
    with Image.open(folder / "outputs" / "morph.gif") as im:
        assert im.n_frames == 4 and im.size == (64, 64)
    assert (folder / "outputs" / "truck.png").is_file()
    for made in ("grid.png", "image_morph.gif", "steps.gif", "steps_strip.png"):
        assert (folder / "outputs" / made).is_file(), made
    assert len(list((folder / "outputs").glob("inpaint-*.png"))) == 1
    with Image.open(folder / "outputs" / "motion.gif") as im:  # motion modules (random in the smoke run)
        assert im.n_frames == 6
    with Image.open(folder / "outputs" / "morph_sd3.gif") as im:  # SD3 (a tiny one in the smoke run)
        assert im.n_frames == 4 and im.size == (64, 64)
    assert (folder / "outputs" / "motion_frames" / "motion_state.npz").is_file()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert any(o.get("output_type") == "display_data" and "image/gif" in o.get("data", {}) for o in outputs)
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in outputs)
    return "\n".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")


TOOLBOX = "## The rest of the toolbox"


def _toolbox_start(nb) -> int:
    return next(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.startswith(TOOLBOX))


def _check_head_outputs(folder):
    with Image.open(folder / "outputs" / "morph.gif") as im:
        assert im.n_frames == 4 and im.size == (64, 64)
    with Image.open(folder / "outputs" / "morph_lcm.gif") as im:
        assert im.n_frames == 4
    assert (folder / "outputs" / "truck.png").is_file()


def _execute(nb, folder, env: dict) -> str:
    """Runs `nb` in a fresh kernel started in `folder` with `env`; returns its printed text."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(folder), env=env)
    try:
        nb.cells.insert(0, nbformat.v4.new_code_cell(COUNT_BUILDS))
        nb.cells.append(nbformat.v4.new_code_cell(
            'import keras; print(f"model builds so far: {len(_sdanim_builds)}; backend {keras.backend.backend()}")'))
        nbclient.NotebookClient(nb, km=km, timeout=900).execute()
    finally:
        km.shutdown_kernel(now=True)
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                     if o.get("output_type") == "stream")


def _kernel_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "KERAS_BACKEND")}
    # As a user's kernel: sdanim must quiet TensorFlow itself; the backend is sdanim's choice.
    return dict(env, SDANIM_SMOKE="1", **extra)


def test_the_colab_notebook_runs_headless_on_tensorflow(tmp_path):
    notebooks = {name: nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4) for name in NAMES}
    colab, apple = (notebooks[n] for n in NAMES)
    same = [c.source for c in colab.cells[_toolbox_start(colab):]]
    assert [c.source for c in apple.cells[_toolbox_start(apple):]] == same  # the same toolbox code
    printed = _execute(colab, tmp_path, _kernel_env())
    _check_head_outputs(tmp_path)
    _check_outputs(colab, tmp_path)
    assert "model builds so far: 1; backend tensorflow" in printed  # every cell reused the one model
    # Nothing of TensorFlow's C++ start-up reaches a cell (the kernel's own stderr included).
    assert not [s for s in START_UP_LINES if s in printed]


def test_the_apple_notebook_runs_headless_on_the_torch_backend(tmp_path):
    """What a Mac user runs, on Keras's torch backend: install check, doctor, load_model
    (precision "auto"), generate, a morph and the few-step morph. On Linux torch
    computes on the CPU; doctor says no Apple GPU was found, and the notebook says so."""
    require("torch")
    apple = nbformat.read(os.path.join(NOTEBOOKS, NAMES[1]), as_version=4)
    apple.cells = apple.cells[:_toolbox_start(apple)]
    printed = _execute(apple, tmp_path, _kernel_env(KERAS_BACKEND="torch"))
    _check_head_outputs(tmp_path)
    assert "model builds so far: 1; backend torch" in printed
    assert "no Apple GPU found" in printed  # the device cell's message on a machine without one
    assert not [s for s in START_UP_LINES if s in printed]


# Test instrumentation (not part of the notebooks): counts load_model's builds.
COUNT_BUILDS = """
import sdanim.model.loading as _m
_sdanim_builds, _sdanim_builders = [], _m._builders
_m._builders = lambda *a: (_sdanim_builds.append(a), _sdanim_builders(*a))[1]
"""
