"""TAESD, the tiny autoencoder for Stable Diffusion 1.x/2.x latents (madebyollin/taesd,
MIT), in Keras 3: a 1.2 M-parameter decoder (the SD decoder has 49 M) for previews and
fast drafts, and its encoder. TAESD3, its 16-channel sibling for SD3's latents, is the
same network with 16 latent channels (`SD3_LATENT_CHANNELS`); it too takes the latents
the sampler works on (SD3's VAE latent minus 0.0609, times 1.5305: what SD3's decoder
undoes first, as ComfyUI feeds taesd3), and is read only from a file the user gives (no
pinned download: its hash could not be taken here).

    decoder: latent (B, h, w, 4) in the UNet's space -> image (B, 8h, 8w, 3) in [-1, 1]
    encoder: image (B, H, W, 3) in [-1, 1] -> latent (B, H/8, W/8, 4)

the same call signatures as KerasCV's Decoder and ImageEncoder, so the renderer can use
either. Scaling: TAESD takes and gives latents in the space the UNet samples in (SD's
VAE latent times 0.18215, what KerasCV's decoder divides by first); internally it works
on images in [0, 1] (decoder: tanh(z / 3) * 3, ..., then x * 2 - 1 here; encoder:
(x + 1) / 2 here, ...), as diffusers' AutoencoderTiny with scaling_factor 1.0 does.

Weights, read without running code (`sdanim.formats.tensors`): taesd_decoder.pth /
taesd_encoder.pth (or their .safetensors) as madebyollin/taesd publishes them (bare
nn.Sequential indices: "1.weight", "3.conv.0.bias"), a diffusers AutoencoderTiny
file or folder ("decoder.layers.0.weight", indices one lower for the decoder), or the
pinned download of taesd_decoder.pth / taesd_encoder.pth (`PINNED`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional


from sdanim.config.errors import SdanimError, check
from sdanim.core.runtime import import_keras
from sdanim.formats.digest import file_sha256
from sdanim.formats.tensors import CheckpointError, read_tensors
from sdanim.model.registry import PinnedFile, fetch
from sdanim.model.torch_weights import assign, keras_layer_name, module_name

# madebyollin/taesd at its "TAESD 1.3" commit (2024-11-07), the last to change these
# files. The repository's own record of their content is their git blob id (the files
# are too large for the stored snapshots this was written from, so their SHA-256 could
# not be taken here); a download is checked against it.
_TAESD = "https://raw.githubusercontent.com/madebyollin/taesd/7f572ca629c9b0d3c9f71140e5f501e09f9ea280/"
PINNED = {
    "decoder": PinnedFile("taesd_decoder.pth", _TAESD + "taesd_decoder.pth",
                          git_blob="5915a429fc08eba4adf62bf74f96705b8b0d5c1f", what="TAESD decoder", flag="--taesd FILE|DIR"),
    "encoder": PinnedFile("taesd_encoder.pth", _TAESD + "taesd_encoder.pth",
                          git_blob="65f85afc58480128926e52086fbf0fdc61c2c9b5", what="TAESD encoder", flag="--taesd FILE|DIR"),
}
LATENT_CHANNELS = 4  # SD 1.x/2.x (and SDXL); SD3 and FLUX latents have 16
SD3_LATENT_CHANNELS = 16  # TAESD3
_FAMILY = {LATENT_CHANNELS: "SD 1.x/2.x", SD3_LATENT_CHANNELS: "SD3"}
_OTHER_FILES = {  # file names of TAESDs for other latents than each family's
    LATENT_CHANNELS: (r"taesdxl|taesd3|taef1|taef2|taesana", "SDXL, SD3, FLUX, Sana", "taesd_decoder.pth / taesd_encoder.pth"),
    SD3_LATENT_CHANNELS: (r"taesdxl|taef1|taef2|taesana|taesd_(de|en)coder|^taesd$", "SD 1.x/2.x, SDXL, FLUX, Sana",
                          "taesd3_decoder.pth / taesd3_encoder.pth"),
}
WIDTH = 64  # channels of every TAESD block

# (index in the original nn.Sequential, kind, stride): conv ("c", with bias), conv
# without bias ("n"), ReLU ("r"), residual block ("b"), nearest x2 upsampling ("u").
_DECODER = ((1, "c", 1), (2, "r", 1), (3, "b", 1), (4, "b", 1), (5, "b", 1), (6, "u", 1), (7, "n", 1),
            (8, "b", 1), (9, "b", 1), (10, "b", 1), (11, "u", 1), (12, "n", 1),
            (13, "b", 1), (14, "b", 1), (15, "b", 1), (16, "u", 1), (17, "n", 1), (18, "b", 1), (19, "c", 1))
_ENCODER = ((0, "c", 1), (1, "b", 1), (2, "n", 2), (3, "b", 1), (4, "b", 1), (5, "b", 1), (6, "n", 2),
            (7, "b", 1), (8, "b", 1), (9, "b", 1), (10, "n", 2), (11, "b", 1), (12, "b", 1), (13, "b", 1), (14, "c", 1))


def _conv(keras, x, filters: int, name: str, stride: int = 1, bias: bool = True):
    """A 3x3 convolution padded by 1 on every side, as torch's Conv2d(padding=1).
    (Keras's "same" at stride 2 pads only the bottom and right: not the same pixels.)"""
    if stride == 2:
        x = keras.layers.ZeroPadding2D(1, name=keras_layer_name(f"{name}.pad"))(x)
    return keras.layers.Conv2D(filters, 3, strides=stride, padding="valid" if stride == 2 else "same",
                               use_bias=bias, name=keras_layer_name(name))(x)


def _block(keras, x, name: str):
    """TAESD's residual block: relu(conv(relu(conv(relu(conv(x))))) + x)."""
    relu = keras.layers.ReLU
    y = relu()(_conv(keras, x, WIDTH, f"{name}.conv.0"))
    y = relu()(_conv(keras, y, WIDTH, f"{name}.conv.2"))
    y = _conv(keras, y, WIDTH, f"{name}.conv.4")
    return relu()(keras.layers.Add()([y, x]))


def _stack(keras, x, plan, last_filters: int):
    for index, kind, stride in plan:
        name = str(index)
        if kind == "b":
            x = _block(keras, x, name)
        elif kind == "u":
            x = keras.layers.UpSampling2D(2, interpolation="nearest", name=name)(x)
        elif kind == "r":
            x = keras.layers.ReLU(name=name)(x)
        else:
            filters = last_filters if index == plan[-1][0] else WIDTH
            x = _conv(keras, x, filters, name, stride=stride, bias=kind == "c")
    return x


def build_decoder(latent_channels: int = LATENT_CHANNELS):
    """TAESD's decoder as a Keras model, any latent size: (B, h, w, C) -> (B, 8h, 8w, 3) in [-1, 1]."""
    keras = import_keras()
    latent = keras.Input((None, None, latent_channels), name="latent")
    x = keras.layers.Lambda(lambda z: keras.ops.tanh(z / 3.0) * 3.0, name="clamp")(latent)  # soft clamp to (-3, 3)
    x = _stack(keras, x, _DECODER, 3)
    image = keras.layers.Lambda(lambda y: y * 2.0 - 1.0, name="to_signed")(x)  # [0, 1] -> [-1, 1]
    return keras.Model(latent, image, name="taesd_decoder")


def build_encoder(latent_channels: int = LATENT_CHANNELS):
    """TAESD's encoder as a Keras model: (B, H, W, 3) in [-1, 1] -> (B, H/8, W/8, C)."""
    keras = import_keras()
    image = keras.Input((None, None, 3), name="image")
    x = keras.layers.Lambda(lambda y: (y + 1.0) / 2.0, name="to_unit")(image)  # [-1, 1] -> [0, 1]
    latent = _stack(keras, x, _ENCODER, latent_channels)
    return keras.Model(image, latent, name="taesd_encoder")


# ---------------------------------------------------------------------------------------
# weight files


def _parts_of(tensors: dict) -> dict:
    """{"decoder"/"encoder": {original key: tensor}} of one file, whatever its layout."""
    parts: dict = {}
    for key, tensor in tensors.items():
        match = re.match(r"^(decoder|encoder)\.layers\.(\d+)\.(.+)$", key)  # diffusers AutoencoderTiny
        if match:
            part, index, rest = match.groups()
            index = int(index) + (1 if part == "decoder" else 0)  # diffusers drops the decoder's Clamp
            parts.setdefault(part, {})[f"{index}.{rest}"] = tensor
        elif re.match(r"^\d+\.", key):
            parts.setdefault("bare", {})[key] = tensor
    bare = parts.pop("bare", None)
    if bare is not None:
        # taesd_decoder.pth: "1.weight" is (64, C, 3, 3) and "19.weight" (3, 64, 3, 3);
        # taesd_encoder.pth: "0.weight" is (64, 3, 3, 3) and "14.weight" (C, 64, 3, 3).
        if "19.weight" in bare:
            parts["decoder"] = bare
        elif "14.weight" in bare:
            parts["encoder"] = bare
    return parts


def latent_channels_of(part: str, tensors: dict) -> int:
    """The latent channels a decoder takes or an encoder gives, from its tensors."""
    if part == "decoder":
        return int(tensors["1.weight"].shape[1])
    return int(tensors["14.weight"].shape[0])


@dataclasses.dataclass(frozen=True)
class TaesdFiles:
    """Checked TAESD weight files: {part: (path, sha256)} and what they are for."""

    files: dict

    def record(self) -> dict:
        """What a manifest records: each part's file name and sha256."""
        return {part: {"file": os.path.basename(path), "sha256": digest} for part, (path, digest) in sorted(self.files.items())}


def _candidates(source: str) -> list:
    if os.path.isdir(source):
        names = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "taesd_decoder.safetensors",
                 "taesd_decoder.pth", "taesd_encoder.safetensors", "taesd_encoder.pth")
        return [os.path.join(source, n) for n in names if os.path.isfile(os.path.join(source, n))]
    return [source]


def check_taesd(source: Optional[str], parts=("decoder",), channels: int = LATENT_CHANNELS) -> TaesdFiles:
    """Finds and checks TAESD weights for `parts` of latents with `channels` channels
    (4: SD 1.x/2.x; 16: SD3's TAESD3) before anything is built: a file or folder the
    user gave (`source`), else (SD 1.x/2.x only) the pinned download (from the cache, or
    fetched once). Raises one line for a file that is not TAESD, a TAESD for other
    latents (told by its channels, or by its name: taesdxl, taef1), or missing weights."""
    family = _FAMILY[channels]
    check(source is not None or channels == LATENT_CHANNELS,
          f"{family}'s tiny decoder needs TAESD3 weights given with --taesd FILE|DIR (taesd3_decoder.pth or "
          ".safetensors from madebyollin/taesd, or the madebyollin/taesd3 folder); sdanim has no pinned download of "
          f"them. Received: taesd={source!r}")
    found: dict = {}
    if source is not None:
        source = os.fspath(source)
        check(os.path.exists(source), f"the TAESD weights do not exist. Received: taesd={source!r}")
        pattern, others, use = _OTHER_FILES[channels]
        check(not re.search(pattern, os.path.basename(source.rstrip("/")).lower()),
              f"these TAESD weights are for other latents ({others}), not {family}; use {use}. "
              f"Received: taesd={source!r}")
        for path in _candidates(source):
            try:
                tensors = read_tensors(path, name="taesd")
            except CheckpointError as error:
                raise SdanimError(str(error)) from None
            for part, part_tensors in _parts_of(tensors).items():
                found_channels = latent_channels_of(part, part_tensors)
                check(found_channels == channels,
                      f"this TAESD {part} is for latents with {found_channels} channels "
                      f"({'SD3 or FLUX' if found_channels == 16 else 'SD 1.x/2.x or SDXL'}), not {family}'s "
                      f"{channels}. Received: taesd={path!r}")
                found.setdefault(part, path)
        check(found, "not TAESD weights (no taesd decoder or encoder tensors: '1.weight' ... '19.weight', or "
                     f"'decoder.layers.*'). Received: taesd={source!r}")
    for part in parts:
        if part not in found:
            check(source is None, f"no TAESD {part} in these weights; give a file or folder that has it "
                                  f"(taesd_{part}.pth). Received: taesd={source!r}")
            found[part] = fetch(PINNED[part], "taesd")
    return TaesdFiles({part: (path, file_sha256(path)) for part, path in found.items() if part in parts})


def _assign(model, tensors: dict, path: str, family: str = "SD 1.x/2.x") -> None:
    """Copies the tensors into the Keras model's convolutions, named as the file's
    modules (`sdanim.model.torch_weights`); every weight accounted for."""
    layers = {module_name(layer.name): layer for layer in model.layers
              if layer.weights and not module_name(layer.name).endswith(".pad")}
    assign(layers, tensors, f"the TAESD file (not a TAESD for {family}?)", f"taesd={path!r}")


def load_part(files: TaesdFiles, part: str, channels: int = LATENT_CHANNELS):
    """The Keras decoder or encoder (for latents of `channels`) with the checked file's weights."""
    path = files.files[part][0]
    tensors = _parts_of(read_tensors(path, name="taesd"))[part]
    model = build_decoder(channels) if part == "decoder" else build_encoder(channels)
    _assign(model, tensors, path, _FAMILY[channels])
    return model


__all__ = ["build_decoder", "build_encoder", "check_taesd", "load_part", "TaesdFiles", "PINNED", "LATENT_CHANNELS",
           "SD3_LATENT_CHANNELS"]
