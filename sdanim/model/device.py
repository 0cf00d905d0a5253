"""Where the models run and what is fastest there: the device, the CPU's features, and
the defaults (precision, XLA) that follow from them.

Read from the machine, never guessed; one environment variable overrides the CPU's
bfloat16 detection, so that either code path can be exercised on any machine:

    SDANIM_CPU_BF16=1   treat the CPU as having bfloat16 in hardware (AVX512_BF16/AMX):
                        precision "auto" picks mixed_bfloat16 under TensorFlow
    SDANIM_CPU_BF16=0   treat it as not having it: "auto" picks float32

TensorFlow's own switch for its oneDNN kernels is TF_ENABLE_ONEDNN_OPTS (1 or 0); when
it is unset, TensorFlow turns them on for x86 CPUs with AVX512_VNNI, AVX512_BF16,
AVX_VNNI or AMX (tensorflow/core/util/port.cc), which `onednn_enabled` mirrors. Where
the user leaves it unset, sdanim turns them off for a float32 process before TensorFlow's
import (`choose_onednn`): measured faster there, and slower for bfloat16. The command
line and its Ray workers also let oneDNN keep the weights it converted
(`keep_weights_in_kernels`): bfloat16 frames 1.3x faster.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from typing import Optional

from sdanim.config.errors import check
from sdanim.core.runtime import import_keras, import_tensorflow

BF16_OVERRIDE = "SDANIM_CPU_BF16"
# TensorFlow's switch (tensorflow/core/util/onednn_env_vars.cc) for oneDNN kernels that
# convert each weight to their layout once instead of at every call (`keep_weights_in_kernels`).
KEEP_WEIGHTS = "TF_ONEDNN_ASSUME_FROZEN_WEIGHTS"
# What TensorFlow checks (port.cc DefaultOneDnnPolicy), as /proc/cpuinfo spells them.
_ONEDNN_DEFAULT_FLAGS = {"avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"}
_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def detect_device() -> str:
    """Returns "cuda", "metal" or "cpu": where the Keras backend will run the models."""
    keras = import_keras()

    backend = keras.backend.backend()
    if backend == "tensorflow":
        tf = import_tensorflow()
        if not tf.config.list_physical_devices("GPU"):
            return "cpu"
        # tensorflow-metal registers the Apple GPU as a plain "GPU" device.
        is_apple = platform.system() == "Darwin" and platform.machine() == "arm64"
        return "metal" if is_apple else "cuda"
    if backend == "jax":
        import jax

        return "cuda" if jax.default_backend() == "gpu" else "cpu"
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "metal" if mps is not None and mps.is_available() else "cpu"
    return "cpu"


def cpu_flags(cpuinfo: str) -> set:
    """The feature flags in a Linux /proc/cpuinfo text (x86 "flags", Arm "Features")."""
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def _linux_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return cpu_flags(f.read())
    except OSError:
        return set()


def _override(name: str) -> Optional[bool]:
    """An environment switch: "1"/"true" -> True, "0"/"false" -> False, unset -> None."""
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    value = value.strip().lower()
    check(value in ("1", "0", "true", "false"),
          f"{name} must be 1 or 0 (true or false). Received: {name}={os.environ.get(name)!r}")
    return value in ("1", "true")


def cpu_has_native_bfloat16() -> bool:
    """True when the CPU does bfloat16 arithmetic in hardware: x86 AVX512_BF16 or
    AMX-BF16, Arm BF16 (Linux: /proc/cpuinfo; macOS: sysctl FEAT_BF16). Read from
    the OS, never guessed; False where it cannot be read. SDANIM_CPU_BF16=1/0 overrides."""
    forced = _override(BF16_OVERRIDE)
    if forced is not None:
        return forced
    system = platform.system()
    if system == "Linux":
        return bool(_linux_flags() & _BF16_FLAGS)
    if system == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return False
        return out.stdout.strip() == "1"
    return False


def onednn_enabled() -> bool:
    """Whether TensorFlow runs its oneDNN kernels in this process: what TensorFlow says
    once it is imported, else what it will decide (TF_ENABLE_ONEDNN_OPTS, or by default
    the CPU's features on Linux x86, as tensorflow/core/util/port.cc does)."""
    if "tensorflow" in sys.modules:
        try:
            from tensorflow.python.util import _pywrap_util_port

            return bool(_pywrap_util_port.IsMklEnabled())
        except (ImportError, AttributeError):
            pass
    forced = _override("TF_ENABLE_ONEDNN_OPTS")
    if forced is not None:
        return forced
    return platform.system() == "Linux" and bool(_linux_flags() & _ONEDNN_DEFAULT_FLAGS)


def device_defaults(device: str, native_bfloat16: Optional[bool] = None, backend: str = "tensorflow") -> tuple[str, bool]:
    """(precision, jit_compile) that are fastest on `device`.

    CPU: float32 without XLA (on a 2-core CPU, 4x faster than KerasCV's
    jit_compile=True default and 2x faster than mixed_float16, shared/NOTES.md), except
    on CPUs with native bfloat16 under TensorFlow, where mixed_bfloat16 measured 1.97x
    faster than float32 (AVX512_BF16, 128x128, 6 steps, batch 4; frames a mean 1.7
    uint8 levels from float32). CUDA GPUs want mixed precision and XLA; Apple Metal
    wants float32 (float16 kernels and XLA are unreliable under tensorflow-metal).

    Args:
        device: "cpu", "cuda" or "metal".
        native_bfloat16: bool or None. Whether the CPU has bfloat16 in hardware;
            None reads it (`cpu_has_native_bfloat16`).
        backend: the Keras backend; only TensorFlow's bfloat16 speed was measured.
    """
    if device == "cuda":
        return "mixed_float16", True
    if device == "cpu" and backend == "tensorflow":
        if native_bfloat16 is None:
            native_bfloat16 = cpu_has_native_bfloat16()
        if native_bfloat16:
            return "mixed_bfloat16", False
    return "float32", False


# Why sdanim set TF_ENABLE_ONEDNN_OPTS in this process (`choose_onednn`), if it did.
_ONEDNN_CHOICE: Optional[str] = None


def choose_onednn(precision: str, family: str = "sd") -> Optional[bool]:
    """Before TensorFlow's first import, picks its oneDNN kernels for the precision and
    model family the process asks for: off for SD 1.x/2.x in float32 on a CPU where
    TensorFlow would turn them on; TensorFlow's choice for SD3 (`family="sd3"`), whose
    transformer is matrix products, faster on oneDNN's (sd3-medium at 512 px, float32, a
    2-core Zen 4: one MMDiT call 28 s with oneDNN off, 19 s on; the VAE decode 17.5 s
    off, 12.5 s on; docs/benchmarks.md). The first call before the import decides for
    the process: an SD3 model loaded after an SD 1.x float32 one computes without oneDNN.

    TensorFlow decides at its import, for the whole process. On an AVX512_BF16 CPU with
    oneDNN on by default (docs/benchmarks.md, "oneDNN picked per precision"), the SD 1.4 UNet in float32
    ran 1.4x faster with oneDNN off (frames 1.19x), and mixed_bfloat16 1.8x slower: so
    float32 ("auto" on a CPU without bfloat16 in hardware) gets TensorFlow's own kernels,
    and bfloat16 keeps oneDNN. (Where oneDNN keeps its converted weights,
    `keep_weights_in_kernels`, float32 frames came as fast with oneDNN as without it, for
    another copy of the weights: off still.) Nothing changes when TensorFlow is already
    imported or the user set TF_ENABLE_ONEDNN_OPTS. Returns False when it turned oneDNN
    off, else None.
    """
    global _ONEDNN_CHOICE
    if "tensorflow" in sys.modules or _override("TF_ENABLE_ONEDNN_OPTS") is not None or family == "sd3":
        return None
    if precision == "auto":
        precision = device_defaults("cpu")[0]  # what "auto" computes in on this CPU under TensorFlow
    if precision != "float32" or not onednn_enabled():
        return None
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"  # also what Ray workers and children inherit
    _ONEDNN_CHOICE = "off for float32 (sdanim)"
    return False


def keep_weights_in_kernels() -> None:
    """For a process that runs sdanim's jobs and nothing else (a command-line run, its
    Ray workers, a benchmark), before TensorFlow's import: TensorFlow's oneDNN kernels
    convert each weight to their own memory layout once, at a compiled function's first
    call, and keep it, instead of converting every weight at every call
    (TF_ONEDNN_ASSUME_FROZEN_WEIGHTS=1).

    Measured (docs/benchmarks.md, "Weights kept in oneDNN's kernels"): mixed_bfloat16
    frames 1.3x faster (the CPU default where it has bfloat16 in hardware), the same
    images. The cost: each compiled function that calls a model holds its own converted
    copy of the weights (about 1.4 GB more for the bfloat16 UNet), for as long as the
    function lives. (A float32 run gets TensorFlow's own kernels, `choose_onednn`: nothing
    is kept there unless the user turned oneDNN on.)

    Not for SD3 (the command line leaves it unset there): with oneDNN on, sd3-medium in
    float32 at 512 px went from 14.5 GiB peak RSS to over 22 GiB before its first image
    (a 24 GB machine), each compiled function holding its own copy of the MMDiT's weights.

    TensorFlow applies it to the whole process and assumes that *no* weight ever changes:
    a model trained in the same process, or a convolution run outside a compiled function
    (eagerly), would silently compute with the first weights its kernel saw. So it is
    never set in a notebook, the browser app or a caller's own process; sdanim calls its
    models inside compiled functions only and drops them whenever weights change
    (`ModelState.invalidate`). Nothing changes when TensorFlow is already imported or the
    user set the variable; it matters only where oneDNN is on (`weights_kept`).
    """
    if "tensorflow" not in sys.modules and _override(KEEP_WEIGHTS) is None:
        os.environ[KEEP_WEIGHTS] = "1"  # also what its Ray workers are told (`sdanim.render.ray`)


def weights_kept() -> bool:
    """Whether TensorFlow's oneDNN kernels keep their converted weights in this process
    (`keep_weights_in_kernels`, or the user's TF_ONEDNN_ASSUME_FROZEN_WEIGHTS), so that a
    compiled function must not outlive a change of the weights it computes with."""
    return bool(_override(KEEP_WEIGHTS)) and onednn_enabled()


def limit_threads(threads: int) -> None:
    """Computes with `threads` threads (before the framework starts its pools)."""
    keras = import_keras()

    backend = keras.backend.backend()
    if backend == "tensorflow":
        tf = import_tensorflow()
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
        except RuntimeError:  # already initialised: keep its pools
            pass
    elif backend == "torch":
        import torch

        torch.set_num_threads(threads)


def hardware_report() -> dict:
    """What decides the defaults and the arithmetic on this machine (for manifests and
    benchmark headers): device, backend, bfloat16 in hardware, oneDNN (and sdanim's
    choice of it, made for precision "auto" if TensorFlow is not imported yet), overrides."""
    choose_onednn("auto")
    backend = import_keras().backend.backend()
    device = detect_device()
    report = {
        "device": device,
        "backend": backend,
        "cpu_bf16": cpu_has_native_bfloat16(),
        "onednn": onednn_enabled() if backend == "tensorflow" and device == "cpu" else False,
        "weights_kept": weights_kept() if backend == "tensorflow" and device == "cpu" else False,
        "overrides": {k: os.environ[k] for k in (BF16_OVERRIDE, "TF_ENABLE_ONEDNN_OPTS") if k in os.environ},
    }
    if _ONEDNN_CHOICE is not None:
        report["onednn_choice"] = _ONEDNN_CHOICE
        report["overrides"].pop("TF_ENABLE_ONEDNN_OPTS", None)
    return report
