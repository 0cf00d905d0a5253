"""The Keras backend, imported quietly and once: every part of sdanim that needs Keras
(or KerasCV, which imports TensorFlow) gets it from `import_keras` / `import_keras_cv`.

TensorFlow writes start-up lines from C++ when it loads: cpu_feature_guard's
"This TensorFlow binary is optimized ..." (TensorFlow's own logging, hidden by
TF_CPP_MIN_LOG_LEVEL=2, set here unless the user chose a level) and, on CPUs where it
turns oneDNN on (x86 with AVX512_VNNI/AVX512_BF16/AMX, or TF_ENABLE_ONEDNN_OPTS=1),
"oneDNN custom operations are on ..." through Abseil's logging, preceded by "WARNING: All
log messages before absl::InitializeLog() is called are written to STDERR". Abseil
logs to stderr until a C++ program calls absl::InitializeLog(), which a Python process
cannot; no environment variable reaches it (tensorflow/tensorflow#100442). So the import
runs with file descriptor 2 pointed at a temporary file, and afterwards every line but
those start-up lines is written to the real stderr: nothing else is lost or reordered
within the import. A process that imported TensorFlow before sdanim keeps its lines.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import platform
import sys
import tempfile
import threading
from typing import Optional

from sdanim.config.errors import SdanimError

# Substrings of the lines TensorFlow (and XLA) write to stderr while loading on a CPU.
START_UP_LINES = (
    "All log messages before absl::InitializeLog()",
    "oneDNN custom operations are on",
    "cpu_feature_guard",
    "This TensorFlow binary is optimized",
    "To enable the following instructions",
    "rebuild TensorFlow with the appropriate compiler flags",
    "Unable to register cuDNN factory",
    "Unable to register cuFFT factory",
    "Unable to register cuBLAS factory",
    "computation placer already registered",
    "Could not find cuda drivers",
    "TF-TRT Warning",
)

# tensorflow-metal's plugin is built against one TensorFlow release and fails to load
# ("Symbol not found" in libmetal_plugin.dylib) under newer ones (tensorflow/tensorflow
# #81987, #84167). The `metal` extra in pyproject.toml pins the pair below.
METAL_PAIR = "'tensorflow>=2.18,<2.19' 'tensorflow-metal==1.2.0'"

_LOCK = threading.Lock()


def quiet_tensorflow_env(env: Optional[dict] = None) -> dict:
    """Sets TF_CPP_MIN_LOG_LEVEL=2 in `env` (default: this process's environment) unless
    the user chose a level. Returns the mapping (for a child process's environment)."""
    env = os.environ if env is None else env
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


@contextlib.contextmanager
def _start_up_lines_dropped():
    """Within the block, file descriptor 2 goes to a temporary file; afterwards its
    lines, less TensorFlow's start-up lines, go to the real stderr."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real descriptor 2 (an embedding host)
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", errors="replace")
            kept = [line for line in text.splitlines(keepends=True) if not any(s in line for s in START_UP_LINES)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def metal_plugin_error(error: BaseException) -> Optional[SdanimError]:
    """The one-line error for a tensorflow-metal plugin that failed to load, or None
    when `error` is something else."""
    text = str(error)
    if "metal_plugin" not in text and "tensorflow-plugins" not in text:
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return SdanimError(
        "TensorFlow could not load the tensorflow-metal plugin (built for another TensorFlow "
        f"release); install the pair sdanim supports: pip install {METAL_PAIR} "
        f"(or pip uninstall tensorflow-metal to run on the CPU). Received: {first[:300]}"
    )


def quiet_import(name: str):
    """Imports module `name` with TensorFlow's start-up lines dropped (see the module
    docstring); a tensorflow-metal plugin that does not load becomes one line naming the fix."""
    module = sys.modules.get(name)
    if module is not None:
        return module
    quiet_tensorflow_env()
    with _LOCK:
        try:
            with _start_up_lines_dropped():
                return importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - re-raised unless it is the plugin
            friendly = metal_plugin_error(error)
            if friendly is None:
                raise
            raise friendly from None


def keras_home() -> str:
    """Keras's own folder (KERAS_HOME, default ~/.keras): its config file and download cache."""
    return os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")


def default_backend(system: str, machine: str, env: dict, keras_home: str, has_torch: bool) -> Optional[str]:
    """The Keras backend sdanim picks where the user picked none: "torch" on an Apple-silicon
    Mac with torch installed (Keras's torch backend runs on the GPU through MPS, the
    maintained path; tensorflow-metal is frozen, jax-metal broken), else None (Keras's own
    default, TensorFlow). A backend is chosen by KERAS_BACKEND, or by a "backend" other than
    "tensorflow" in `keras_home`/keras.json: Keras writes that file with "tensorflow" by
    itself on its first import, so "tensorflow" there says nothing (KERAS_BACKEND=tensorflow
    keeps TensorFlow on a Mac)."""
    if env.get("KERAS_BACKEND") or system != "Darwin" or machine != "arm64" or not has_torch:
        return None
    if _config_backend(keras_home) not in (None, "tensorflow"):
        return None
    return "torch"


def _config_backend(keras_home: str) -> Optional[str]:
    """The backend named in Keras's config file, or None."""
    try:
        with open(os.path.join(keras_home, "keras.json")) as f:
            backend = json.load(f).get("backend")
    except (OSError, ValueError, AttributeError):
        return None  # no config (or not one Keras reads either)
    return backend if isinstance(backend, str) and backend else None


def import_keras():
    """Keras (and so its backend), imported quietly once. On an Apple-silicon Mac with
    torch installed and no backend chosen, the backend is torch (`default_backend`): set in
    KERAS_BACKEND before Keras is imported, where the user's own process would read it."""
    if "keras" not in sys.modules:
        backend = default_backend(platform.system(), platform.machine(), dict(os.environ), keras_home(),
                                  importlib.util.find_spec("torch") is not None)
        if backend is not None:
            os.environ["KERAS_BACKEND"] = backend
            global _BACKEND_CHOICE
            _BACKEND_CHOICE = "sdanim's default on an Apple-silicon Mac with torch"
    return quiet_import("keras")


# Why Keras runs the backend it does, where sdanim chose it (`import_keras`).
_BACKEND_CHOICE: Optional[str] = None


def backend_choice() -> str:
    """How the Keras backend was chosen, in words (sdanim's Mac default, KERAS_BACKEND,
    keras.json, or Keras's own default)."""
    if _BACKEND_CHOICE is not None:
        return _BACKEND_CHOICE
    if os.environ.get("KERAS_BACKEND"):
        return "KERAS_BACKEND"
    home = keras_home()
    if _config_backend(home) is not None:
        return f"{os.path.join(home, 'keras.json')} (Keras writes it on first use)"
    return "Keras's default"


def import_keras_cv():
    """KerasCV, which imports TensorFlow whatever the Keras backend, imported quietly once."""
    import_keras()
    return quiet_import("keras_cv")


def import_keras_hub():
    """KerasHub (Stable Diffusion 3 and 3.5), imported quietly once; one line naming the
    extra that installs it when it is missing."""
    import_keras()
    if importlib.util.find_spec("keras_hub") is None:
        raise SdanimError("Stable Diffusion 3 models need KerasHub: pip install 'sdanim[sd3]' (keras-hub>=0.32). "
                          "Received: keras_hub=None")
    return quiet_import("keras_hub")


def import_tensorflow():
    """TensorFlow, imported quietly once."""
    return quiet_import("tensorflow")


def keras_ops():
    """`keras.ops`, after a quiet import of Keras."""
    return import_keras().ops
