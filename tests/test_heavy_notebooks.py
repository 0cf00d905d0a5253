"""Both notebooks execute headless with random weights at 64x64 and 2 steps.

They run one after the other in one Jupyter kernel, as a user who opens both in one
session would: the second notebook's `load_model` cell gets the model the first one
built (load_model hands back a live model loaded with the same arguments), so the
pair costs one model build, not two. Each notebook's outputs go to its own folder.

The toolbox part ("## The rest of the toolbox" onwards) is the same code in both
notebooks (asserted cell by cell): it runs once, in the Colab notebook; the Apple
notebook runs everything before it (its install and device cells, its own load_model,
generate, the morph and the few-step morph).
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


def test_notebooks_run_headless_in_one_kernel(tmp_path, monkeypatch):
    from jupyter_client.manager import KernelManager

    monkeypatch.setenv("SDANIM_SMOKE", "1")
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)  # as a user's kernel: sdanim must quiet TensorFlow
    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(tmp_path))
    try:
        streams = {}
        notebooks = {name: nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4) for name in NAMES}
        colab, apple = (notebooks[n] for n in NAMES)
        same = [c.source for c in colab.cells[_toolbox_start(colab):]]
        assert [c.source for c in apple.cells[_toolbox_start(apple):]] == same  # the same toolbox code
        apple.cells = apple.cells[:_toolbox_start(apple)]
        for name in NAMES:
            folder = tmp_path / name.removesuffix(".ipynb")
            folder.mkdir()
            nb = notebooks[name]
            # Each notebook starts in its own folder (the kernel's working directory).
            nb.cells.insert(0, nbformat.v4.new_code_cell(f"import os; os.chdir({str(folder)!r})\n" + COUNT_BUILDS))
            nb.cells.append(nbformat.v4.new_code_cell('print(f"model builds so far: {len(_sdanim_builds)}")'))
            nbclient.NotebookClient(nb, km=km, timeout=900).execute()
            _check_head_outputs(folder)
            streams[name] = _check_outputs(nb, folder) if name == NAMES[0] else "\n".join(
                o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                if o.get("output_type") == "stream")
    finally:
        km.shutdown_kernel(now=True)
    # One build for both: the second notebook's load_model handed back the first's model
    # (precision "auto" resolves the same way in both, on every CPU).
    assert "model builds so far: 1" in streams[NAMES[0]]
    assert "model builds so far: 1" in streams[NAMES[1]]
    # Nothing of TensorFlow's C++ start-up reaches a cell (the kernel's own stderr included).
    assert not [s for s in START_UP_LINES if s in streams[NAMES[0]] + streams[NAMES[1]]]


# Test instrumentation (not part of the notebooks): counts load_model's builds.
COUNT_BUILDS = """
import sdanim.model.loading as _m
if "_sdanim_builds" not in globals():
    _sdanim_builds, _sdanim_builders = [], _m._builders
    _m._builders = lambda *a: (_sdanim_builds.append(a), _sdanim_builders(*a))[1]
"""
