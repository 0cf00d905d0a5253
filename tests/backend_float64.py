"""Every tool on the torch backend, with a guard that records each float64 tensor torch makes.

Apple's MPS device cannot hold a float64 tensor: one crashes the render
(keras-team/keras#23700). On Linux the same renders run on the CPU, so this script runs
them under a `TorchDispatchMode` that sees every op torch runs and records those whose
result is float64 -- except `lift_fresh`, torch wrapping a NumPy array where it lies (on the
CPU, before any cast to the device and dtype). Run by tests/test_backends.py as

    KERAS_BACKEND=torch python backend_float64.py FOLDER OUT.json

OUT.json: {"ran": [what ran], "float64": [{"op", "where"}]} (`where`: the innermost sdanim
frames of the call that made the tensor).
"""

import dataclasses
import json
import os
import sys
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))


def _guard():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Float64Guard(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = {}  # (op, where) -> count

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.lift_fresh.default:
                return out
            results = out if isinstance(out, (tuple, list)) else [out]
            if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in results):
                frames = [f for f in traceback.extract_stack() if f"{os.sep}sdanim{os.sep}" in f.filename]
                where = " <- ".join(f"{os.path.relpath(f.filename, os.path.join(HERE, '..'))}:{f.lineno} {f.name}"
                                    for f in reversed(frames[-4:])) or "outside sdanim"
                key = (str(func), where)
                self.seen[key] = self.seen.get(key, 0) + 1
            return out

    return Float64Guard()


def _renders(folder: str, ran: list) -> None:
    """Every tool with the tiny models: each sampler (compiled program and step loop,
    image-to-image and inpainting, attention interpolation), the tasks (generate, img2img,
    inpaint, grid, steps, a morph with in-betweens and upscaling, a ControlNet morph, a
    motion-module morph, a morph through the tiny decoder)."""
    import sdanim
    from sdanim.config.choices import SCHEDULERS
    from sdanim.model.attention_interp import AidBatch
    from sdanim.render.sampling import Renderer
    from tiny import CONTEXT_DIM, make_tiny_model, make_tiny_sd_model, random_inputs

    model = make_tiny_model()
    contexts, noises = random_inputs(2, 64, 64)
    uncond = np.zeros((77, CONTEXT_DIM), np.float32)
    init = np.random.default_rng(1).standard_normal(noises.shape).astype(np.float32)
    masks = np.zeros((*noises.shape[:3], 1), np.float32)
    masks[:, :, 4:] = 1.0
    for scheduler in SCHEDULERS:  # (AnimateDiff's linear betas: the motion morph below)
        settings = sdanim.RenderSettings(height=64, width=64, num_steps=2, batch_size=2, scheduler=scheduler,
                                         guidance_scale=7.5)
        for loop in ("program", "steps"):
            Renderer(model.diffusion_model, model.decoder, settings, uncond, loop=loop).render(contexts, noises, [0, 1])
        Renderer(model.diffusion_model, model.decoder, settings, uncond, strength=0.5).render(
            contexts, noises, [0, 1], init_latents=init, masks=masks)
        ran.append(f"sampler {scheduler}")
    aid_model = make_tiny_model(attention=True)
    aid_contexts, aid_noises = random_inputs(5, 64, 64, seed=2)
    aid = AidBatch("fused", 0.5, 3, np.array([0.25, 0.5, 0.75, 0, 0], np.float32), np.array([3, 3, 3, 0, 0]),
                   np.array([4, 4, 4, 0, 0]), np.array([1, 1, 1, 0, 0], np.float32))
    Renderer(aid_model.diffusion_model, model.decoder, settings, uncond).render(
        aid_contexts, aid_noises, [0, 1, 2, 3, 4], aid=aid)
    ran.append("attention interpolation")

    sd = make_tiny_sd_model(context_dim=768)
    settings = sdanim.RenderSettings(height=64, width=64, num_steps=2, batch_size=2)
    out = os.path.join(folder, "out")
    picture = np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    common = dict(settings=settings, model=sd, progress=False)
    sdanim.generate("a red barn", num_images=2, seed=1, out_dir=out, **common)
    sdanim.img2img(picture, "a red barn", seed=1, out_dir=out, **common)
    sdanim.inpaint(picture, mask, "a red barn", seed=1, out_dir=out, **common)
    sdanim.grid(["a red barn", "a lighthouse"], seeds=[1], out=os.path.join(out, "grid.png"), **common)
    sdanim.denoising_steps("a red barn", seed=1, out=os.path.join(out, "steps.gif"), **common)
    ran.append("generate, img2img, inpaint, grid, steps")
    export = sdanim.ExportSettings(fps=4, interpolate=2, rife=os.path.join(folder, "flownet.pkl"), upscale=2,
                                   upscale_model=os.path.join(folder, "compact_x2.pth"))
    sdanim.morph(["a red barn", "a snowy forest"], out=os.path.join(out, "morph.gif"), frames=3, seed=5,
                 export=export, **common)
    ran.append("morph with in-betweens and upscaling")
    image = os.path.join(folder, "hint.png")
    sdanim.save_image(picture, image)
    sdanim.morph(["a red barn", "a snowy forest"], out=os.path.join(out, "control.gif"), frames=3, seed=5,
                 controlnets=[sdanim.ControlNetSpec("random", image=image, preprocess="canny")], **common)
    ran.append("ControlNet morph")
    sdanim.morph(["a red barn", "a snowy forest", "a city"], out=os.path.join(out, "motion.gif"), frames=6, seed=5,
                 motion=sdanim.MotionSpec("random", context=4, stride=2), **common)
    ran.append("motion-module morph")
    sd.taesd = os.path.join(folder, "taesd_decoder.pth")
    tiny = dataclasses.replace(settings, decoder="tiny")
    sdanim.morph(["a red barn", "a snowy forest"], out=os.path.join(out, "tiny.gif"), frames=3, seed=5,
                 settings=tiny, model=sd, progress=False)
    ran.append("morph with the tiny decoder")


def main(folder: str, out_path: str) -> None:
    import keras

    assert keras.backend.backend() == "torch", keras.backend.backend()
    import torch

    from test_rife import _reference as rife_net, _save as save_rife
    from test_upscale import _compact_state

    save_rife(rife_net(False), os.path.join(folder, "flownet.pkl"))  # the post networks' files (made with torch)
    from diffusers import AutoencoderTiny
    from test_taesd import _original, _write

    torch.manual_seed(0)
    _write(os.path.join(folder, "taesd_decoder.pth"), _original(AutoencoderTiny().eval().state_dict(), "decoder"))
    torch.save(_compact_state(num_feat=8, num_conv=2, scale=2), os.path.join(folder, "compact_x2.pth"))
    guard, ran = _guard(), []
    with guard:
        _renders(folder, ran)
    seen = [{"op": op, "where": where, "count": n} for (op, where), n in guard.seen.items()]
    with open(out_path, "w") as f:
        json.dump({"ran": ran, "float64": seen}, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
