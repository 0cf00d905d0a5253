"""TAESD, the tiny decoder (sdanim.model.taesd), against diffusers' AutoencoderTiny holding
the same random weights: the same tensors saved in each published layout load, decode
and encode to within 1e-4 of the reference's scale; files for other latents are refused."""


import numpy as np
import pytest

from conftest import relative_gap, require
from sdanim.config.errors import SdanimError

torch = require("torch")
diffusers = require("diffusers")


@pytest.fixture(scope="module")
def reference():
    """diffusers' AutoencoderTiny (the SD 1.x/2.x TAESD configuration) with seeded random
    weights, and its state dict."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderTiny().eval()
    with torch.no_grad():  # random init leaves biases at 0: give every tensor something to carry
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return vae, {k: v.detach().clone() for k, v in vae.state_dict().items()}


def _original(state: dict, part: str) -> dict:
    """diffusers' names -> taesd_{part}.pth's bare nn.Sequential indices (the decoder's
    Sequential starts with a Clamp, so its indices are one higher)."""
    out = {}
    for key, value in state.items():
        prefix = f"{part}.layers."
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            out[f"{int(index) + (part == 'decoder')}.{rest}"] = value
    return out


def _write(path, tensors: dict):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    else:
        torch.save(tensors, str(path))
    return str(path)


def test_decoder_and_encoder_match_autoencoder_tiny_in_every_layout(reference, tmp_path):
    from sdanim.model.taesd import check_taesd, load_part

    vae, state = reference
    rng = np.random.default_rng(1)
    latent = rng.standard_normal((2, 9, 12, 4)).astype(np.float32)  # SD latents in the UNet's space
    image = rng.uniform(-1, 1, (2, 72, 96, 3)).astype(np.float32)
    with torch.no_grad():
        # AutoencoderTiny's scaling_factor is 1: the pipeline hands it the UNet's latents as they are.
        assert vae.config.scaling_factor == 1.0
        decoded = vae.decode(torch.from_numpy(latent).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
        encoded = vae.encode(torch.from_numpy(image).permute(0, 3, 1, 2)).latents.permute(0, 2, 3, 1).numpy()

    diffusers_file = _write(tmp_path / "diffusion_pytorch_model.safetensors", state)
    sources = {
        "diffusers file": diffusers_file,
        "taesd_*.pth": tmp_path / "pth",
        "taesd_*.safetensors": tmp_path / "st",
    }
    for folder, ext in ((tmp_path / "pth", ".pth"), (tmp_path / "st", ".safetensors")):
        folder.mkdir()
        for part in ("decoder", "encoder"):
            _write(folder / f"taesd_{part}{ext}", _original(state, part))
    for label, source in sources.items():
        files = check_taesd(str(source), parts=("decoder", "encoder"))
        decoder, encoder = load_part(files, "decoder"), load_part(files, "encoder")
        ours_image = np.asarray(decoder(latent))
        ours_latent = np.asarray(encoder(image))
        assert ours_image.shape == (2, 72, 96, 3) and ours_latent.shape == (2, 9, 12, 4)
        assert relative_gap(ours_image, decoded) < 1e-4, (label, relative_gap(ours_image, decoded))
        assert relative_gap(ours_latent, encoded) < 1e-4, (label, relative_gap(ours_latent, encoded))
        assert files.record()["decoder"]["sha256"] and len(files.record()["decoder"]["sha256"]) == 64


def test_a_file_that_is_not_taesd_or_for_other_latents_is_refused(reference, tmp_path):
    from sdanim.config.errors import SdanimError
    from sdanim.model.taesd import check_taesd

    _, state = reference
    other = _write(tmp_path / "lora.safetensors", {"lora_unet_x.lora_down.weight": torch.zeros(4, 8)})
    with pytest.raises(SdanimError, match=r"not TAESD weights .*Received: taesd='.*lora\.safetensors'"):
        check_taesd(other)
    wide = dict(_original(state, "decoder"))
    wide["1.weight"] = torch.zeros(64, 16, 3, 3)  # SD3 / FLUX: 16 latent channels
    sd3 = _write(tmp_path / "my_decoder.pth", wide)
    with pytest.raises(SdanimError, match=r"latents with 16 channels \(SD3 or FLUX\), not SD 1\.x/2\.x's 4\. Received: taesd="):
        check_taesd(sd3)
    xl = _write(tmp_path / "taesdxl_decoder.pth", _original(state, "decoder"))
    with pytest.raises(SdanimError, match=r"for other latents \(SDXL, SD3, FLUX, Sana\).*Received: taesd='.*taesdxl_decoder\.pth'"):
        check_taesd(xl)
    with pytest.raises(SdanimError, match=r"the TAESD weights do not exist\. Received: taesd='.*nowhere\.pth'"):
        check_taesd(str(tmp_path / "nowhere.pth"))
    decoder_only = _write(tmp_path / "taesd_decoder.pth", _original(state, "decoder"))
    with pytest.raises(SdanimError, match=r"no TAESD encoder in these weights"):
        check_taesd(decoder_only, parts=("decoder", "encoder"))


def test_offline_without_weights_is_one_line_naming_the_file(tmp_path, monkeypatch):
    import keras

    from sdanim.config.errors import SdanimError
    from sdanim.model.taesd import check_taesd

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://raw.githubusercontent.com/...: None -- [Errno -2] Name or service not known")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(SdanimError, match=r"the TAESD decoder weights \(taesd_decoder\.pth\) are not in .* could not be "
                                          r"downloaded from https://raw\.githubusercontent\.com/madebyollin/taesd/.*pass --taesd"):
        check_taesd(None)


def test_pinned_file_is_checked_by_its_hash(tmp_path, monkeypatch, reference):
    """A file in the cache that is not the published one is refused with both hashes and
    kept where it is (a user may have put it there), never used."""
    from sdanim.model.registry import PinnedFile

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    cache = tmp_path / "datasets"
    cache.mkdir()
    content = b"the published bytes"
    import hashlib

    good = PinnedFile("weights.bin", "https://example.invalid/weights.bin", sha256=hashlib.sha256(content).hexdigest())
    blob = PinnedFile("weights.bin", "https://example.invalid/weights.bin",
                      git_blob=hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest())
    (cache / "weights.bin").write_bytes(content)
    assert good.cached() == str(cache / "weights.bin") and blob.cached() == str(cache / "weights.bin")
    (cache / "weights.bin").write_bytes(b"something else")
    other = hashlib.sha256(b"something else").hexdigest()
    for pinned, found in ((good, other), (blob, hashlib.sha1(b"blob 14\0something else").hexdigest())):
        with pytest.raises(SdanimError, match=rf"weights\.bin is not the published .* file: its .* is {found}, the "
                                              rf"pinned one's .*move it out of the way.*Received: taesd=None"):
            pinned.cached("taesd")
        assert (cache / "weights.bin").read_bytes() == b"something else"  # left as it was
