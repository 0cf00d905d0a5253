"""The post networks on whatever KERAS_BACKEND is set: RIFE in-betweens, Real-ESRGAN
upscaling (the compact and the RRDB architectures, tiled) and the tiny decoder (TAESD's
decoder and encoder), from the weight files in FOLDER (written by tests/test_backends.py
with torch, so every backend reads the same weights through sdanim's own loaders).

    python backend_post.py FOLDER OUT.npz   ->   {name: output}
"""

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

FILES = {"rife": "flownet.pkl", "compact": "compact_x2.pth", "rrdb": "rrdb_x2.pth", "taesd": "taesd.safetensors"}


def inputs() -> dict:
    """Frames with something for a flow to follow (blocks, the second shifted), latents."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (3, 10, 14, 3)).astype(np.uint8)
    frames0 = np.repeat(np.repeat(blocks, 4, axis=1), 4, axis=2)  # (3, 40, 56, 3): padded to 64x64 by RIFE
    frames1 = np.roll(frames0, (3, -2), axis=(1, 2))
    return {"frames0": frames0, "frames1": frames1, "times": np.array([0.25, 0.5, 0.75], np.float32),
            "latents": rng.standard_normal((2, 8, 8, 4)).astype(np.float32)}


def run(folder: str) -> dict:
    from sdanim.core.runtime import import_keras
    from sdanim.model.esrgan import Upscaler, check_upscaler
    from sdanim.model.rife import Interpolator, check_rife
    from sdanim.model.taesd import check_taesd, load_part

    ops = import_keras().ops
    x = inputs()
    out = {"rife": Interpolator(check_rife(os.path.join(folder, FILES["rife"]))).between(
        x["frames0"], x["frames1"], x["times"])}
    for arch in ("compact", "rrdb"):  # tiles of 24 px with 8 px overlap: the seams' blending too
        upscaler = Upscaler(check_upscaler(os.path.join(folder, FILES[arch])), tile=24, overlap=8)
        out[arch] = upscaler.upscale(x["frames0"][:2])
    files = check_taesd(os.path.join(folder, FILES["taesd"]), parts=("decoder", "encoder"))
    decoded = ops.convert_to_numpy(load_part(files, "decoder")(x["latents"]))
    out["taesd_decoder"] = decoded.astype(np.float32)
    out["taesd_encoder"] = ops.convert_to_numpy(load_part(files, "encoder")(decoded)).astype(np.float32)
    return out


if __name__ == "__main__":
    np.savez(sys.argv[2], **run(sys.argv[1]))
