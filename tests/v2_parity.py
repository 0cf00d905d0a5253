"""SD 2.1 with random weights at 128x128: sdanim's renderer vs KerasCV's StableDiffusionV2
loop. Run in its own process by tests/test_heavy.py (frees the ~7 GB afterwards).
Prints the max pixel difference; exits 1 if it is above 2 levels.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
    from sdanim.api import prompt_encoder
    from sdanim.models import keras_cv_pipeline, load_model
    from sdanim.noise import seeded_noise
    from sdanim.sampling import Renderer
    from sdanim.settings import RenderSettings

    model = load_model(version="2.1", weights="random", height=128, width=128, precision="float32", jit_compile=False)
    encoder = prompt_encoder(model)
    contexts = encoder.encode(["a lighthouse in a storm"])  # (1, 77, 1024)
    assert contexts.shape == (1, 77, 1024), contexts.shape
    noise = seeded_noise(3, (16, 16, 4))[None]
    settings = RenderSettings(height=128, width=128, num_steps=2, batch_size=1)
    ours = Renderer(model.diffusion_model, model.decoder, settings, encoder.encode_one("")).render(contexts, noise, [3])
    theirs = keras_cv_pipeline(model).generate_image(contexts, batch_size=1, num_steps=2, diffusion_noise=noise)
    diff = int(np.abs(ours.astype(int) - np.asarray(theirs).astype(int)).max())
    print(f"sd2.1 max pixel diff {diff}, image std {ours.std():.1f}")
    return 0 if diff <= 2 and ours.std() > 1 else 1


if __name__ == "__main__":
    sys.exit(main())
