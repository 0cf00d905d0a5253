"""Loads KerasCV's Stable Diffusion modules on a machine without TensorFlow.

`import keras_cv` imports TensorFlow (its version check and backend config do), whatever
KERAS_BACKEND is. The Stable Diffusion files themselves only need Keras 3. This shim
registers bare parent packages and the two helper modules they import
(`keras_cv.src.backend`, `keras_cv.src.api_export`) so the real model files load
unchanged. For benchmarks on GPU machines that have JAX but no TensorFlow; never
imported by sdanim itself.
"""

import importlib.util
import os
import sys
import types


def install() -> bool:
    """Installs the shim if TensorFlow is missing. Returns True if it did."""
    if importlib.util.find_spec("tensorflow") is not None:
        return False
    import keras

    spec = importlib.util.find_spec("keras_cv")
    root = list(spec.submodule_search_locations)[0]

    def package(name, path):
        mod = types.ModuleType(name)
        mod.__path__ = [path]
        sys.modules[name] = mod
        return mod

    kcv = package("keras_cv", root)
    src = package("keras_cv.src", os.path.join(root, "src"))
    package("keras_cv.src.models", os.path.join(root, "src", "models"))
    package("keras_cv.src.models.stable_diffusion", os.path.join(root, "src", "models", "stable_diffusion"))
    backend = types.ModuleType("keras_cv.src.backend")
    backend.keras, backend.ops, backend.random = keras, keras.ops, keras.random
    sys.modules["keras_cv.src.backend"] = backend
    api_export = types.ModuleType("keras_cv.src.api_export")
    api_export.keras_cv_export = lambda *a, **k: (lambda obj: obj)
    sys.modules["keras_cv.src.api_export"] = api_export
    src.backend = backend

    from keras_cv.src.models.stable_diffusion import stable_diffusion

    kcv.models = types.SimpleNamespace(
        StableDiffusion=stable_diffusion.StableDiffusion,
        StableDiffusionV2=stable_diffusion.StableDiffusionV2,
    )
    return True
