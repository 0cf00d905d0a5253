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

__version__ = "0.1.0"  # also in sdanim.config and pyproject.toml

_EXPORTS = {
    "morph": "sdanim.tasks.walks",
    "animate": "sdanim.tasks.walks",
    "image_morph": "sdanim.tasks.walks",
    "MorphResult": "sdanim.tasks.walks",
    "generate": "sdanim.tasks.images",
    "GenerateResult": "sdanim.tasks.images",
    "img2img": "sdanim.tasks.images",
    "inpaint": "sdanim.tasks.images",
    "outpaint": "sdanim.tasks.images",
    "grid": "sdanim.tasks.images",
    "denoising_steps": "sdanim.tasks.images",
    "Walk": "sdanim.core.keyframes",
    "Keyframe": "sdanim.core.keyframes",
    "load_walk": "sdanim.formats.walk_files",
    "circle_walk": "sdanim.core.keyframes",
    "load_model": "sdanim.model.loading",
    "convert_checkpoint": "sdanim.model.loading",
    "load_checkpoint_weights": "sdanim.model.loading",
    "inspect_checkpoint": "sdanim.formats.checkpoints",
    "StableDiffusionModel": "sdanim.model.stable_diffusion",
    "RenderSettings": "sdanim.config.settings",
    "ExportSettings": "sdanim.config.export",
    "ModelSpec": "sdanim.model.spec",
    "ControlNetSpec": "sdanim.config.control",
    "MotionSpec": "sdanim.config.motion",
    "Limits": "sdanim.config.limits",
    "Lora": "sdanim.formats.lora_files",
    "Workers": "sdanim.render.ray",
    "FailedFrames": "sdanim.render.ray",
    "SdanimError": "sdanim.config.errors",
    "hardware_report": "sdanim.model.device",
    "doctor": "sdanim.tasks.doctor",
    "plot_images": "sdanim.frontends.notebook",
    "save_image": "sdanim.frontends.notebook",
    "show_gif": "sdanim.frontends.notebook",
    "show_image": "sdanim.frontends.notebook",
    "plot_smoothness": "sdanim.frontends.notebook",
    "interpolate": "sdanim.tasks.tools",
    "upscale": "sdanim.tasks.tools",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name == "ui":  # sdanim.ui.launch(...): Gradio is imported when the app is built
        import importlib

        return importlib.import_module("sdanim.ui")
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sdanim' has no attribute {name!r}")
