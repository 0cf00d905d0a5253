"""A motion-module morph with the tiny SD model on whatever KERAS_BACKEND is set: prompt
travel over three keyframes, 6 frames in windows of 4 every 2 (FreeNoise's weighting and
noise), the random motion modules (drawn with NumPy: the same on every backend), guided.
Run by tests/test_backends.py; the first run (TensorFlow's, in the test process) writes the
tiny model's weights, the others read them.

    python backend_motion.py WEIGHTS.npz FOLDER OUT.npz
"""

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

PARTS = ("text_encoder", "diffusion_model", "decoder")


def run(weights: str, folder: str) -> np.ndarray:
    import sdanim
    from tiny import make_tiny_sd_model

    model = make_tiny_sd_model(context_dim=768)
    if os.path.exists(weights):
        with np.load(weights) as data:
            for part in PARTS:
                net = getattr(model, part)
                net.set_weights([data[f"{part}_{i}"] for i in range(len(net.weights))])
    else:
        np.savez(weights, **{f"{part}_{i}": w for part in PARTS for i, w in enumerate(getattr(model, part).get_weights())})
    settings = sdanim.RenderSettings(height=64, width=64, num_steps=2, batch_size=2, guidance_scale=7.5)
    result = sdanim.morph(["a red barn", "a snowy forest", "a city at night"], out=os.path.join(folder, "motion.gif"),
                          frames=6, seed=5, motion=sdanim.MotionSpec("random", context=4, stride=2),
                          settings=settings, model=model, progress=False)
    return np.asarray(result.frames)


if __name__ == "__main__":
    np.save(sys.argv[3], run(sys.argv[1], sys.argv[2]))
