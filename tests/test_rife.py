"""RIFE's IFNet (sdanim.model.rife) against ccvfi's IFNet holding the same random weights:
the same frame pair, t in {0.25, 0.5, 0.75}, at a size that needs padding, for the
16-channel (v4.26 heavy) and 4-channel (v4.25/v4.26) feature encoders; the warp on a
known flow; batch invariance; refusals."""

import numpy as np
import pytest

from conftest import require

torch = require("torch")
require("ccvfi")


def _reference(heavy: bool):
    """ccvfi's IFNet (v4.26 heavy) with seeded random weights; with heavy=False its
    encoder and blocks rebuilt at v4.25/v4.26's shapes (4 feature channels), which is the
    only difference between those releases' networks."""
    from ccvfi.arch.ifnet_arch import IFBlock, IFNet

    torch.manual_seed(3)
    net = IFNet()
    if not heavy:
        net.encode.cnn3 = torch.nn.ConvTranspose2d(16, 4, 4, 2, 1)
        net.block0 = IFBlock(7 + 8, c=192)
        for k, c in enumerate((128, 96, 64, 32), start=1):
            setattr(net, f"block{k}", IFBlock(8 + 4 + 8 + 8, c=c))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("beta"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.mul_(0.5)  # keep the random flows within a few pixels
    return net.eval()


def _save(net, path) -> str:
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, str(path))  # as flownet.pkl: "module." keys
    return str(path)


def _frames(height: int, width: int, batch: int = 1, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 1, (batch, height // 4, width // 4, 3)).astype(np.float32)
    smooth = np.repeat(np.repeat(base, 4, axis=1), 4, axis=2)  # blocky, so flows have something to follow
    return smooth, np.roll(smooth, (3, -2), axis=(1, 2))


@pytest.mark.parametrize("heavy", [True, False])
def test_ifnet_matches_ccvfi_at_a_size_that_needs_padding(heavy, tmp_path):
    from sdanim.model.rife import Interpolator, check_rife, padded_size

    net = _reference(heavy)
    rife = check_rife(_save(net, tmp_path / "flownet.pkl"))
    assert rife.version.name == ("4.26.heavy" if heavy else "4.25/4.26")  # one file layout, two releases
    h, w = 72, 100
    ph, pw = padded_size(h, w, rife.version)
    assert (ph, pw) == (128, 128)  # four times the first block's scale of 16
    frame0, frame1 = _frames(h, w)
    pad = ((0, 0), (0, ph - h), (0, pw - w), (0, 0))
    x0, x1 = np.pad(frame0, pad), np.pad(frame1, pad)
    network = Interpolator(rife).network(h, w)
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):  # the ends too: whatever the architecture gives there
        with torch.no_grad():
            inputs = torch.from_numpy(np.concatenate([x0, x1], axis=-1)).permute(0, 3, 1, 2)
            timestep = torch.full((1, 1, ph, pw), t)
            theirs = net(inputs, timestep=timestep, scale_list=[16, 8, 4, 2, 1]).permute(0, 2, 3, 1).numpy()
        ours = np.asarray(network([x0, x1, np.full((1, 1), t, np.float32)]))
        gap = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
        assert gap < 1e-4, (t, gap)
        if 0.0 < t < 1.0:
            assert np.abs(ours - (1 - t) * x0 - t * x1).max() > 1e-3  # more than a cross-fade


def test_warp_follows_a_known_flow():
    from sdanim.model.rife import warp

    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (1, 20, 24, 3)).astype(np.float32)
    flow = np.zeros((1, 20, 24, 2), np.float32)
    flow[..., 0], flow[..., 1] = 3.0, -2.0  # sample 3 pixels right, 2 up
    out = np.asarray(warp(image, flow))
    np.testing.assert_allclose(out[0, 2:, :-3], image[0, :-2, 3:], atol=1e-6)  # a shifted image comes back
    np.testing.assert_allclose(out[0, 0], image[0, 0, np.minimum(np.arange(24) + 3, 23)], atol=1e-6)  # border clamps
    half = np.full((1, 20, 24, 2), 0.5, np.float32)
    mid = np.asarray(warp(image, half))[0, 5, 5]
    expected = image[0, 5:7, 5:7].mean(axis=(0, 1))  # bilinear: the four neighbours' mean
    np.testing.assert_allclose(mid, expected, atol=1e-6)


def test_in_betweens_do_not_depend_on_the_batch_and_stay_within_their_frames(tmp_path):
    from sdanim.model.rife import Interpolator, check_rife

    interpolator = Interpolator(check_rife(_save(_reference(False), tmp_path / "flownet.pkl")))
    frame0, frame1 = (np.clip(np.rint(f * 255), 0, 255).astype(np.uint8) for f in _frames(40, 56, batch=3, seed=5))
    times = np.array([0.25, 0.5, 0.75], np.float32)
    together = interpolator.between(frame0, frame1, times)
    alone = np.concatenate([interpolator.between(frame0[i:i + 1], frame1[i:i + 1], times[i:i + 1]) for i in range(3)])
    assert together.shape == (3, 40, 56, 3) and together.dtype == np.uint8
    assert np.abs(together.astype(int) - alone.astype(int)).max() <= 1
    # Bilinear sampling and the blend are both convex: an in-between never leaves its frames' range.
    low = np.minimum(frame0.min(axis=(1, 2)), frame1.min(axis=(1, 2)))[:, None, None]
    high = np.maximum(frame0.max(axis=(1, 2)), frame1.max(axis=(1, 2)))[:, None, None]
    assert (together >= low).all() and (together <= high).all()


def test_weights_of_another_kind_or_layout_are_refused(tmp_path):
    from sdanim.config.errors import SdanimError
    from sdanim.model.rife import Interpolator, check_rife

    net = _reference(False)
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    old = dict(state)
    old["module.block1.conv0.1.0.weight"] = torch.zeros(100, 64, 3, 3)  # a block width no release has
    torch.save(old, str(tmp_path / "odd.pkl"))
    with pytest.raises(SdanimError, match=r"a layout sdanim does not know \(feature encoder \(16, 4\), block widths "
                                          r"\[192, 100, 96, 64, 32\]\).*Received: rife='.*odd\.pkl'"):
        check_rife(str(tmp_path / "odd.pkl"))
    torch.save({"conv_first.weight": torch.zeros(64, 3, 3, 3)}, str(tmp_path / "esrgan.pth"))
    with pytest.raises(SdanimError, match=r"not RIFE IFNet weights .*Received: rife='.*esrgan\.pth'"):
        check_rife(str(tmp_path / "esrgan.pth"))
    (tmp_path / "empty.pkl").write_bytes(b"")
    with pytest.raises(SdanimError, match=r"not a readable PyTorch checkpoint.*Received: rife='.*empty\.pkl'"):
        check_rife(str(tmp_path / "empty.pkl"))
    interpolator = Interpolator(check_rife(_save(net, tmp_path / "flownet.pkl")))
    with pytest.raises(SdanimError, match=r"both frames of a pair must have one size\. Received: \(8, 8\) and \(8, 12\)"):
        interpolator.between(np.zeros((1, 8, 8, 3), np.uint8), np.zeros((1, 8, 12, 3), np.uint8), [0.5])
