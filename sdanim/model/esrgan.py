"""Real-ESRGAN's upscalers in Keras 3, tiled for any image size.

    images (B, H, W, 3) uint8 -> (B, s H, s W, 3) uint8, s = the model's scale

Architectures, recognised from a file's tensors as spandrel recognises them:

- RRDBNet (ESRGAN, Real-ESRGAN x4plus, x2plus, the 6-block anime model): conv, N residual-
  in-residual dense blocks (each 3 dense blocks of 5 convs, residuals scaled by 0.2),
  conv, then x2 nearest upsampling + conv twice, conv, conv. A x2 (x1) model first
  folds each 2x2 (4x4) pixel block into channels (pixel unshuffle). Files in Real-ESRGAN's
  layout (`conv_first`, `body.N.rdbM.convK`, wrapped in `params_ema`/`params`) and in the
  original ESRGAN layout (`model.0`, `model.1.sub.N.RDBM.convK.0`) both load.
- SRVGGNetCompact (realesr-general-x4v3, realesr-animevideov3): conv + PReLU, N x
  (conv + PReLU), a conv to 3 s^2 channels, pixel shuffle, plus the input upsampled by
  nearest neighbour.

Tiled inference: the image is cut into tiles of `tile` pixels, each run with `overlap`
pixels of its neighbours around it, and only its own region kept, so any size fits in
memory and the seams match the whole-image result (tests/test_upscale.py measures it).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Callable, Optional

import numpy as np

from sdanim.config.errors import SdanimError, check
from sdanim.core.runtime import import_keras
from sdanim.formats.digest import file_sha256
from sdanim.formats.tensors import CheckpointError, read_tensors
from sdanim.model.compiled import compiled
from sdanim.model.registry import CheckedFile, PinnedFile, fetch
from sdanim.model.torch_weights import assign, keras_layer_name

_RELEASES = "https://github.com/xinntao/Real-ESRGAN/releases/download/"
# The release assets of xinntao/Real-ESRGAN, with the SHA-256 several independent
# projects pin for them (found in public code; not re-downloaded here, offline).
PINNED = {
    "realesrgan-x4plus": PinnedFile(
        "RealESRGAN_x4plus.pth", _RELEASES + "v0.1.0/RealESRGAN_x4plus.pth",
        sha256="4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1",
        what="Real-ESRGAN x4plus", flag="--upscale-model FILE"),
    "realesrgan-x2plus": PinnedFile(
        "RealESRGAN_x2plus.pth", _RELEASES + "v0.2.1/RealESRGAN_x2plus.pth",
        sha256="49fafd45f8fd7aa8d31ab2a22d14d91b536c34494a5cfe31eb5d89c2fa266abb",
        what="Real-ESRGAN x2plus", flag="--upscale-model FILE"),
    "realesrgan-x4plus-anime": PinnedFile(
        "RealESRGAN_x4plus_anime_6B.pth", _RELEASES + "v0.2.2.4/RealESRGAN_x4plus_anime_6B.pth",
        sha256="f872d837d3c90ed2e05227bed711af5671a6fd1c9f7d7e91c911a61f155e99da",
        what="Real-ESRGAN x4plus anime 6B", flag="--upscale-model FILE"),
    "realesr-general-x4v3": PinnedFile(
        "realesr-general-x4v3.pth", _RELEASES + "v0.2.5.0/realesr-general-x4v3.pth",
        sha256="8dc7edb9ac80ccdc30c3a5dca6616509367f05fbc184ad95b731f05bece96292",
        what="Real-ESRGAN general x4v3", flag="--upscale-model FILE"),
    "realesr-animevideov3": PinnedFile(
        "realesr-animevideov3.pth", _RELEASES + "v0.2.5.0/realesr-animevideov3.pth",
        sha256="3a5ca263a93b5c827d6e4a482b8857df6cc8a5c78a9a6065b5e72d4f60b0c7d6",
        what="Real-ESRGAN animevideo v3", flag="--upscale-model FILE"),
}
DEFAULT_FOR_SCALE = {4: "realesrgan-x4plus", 2: "realesrgan-x2plus"}


@dataclasses.dataclass(frozen=True)
class Arch:
    """What a file holds: "rrdb" or "compact", with the hyperparameters read off its tensors."""

    kind: str
    scale: int  # the whole model's factor (after any pixel unshuffle)
    num_feat: int
    num_block: int  # RRDB blocks, or Compact's body convs
    num_grow: int = 32  # RRDB's growth channels
    unshuffle: int = 1  # RRDB x2: 2, x1: 4

    def describe(self) -> str:
        what = f"RRDBNet {self.num_block} blocks" if self.kind == "rrdb" else f"SRVGGNetCompact {self.num_block} convs"
        return f"{what}, {self.num_feat} features, x{self.scale}"


# ---------------------------------------------------------------------------------------
# reading and recognising files


def _unwrap(tensors: dict) -> dict:
    """Real-ESRGAN's files wrap the weights: prefer the EMA copy ("params_ema"), as its
    inference script does, else "params"."""
    for prefix in ("params_ema.", "params."):
        inner = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if inner:
            return inner
    return tensors


def _old_to_new(tensors: dict) -> dict:
    """The original ESRGAN layout ("model.0", "model.1.sub.N.RDBM.convK.0") in Real-ESRGAN's names."""
    blocks = sorted({int(m.group(1)) for k in tensors for m in [re.match(r"model\.1\.sub\.(\d+)\.RDB", k)] if m})
    trunk = max(blocks) + 1
    ups = sorted({int(m.group(1)) for k in tensors for m in [re.match(r"model\.(\d+)\.weight$", k)] if m} - {0})
    ups = [i for i in ups if i not in (ups[-1], ups[-2])] if len(ups) >= 2 else []  # the last two: conv_hr, conv_last
    last_up = max(ups) if ups else 1
    names = {}
    for key in tensors:
        m = re.match(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$", key)
        if m:
            names[key] = f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{m.group(4)}"
            continue
        m = re.match(r"model\.(\d+)\.(weight|bias)$", key) or re.match(rf"model\.1\.sub\.({trunk})\.(weight|bias)$", key)
        if not m:
            continue
        index, kind = int(m.group(1)), m.group(2)
        if key.startswith("model.1.sub."):
            names[key] = f"conv_body.{kind}"
        elif index == 0:
            names[key] = f"conv_first.{kind}"
        elif index in ups:
            names[key] = f"conv_up{ups.index(index) + 1}.{kind}"
        elif index == last_up + 2:
            names[key] = f"conv_hr.{kind}"
        elif index == last_up + 4:
            names[key] = f"conv_last.{kind}"
    return {new: tensors[old] for old, new in names.items()}


def detect(tensors: dict, path: str = "") -> tuple:
    """(Arch, tensors in Real-ESRGAN's names) of a file's tensors; one line for anything else."""
    tensors = _unwrap(tensors)
    if "model.0.weight" in tensors and "model.1.sub.0.RDB1.conv1.0.weight" in tensors:
        tensors = _old_to_new(tensors)
    if "conv_first.weight" in tensors and "body.0.rdb1.conv1.weight" in tensors:
        in_ch = int(tensors["conv_first.weight"].shape[1])
        unshuffle = {3: 1, 12: 2, 48: 4}.get(in_ch)
        check(unshuffle is not None, f"an RRDBNet with {in_ch} input channels (not RGB). Received: upscale_model={path!r}")
        ups = sum(1 for k in tensors if re.match(r"conv_up\d\.weight$", k))
        check(ups in (1, 2) and "conv_last.weight" in tensors and int(tensors["conv_last.weight"].shape[0]) == 3,
              f"an RRDBNet with {ups} upsampling convs or not 3 output channels. Received: upscale_model={path!r}")
        blocks = 1 + max(int(m.group(1)) for k in tensors for m in [re.match(r"body\.(\d+)\.", k)] if m)
        arch = Arch("rrdb", 2**ups // unshuffle, int(tensors["conv_first.weight"].shape[0]), blocks,
                    int(tensors["body.0.rdb1.conv1.weight"].shape[0]), unshuffle)
        return arch, tensors
    if "body.0.weight" in tensors and "body.1.weight" in tensors:
        last = max(int(m.group(1)) for k in tensors for m in [re.match(r"body\.(\d+)\.weight$", k)] if m)
        out_ch = int(tensors[f"body.{last}.weight"].shape[0])
        scale = int(round(math.sqrt(out_ch / 3)))
        check(3 * scale * scale == out_ch and int(tensors["body.0.weight"].shape[1]) == 3,
              f"a compact network whose last conv has {out_ch} channels (not 3 x scale^2). Received: upscale_model={path!r}")
        return Arch("compact", scale, int(tensors["body.0.weight"].shape[0]), (last - 2) // 2), tensors
    raise SdanimError(
        "not a Real-ESRGAN/ESRGAN upscaler (sdanim reads RRDBNet: conv_first/body.N.rdbM or model.0/model.1.sub.N, "
        f"and SRVGGNetCompact: body.N); another architecture? Received: upscale_model={path!r}"
    )


@dataclasses.dataclass(frozen=True)
class UpscalerFile(CheckedFile):
    """Checked upscaler weights: the file, its SHA-256, and its architecture."""

    arch: Arch

    def record(self) -> dict:
        return {**super().record(), "arch": self.arch.describe()}


def _tensors(path: str) -> dict:
    try:
        return read_tensors(path, name="upscale_model")
    except CheckpointError as error:
        raise SdanimError(str(error)) from None


def check_upscaler(source: Optional[str], scale: Optional[int] = None) -> UpscalerFile:
    """Finds and checks the weights before anything is rendered: a file (or a name in
    `PINNED`, fetched once), else the pinned model for `scale`; a model whose scale is
    not `scale` is refused with one line."""
    check(scale in (None, 1, 2, 4), f"upscale must be 2 or 4. Received: upscale={scale!r}")
    if source is None:
        scale = 4 if scale is None else scale
        check(scale in DEFAULT_FOR_SCALE, f"upscale must be 2 or 4. Received: upscale={scale!r}")
        source = DEFAULT_FOR_SCALE[scale]
    source = os.fspath(source)
    if source in PINNED:
        path = fetch(PINNED[source], "upscale_model")
    else:
        check(os.path.isfile(source), f"the upscaler weights file does not exist (or is not a known name: "
                                      f"{', '.join(PINNED)}). Received: upscale_model={source!r}")
        path = source
    arch, _ = detect(_tensors(path), path)
    check(scale is None or arch.scale == scale,
          f"this upscaler enlarges x{arch.scale}, not x{scale}; choose --upscale {arch.scale} or another model. "
          f"Received: upscale={scale}")
    return UpscalerFile(path, file_sha256(path), arch)


# ---------------------------------------------------------------------------------------
# the networks


def _pixel_unshuffle(ops, x, r: int):
    """torch pixel_unshuffle(r) in channels-last: input pixel (r y + i, r x + j) of
    channel c goes to channel c r^2 + i r + j."""
    h, w, c = x.shape[1], x.shape[2], x.shape[3]
    x = ops.reshape(x, (-1, h // r, r, w // r, r, c))  # (B, h, i, w, j, C)
    x = ops.transpose(x, (0, 1, 3, 5, 2, 4))  # (B, h, w, C, i, j)
    return ops.reshape(x, (-1, h // r, w // r, c * r * r))


def _pixel_shuffle(ops, x, r: int):
    """torch pixel_shuffle(r) in channels-last (the inverse of `_pixel_unshuffle`)."""
    h, w, c = x.shape[1], x.shape[2], x.shape[3]
    x = ops.reshape(x, (-1, h, w, c // (r * r), r, r))  # (B, H, W, C, i, j)
    x = ops.transpose(x, (0, 1, 4, 2, 5, 3))  # (B, H, i, W, j, C)
    return ops.reshape(x, (-1, h * r, w * r, c // (r * r)))


def make_layers(arch: Arch) -> dict:
    """The network's layers by Real-ESRGAN's tensor names, made once and shared by the
    networks built for each tile size (`build`)."""
    keras = import_keras()

    def conv(filters):
        return lambda name: keras.layers.Conv2D(filters, 3, padding="same", name=name)

    names = {}
    if arch.kind == "compact":
        for k in range(arch.num_block + 1):
            names[f"body.{2 * k}"] = conv(arch.num_feat)
            names[f"body.{2 * k + 1}"] = lambda name: keras.layers.PReLU(shared_axes=[1, 2], name=name)
        names[f"body.{2 * arch.num_block + 2}"] = conv(3 * arch.scale**2)
    else:
        names["conv_first"] = conv(arch.num_feat)
        for b in range(arch.num_block):
            for d in (1, 2, 3):
                for k in range(1, 6):
                    names[f"body.{b}.rdb{d}.conv{k}"] = conv(arch.num_grow if k < 5 else arch.num_feat)
        names["conv_body"] = conv(arch.num_feat)
        for k in range(int(round(math.log2(arch.scale * arch.unshuffle)))):
            names[f"conv_up{k + 1}"] = conv(arch.num_feat)
        names["conv_hr"] = conv(arch.num_feat)
        names["conv_last"] = conv(3)
    return {name: make(keras_layer_name(name)) for name, make in names.items()}


def build(arch: Arch, layers: dict, height: int, width: int):
    """The Keras network for input tiles of (height, width): (B, h, w, 3) in [0, 1] ->
    (B, s h, s w, 3), on the shared `layers` (`make_layers`)."""
    keras = import_keras()
    ops = keras.ops

    def lrelu(x):
        return ops.leaky_relu(x, negative_slope=0.2)

    image = keras.Input((height, width, 3), name="image")
    if arch.kind == "compact":
        x = image
        for k in range(arch.num_block + 1):  # conv + PReLU, then num_block x (conv + PReLU)
            x = layers[f"body.{2 * k + 1}"](layers[f"body.{2 * k}"](x))
        x = layers[f"body.{2 * arch.num_block + 2}"](x)
        base = ops.repeat(ops.repeat(image, arch.scale, axis=1), arch.scale, axis=2)  # nearest x scale
        return keras.Model(image, _pixel_shuffle(ops, x, arch.scale) + base, name="srvgg_compact")

    feat = _pixel_unshuffle(ops, image, arch.unshuffle) if arch.unshuffle > 1 else image
    feat = layers["conv_first"](feat)
    body = feat
    for b in range(arch.num_block):
        block_in = body
        for d in (1, 2, 3):
            rdb_in, parts = body, [body]
            for k in range(1, 6):
                y = layers[f"body.{b}.rdb{d}.conv{k}"](parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=-1))
                parts.append(lrelu(y) if k < 5 else y)
            body = parts[-1] * 0.2 + rdb_in  # residual dense block
        body = body * 0.2 + block_in  # residual in residual
    feat = feat + layers["conv_body"](body)
    for k in range(int(round(math.log2(arch.scale * arch.unshuffle)))):
        feat = ops.repeat(ops.repeat(feat, 2, axis=1), 2, axis=2)  # nearest x2
        feat = lrelu(layers[f"conv_up{k + 1}"](feat))
    out = layers["conv_last"](lrelu(layers["conv_hr"](feat)))
    return keras.Model(image, out, name="rrdbnet")


def _assign(layers: dict, tensors: dict, path: str) -> None:
    """The file's tensors into the built layers (`sdanim.model.torch_weights`; a PReLU's
    weight (C,) is Keras's alpha (1, 1, C))."""

    def prelu(name, layer):
        if type(layer).__name__ == "PReLU":
            return [tensors[f"{name}.weight"].load().reshape(1, 1, -1)], [f"{name}.weight"]
        return None

    assign(layers, tensors, "the upscaler file", f"upscale_model={path!r}", special=prelu)


def _physical_memory() -> int:
    """Bytes of memory this machine has (16 GiB where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def tiles(size: int, tile: int, overlap: int, multiple: int = 1) -> list:
    """[(start, stop, keep_start, keep_stop)] along one side: each tile's input span
    (its own span widened by `overlap`, within the image) and the part of it it keeps.
    Spans are aligned to `multiple` (an unshuffling model folds that many pixels)."""
    tile = max(multiple, tile - tile % multiple)
    out = []
    for start in range(0, size, tile):
        stop = min(size, start + tile)
        lo = max(0, start - overlap)
        lo -= lo % multiple
        hi = min(size, stop + overlap)
        hi += (-hi) % multiple  # `size` is a multiple of `multiple` (the image is padded to one)
        out.append((lo, hi, start - lo, stop - lo))
    return out


def _run(calls, images):
    """The network as one compiled function (`sdanim.model.compiled`): a graph, not the
    eager layer-by-layer call that holds every intermediate at the output's size."""
    return calls[0](images)


class Upscaler:
    """A loaded upscaler: `upscale(images)` for uint8 frames of any size, in tiles.

    Args:
        file: `UpscalerFile` (from `check_upscaler`).
        tile: int. Input pixels per tile side. Defaults to 256.
        overlap: int. Neighbouring pixels each tile sees on every side. Defaults to 32.
    """

    def __init__(self, file: UpscalerFile, tile: int = 256, overlap: int = 32):
        check(isinstance(tile, int) and tile >= 16, f"tile must be at least 16 pixels. Received: tile={tile!r}")
        check(isinstance(overlap, int) and overlap >= 0, f"overlap must be >= 0 pixels. Received: overlap={overlap!r}")
        self.file = file
        self.scale = file.arch.scale
        self.tile, self.overlap = tile, overlap
        self._layers = make_layers(file.arch)
        self._networks: dict = {}

    def network(self, height: int, width: int):
        """The network for tiles of (height, width): the shared layers on that input size
        (the first one built gives the layers their weights)."""
        if (height, width) not in self._networks:
            first = not self._networks
            self._networks[(height, width)] = build(self.file.arch, self._layers, height, width)
            if first:
                _assign(self._layers, detect(_tensors(self.file.path), self.file.path)[1], self.file.path)
        return self._networks[(height, width)]

    def check_fits(self, shape) -> None:
        """Refuses (one line, before anything is computed) a batch whose result and tile
        activations would need more than half of this machine's memory."""
        b, h, w = (int(x) for x in shape[:3])
        s, side = self.scale, self.tile + 2 * self.overlap
        result = b * h * s * w * s * 3 * (4 + 1)  # the float32 result and its uint8 copy
        tile_pixels = min(side, h) * min(side, w)  # a tile never reaches past the image
        tiles = b * tile_pixels * s * s * self.file.arch.num_feat * 4 * 3  # a few feature maps at the output scale
        total = _physical_memory()
        check(result + tiles <= total / 2,
              f"{b} image(s) of {w}x{h} are too large to upscale in this machine's memory: x{s} needs about "
              f"{(result + tiles) / 2**30:.1f} GB of its {total / 2**30:.1f} GB; upscale fewer or smaller images. "
              f"Received: images of {w}x{h}")

    def tile_count(self, shape) -> int:
        """How many tiles an image of `shape` (H, W, ...) is upscaled in (`upscale` calls
        `progress(1)` after each)."""
        m = self.file.arch.unshuffle
        h, w = int(shape[0]) + (-int(shape[0])) % m, int(shape[1]) + (-int(shape[1])) % m
        return len(tiles(h, self.tile, self.overlap, m)) * len(tiles(w, self.tile, self.overlap, m))

    def upscale(self, images: np.ndarray, progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, s H, s W, 3) uint8, tile by tile (each tile over the
        whole batch). `progress(n)` is called after each tile."""
        ops = import_keras().ops
        images = np.asarray(images)
        check(images.ndim == 4 and images.shape[-1] == 3 and images.dtype == np.uint8,
              f"images must be (B, H, W, 3) uint8. Received: shape {images.shape}, dtype {images.dtype}")
        self.check_fits(images.shape)
        b, h, w = images.shape[:3]
        m, s = self.file.arch.unshuffle, self.scale
        x = np.pad(images.astype(np.float32) / 255.0, ((0, 0), (0, (-h) % m), (0, (-w) % m), (0, 0)), mode="reflect")
        out = np.zeros((b, x.shape[1] * s, x.shape[2] * s, 3), np.float32)
        for y0, y1, ky0, ky1 in tiles(x.shape[1], self.tile, self.overlap, m):
            for x0, x1, kx0, kx1 in tiles(x.shape[2], self.tile, self.overlap, m):
                network = compiled(_run, (self.network(y1 - y0, x1 - x0),), False)
                part = ops.convert_to_numpy(network(np.ascontiguousarray(x[:, y0:y1, x0:x1])))
                out[:, (y0 + ky0) * s:(y0 + ky1) * s, (x0 + kx0) * s:(x0 + kx1) * s] = \
                    part[:, ky0 * s:ky1 * s, kx0 * s:kx1 * s]
                if progress is not None:
                    progress(1)
        return np.clip(np.rint(out[:, :h * s, :w * s] * 255.0), 0, 255).astype(np.uint8)


__all__ = ["Arch", "Upscaler", "UpscalerFile", "PINNED", "DEFAULT_FOR_SCALE", "build", "make_layers", "check_upscaler",
           "detect", "tiles"]
