"""Tiled upscaling at the shipped models' real depths (item 7 of issue 33): Real-ESRGAN
x4plus (RRDBNet, 23 blocks, 64 features) and realesr-general-x4v3 (SRVGGNetCompact, 32
convolutions) reach far past the 32-pixel overlap every tile sees, unlike the 1-block
models of tests/test_upscale.py. Random weights of the exact architectures (trained
weights cannot be downloaded here): tiles against the whole image, and the seams a
too-small overlap leaves, so the comparison can fail."""

import numpy as np
import pytest

from conftest import require

torch = require("torch")

pytestmark = pytest.mark.heavy


@pytest.mark.parametrize("arch", ["realesrgan-x4plus", "realesr-general-x4v3"])
def test_tiles_match_the_whole_image_at_the_real_depths(arch, tmp_path):
    from test_upscale import _compact_state, _rrdb_state

    from sdanim.model.esrgan import Upscaler, check_upscaler

    state = _rrdb_state(num_block=23, num_feat=64, ups=2) if arch == "realesrgan-x4plus" else \
        _compact_state(num_feat=64, num_conv=32, scale=4)
    torch.save({"params_ema": state}, str(tmp_path / "model.pth"))
    file = check_upscaler(str(tmp_path / "model.pth"))
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (1, 8, 8, 3)).astype(np.float32)  # a picture: flat patches and grain
    image = np.clip(np.repeat(np.repeat(blocks, 8, 1), 8, 2) + rng.normal(0, 12, (1, 64, 64, 3)), 0, 255)
    image = image.astype(np.uint8)
    whole = Upscaler(file, tile=64).upscale(image)

    def gap(overlap: int) -> np.ndarray:
        return np.abs(Upscaler(file, tile=32, overlap=overlap).upscale(image).astype(int) - whole.astype(int))

    default = gap(32)  # Upscaler's default overlap, 4 tiles of 32
    assert default.max() <= 1 and (default > 0).mean() < 1e-3, (default.max(), (default > 0).mean())
    seams = gap(0)  # no overlap: every tile's border is computed without its neighbours
    assert seams.max() > 4, seams.max()
