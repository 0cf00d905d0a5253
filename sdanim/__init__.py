"""sdanim: Stable Diffusion latent-walk animations on Keras 3 and KerasCV.

Importing sdanim is cheap and has no side effects; Keras, TensorFlow and KerasCV are
imported when a model is loaded or frames are rendered.

Example:
```python
import sdanim
result = sdanim.morph(["a ford truck on a dirt road", "an electric car in a city"],
                      frames=24, seed=42, export=sdanim.ExportSettings(fps=12))
```
"""

__version__ = "0.1.0"

_EXPORTS = {
    "morph": "sdanim.api",
    "animate": "sdanim.api",
    "Walk": "sdanim.keyframes",
    "Keyframe": "sdanim.keyframes",
    "load_walk": "sdanim.keyframes",
    "circle_walk": "sdanim.keyframes",
    "generate": "sdanim.api",
    "MorphResult": "sdanim.api",
    "GenerateResult": "sdanim.api",
    "img2img": "sdanim.edits",
    "inpaint": "sdanim.edits",
    "outpaint": "sdanim.edits",
    "image_morph": "sdanim.edits",
    "grid": "sdanim.edits",
    "denoising_steps": "sdanim.edits",
    "load_model": "sdanim.models",
    "convert_checkpoint": "sdanim.models",
    "load_checkpoint_weights": "sdanim.models",
    "inspect_checkpoint": "sdanim.checkpoints",
    "StableDiffusionModel": "sdanim.models",
    "RenderSettings": "sdanim.settings",
    "ExportSettings": "sdanim.run",
    "ModelSpec": "sdanim.run",
    "Lora": "sdanim.lora",
    "Workers": "sdanim.distributed",
    "FailedFrames": "sdanim.distributed",
    "SdanimError": "sdanim.errors",
    "plot_images": "sdanim.notebook",
    "save_image": "sdanim.notebook",
    "show_gif": "sdanim.notebook",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name == "ui":  # sdanim.ui.launch(...): imports Gradio only when used
        import importlib

        return importlib.import_module("sdanim.ui")
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sdanim' has no attribute {name!r}")
