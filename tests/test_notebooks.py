"""Both notebooks execute headless with random weights at 128x128 and 2 steps."""

import os

import pytest
from PIL import Image

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "notebooks")
pytestmark = pytest.mark.heavy


@pytest.mark.parametrize("name", ["sdanim_colab.ipynb", "sdanim_apple_silicon.ipynb"])
def test_notebook_runs_headless(name, tmp_path, monkeypatch):
    monkeypatch.setenv("SDANIM_SMOKE", "1")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    with Image.open(tmp_path / "outputs" / "morph.gif") as im:
        assert im.n_frames == 4 and im.size == (128, 128)
    assert (tmp_path / "outputs" / "truck.png").is_file()
    for made in ("grid.png", "image_morph.gif", "steps.gif", "steps_strip.png"):
        assert (tmp_path / "outputs" / made).is_file(), made
    assert len(list((tmp_path / "outputs").glob("inpaint-*.png"))) == 1
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert any(o.get("output_type") == "display_data" and "image/gif" in o.get("data", {}) for o in outputs)
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in outputs)
