"""Real-ESRGAN's upscalers (sdanim.model.esrgan) against spandrel holding the same random
weights, each architecture and each key layout; tiles against the whole image; refusals."""

import numpy as np
import pytest

from conftest import relative_gap, require

torch = require("torch")
spandrel = require("spandrel")


def _rrdb_state(num_block=2, num_feat=16, in_ch=3, ups=2, seed=0) -> dict:
    """A Real-ESRGAN RRDBNet state dict (its own names; growth 32, as every release)."""
    g = torch.Generator().manual_seed(seed)

    def conv(out, inp):
        return {"weight": torch.randn(out, inp, 3, 3, generator=g) * (1.0 / (3 * inp**0.5)),
                "bias": torch.randn(out, generator=g) * 0.01}

    parts = {"conv_first": conv(num_feat, in_ch)}
    for b in range(num_block):
        for d in (1, 2, 3):
            for k in range(1, 6):
                parts[f"body.{b}.rdb{d}.conv{k}"] = conv(32 if k < 5 else num_feat, num_feat + 32 * (k - 1))
    parts["conv_body"] = conv(num_feat, num_feat)
    for k in range(1, ups + 1):
        parts[f"conv_up{k}"] = conv(num_feat, num_feat)
    parts["conv_hr"] = conv(num_feat, num_feat)
    parts["conv_last"] = conv(3, num_feat)
    return {f"{name}.{kind}": t for name, kinds in parts.items() for kind, t in kinds.items()}


def _compact_state(num_feat=16, num_conv=4, scale=4, seed=1) -> dict:
    g = torch.Generator().manual_seed(seed)
    state, index = {}, 0
    for k in range(num_conv + 1):
        inp = 3 if k == 0 else num_feat
        state[f"body.{index}.weight"] = torch.randn(num_feat, inp, 3, 3, generator=g) * (1.0 / (3 * inp**0.5))
        state[f"body.{index}.bias"] = torch.randn(num_feat, generator=g) * 0.01
        state[f"body.{index + 1}.weight"] = 0.25 + 0.05 * torch.randn(num_feat, generator=g)  # PReLU
        index += 2
    state[f"body.{index}.weight"] = torch.randn(3 * scale * scale, num_feat, 3, 3, generator=g) * 0.05
    state[f"body.{index}.bias"] = torch.zeros(3 * scale * scale)
    return state


def _reference(state: dict, image: np.ndarray) -> np.ndarray:
    model = spandrel.ModelLoader().load_from_state_dict(state).model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(image).permute(0, 3, 1, 2))
    return out.permute(0, 2, 3, 1).numpy()


def _ours(path, image, tile=512, overlap=32):
    from keras import ops

    from sdanim.model.esrgan import Upscaler, check_upscaler

    upscaler = Upscaler(check_upscaler(path), tile=tile, overlap=overlap)
    return upscaler, np.asarray(ops.convert_to_numpy(upscaler.network(*image.shape[1:3])(image)))


@pytest.mark.parametrize("kind", ["rrdb x4", "rrdb x2 (unshuffle)", "compact x4"])
def test_parity_with_spandrel(kind, tmp_path):
    from safetensors.torch import save_file

    image = np.random.default_rng(0).uniform(0, 1, (1, 24, 32, 3)).astype(np.float32)
    state = {"rrdb x4": lambda: _rrdb_state(), "rrdb x2 (unshuffle)": lambda: _rrdb_state(in_ch=12),
             "compact x4": lambda: _compact_state()}[kind]()
    expected = _reference(state, image)
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    upscaler, ours = _ours(str(path), image)
    assert ours.shape == expected.shape == (1, 24 * upscaler.scale, 32 * upscaler.scale, 3)
    assert upscaler.scale == (2 if "x2" in kind else 4)
    assert relative_gap(ours, expected) < 1e-4, relative_gap(ours, expected)


def test_each_upstream_key_layout_loads_to_the_same_network(tmp_path):
    """Real-ESRGAN's release files (weights under params_ema) and community ESRGAN files
    (the original model.N names, as spandrel itself converts to) give the same output."""
    state = _rrdb_state(seed=4)
    image = np.random.default_rng(1).uniform(0, 1, (1, 16, 16, 3)).astype(np.float32)
    expected = _reference(state, image)
    torch.save({"params_ema": state, "params": {k: v * 0 for k, v in state.items()}}, str(tmp_path / "release.pth"))
    old = spandrel.ModelLoader().load_from_state_dict(state).model.state_dict()
    assert "model.0.weight" in old and "model.1.sub.0.RDB1.conv1.0.weight" in old
    torch.save(dict(old), str(tmp_path / "community.pth"))
    for name in ("release.pth", "community.pth"):
        _, ours = _ours(str(tmp_path / name), image)
        assert relative_gap(ours, expected) < 1e-4, name


@pytest.mark.parametrize("kind", ["compact", "rrdb"])
def test_tiles_meet_without_seams(kind, tmp_path):
    from safetensors.torch import save_file

    from sdanim.model.esrgan import Upscaler, check_upscaler

    state = _compact_state() if kind == "compact" else _rrdb_state(num_block=1)
    save_file(state, str(tmp_path / "m.safetensors"))
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (2, 70, 90, 3), dtype=np.uint8)
    file = check_upscaler(str(tmp_path / "m.safetensors"))
    whole = Upscaler(file, tile=512).upscale(images)
    calls = []
    tiled = Upscaler(file, tile=32, overlap=32).upscale(images, progress=calls.append)
    assert tiled.shape == whole.shape == (2, 280, 360, 3)
    assert len(calls) == 3 * 3  # 70x90 in 32-pixel tiles
    assert np.abs(tiled.astype(int) - whole.astype(int)).max() <= 1


def test_bad_weights_and_scales_are_one_line(tmp_path):
    from safetensors.torch import save_file

    from sdanim.config.errors import SdanimError
    from sdanim.model.esrgan import Upscaler, check_upscaler

    save_file(_compact_state(), str(tmp_path / "x4.safetensors"))
    with pytest.raises(SdanimError, match=r"this upscaler enlarges x4, not x2; choose --upscale 4 or another model\. "
                                          r"Received: upscale=2"):
        check_upscaler(str(tmp_path / "x4.safetensors"), scale=2)
    torch.save({"module.encode.cnn0.weight": torch.zeros(16, 3, 3, 3)}, str(tmp_path / "flownet.pkl"))
    with pytest.raises(SdanimError, match=r"not a Real-ESRGAN/ESRGAN upscaler .*Received: upscale_model='.*flownet\.pkl'"):
        check_upscaler(str(tmp_path / "flownet.pkl"))
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(SdanimError, match=r"not a readable PyTorch checkpoint.*Received: upscale_model='.*empty\.pth'"):
        check_upscaler(str(tmp_path / "empty.pth"))
    data = (tmp_path / "x4.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SdanimError, match=r"not a readable \.safetensors file .*file not fully covered.*"
                                          r"Received: upscale_model='.*cut\.safetensors'"):
        check_upscaler(str(tmp_path / "cut.safetensors"))
    with pytest.raises(SdanimError, match=r"upscale must be 2 or 4\. Received: upscale=3"):
        check_upscaler(None, scale=3)
    upscaler = Upscaler(check_upscaler(str(tmp_path / "x4.safetensors")))
    with pytest.raises(SdanimError, match=r"too large to upscale in this machine's memory.*Received: images of 40000x40000"):
        upscaler.check_fits((1, 40000, 40000, 3))
