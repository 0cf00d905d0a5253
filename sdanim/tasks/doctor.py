"""`python -m sdanim doctor` / `sdanim.doctor()`: what sdanim finds on this machine -- Python,
the Keras backend and how it was chosen, the device, what precision "auto" resolves to
and why, oneDNN, the weights cache (each pinned file there checked against its hash) --
a measured speed (seconds per guided UNet step with random weights), and where a faster
choice exists, a hint."""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import os
import platform
import sys
import time
from typing import Optional

import numpy as np

from sdanim.config.errors import check
from sdanim.config.settings import RenderSettings
from sdanim.core.runtime import backend_choice, import_keras, import_tensorflow
from sdanim.model import device as dev
from sdanim.model import esrgan, rife, taesd
from sdanim.model.loading import load_model
from sdanim.model.registry import PART_ORDER, WEIGHT_FILES, PinnedFileError, keras_cache_dir, keras_cv_file
from sdanim.render.sampling import Renderer

# CPU features that decide sdanim's CPU arithmetic (docs/benchmarks.md).
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "fma")


@dataclasses.dataclass
class DoctorReport:
    """What `doctor` found.

    fields: {name: value} in the order printed.
    cache: {file name: "verified", "absent" or why it cannot be used}.
    seconds_per_step: float or None. A guided UNet step (batch 1: two UNet rows) at
        `size` px with random weights; None where not measured.
    size: int. The image size the speed was measured at.
    hints: list of str. Faster choices on this machine.
    """

    fields: dict
    cache: dict
    seconds_per_step: Optional[float]
    size: int
    hints: list

    def __str__(self) -> str:
        width = max(len(k) for k in self.fields)
        lines = [f"{k.ljust(width)}  {v}" for k, v in self.fields.items()]
        lines.append(f"{'weights cache'.ljust(width)}  {keras_cache_dir()}")
        lines += [f"{''.ljust(width)}    {name}: {state}" for name, state in self.cache.items()]
        if self.seconds_per_step is not None:
            lines.append(f"{'speed'.ljust(width)}  {self.seconds_per_step:.3f} s per guided UNet step at "
                         f"{self.size}x{self.size} (random weights)")
        lines += [f"hint: {h}" for h in self.hints]
        return "\n".join(lines)


def _version(package: str) -> str:
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return "not installed"


def _first_version(*packages: str) -> str:
    """The version of the first of `packages` installed (TensorFlow ships under several names)."""
    for package in packages:
        version = _version(package)
        if version != "not installed":
            return f"{package} {version}"
    return f"{packages[0]} not installed"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_features() -> list:
    try:
        with open("/proc/cpuinfo") as f:
            flags = dev.cpu_flags(f.read())
    except OSError:
        return []
    return [name for name in CPU_FEATURES if name in flags]


def _accelerator(backend: str, device: str) -> str:
    """The device in words: the GPU's name where the backend says it."""
    if device == "cuda":
        try:
            if backend == "torch":
                import torch

                return f"CUDA GPU: {torch.cuda.get_device_name(0)}"
            if backend == "jax":
                import jax

                return f"CUDA GPU: {jax.devices()[0].device_kind}"
            tf = import_tensorflow()
            gpu = tf.config.list_physical_devices("GPU")[0]
            return f"CUDA GPU: {tf.config.experimental.get_device_details(gpu).get('device_name', gpu.name)}"
        except Exception:  # noqa: BLE001 - the name is a nicety
            return "CUDA GPU"
    if device == "metal":
        return "Apple GPU (MPS)" if backend == "torch" else "Apple GPU (tensorflow-metal)"
    if backend == "jax":
        import jax

        if jax.default_backend() == "tpu":
            return f"TPU: {jax.devices()[0].device_kind} x{len(jax.devices())}"
    return f"CPU: {_cpu_name()}, {os.cpu_count()} cores, features {' '.join(_cpu_features()) or 'none of ' + '/'.join(CPU_FEATURES)}"


def _precision_why(device: str, backend: str, precision: str) -> str:
    if device == "cuda":
        return "a CUDA GPU: mixed float16 with XLA"
    if device == "cpu" and precision == "mixed_bfloat16":
        return "a CPU with bfloat16 in hardware under TensorFlow: mixed bfloat16 (1.97x float32, measured)"
    if device == "cpu":
        why = "bfloat16 measured only under TensorFlow" if backend != "tensorflow" else "no bfloat16 in hardware"
        if dev.BF16_OVERRIDE in os.environ:
            why = f"{dev.BF16_OVERRIDE}={os.environ[dev.BF16_OVERRIDE]}"
        return f"a CPU ({why}): float32 without XLA"
    return "Apple GPU: float32, no compilation (float16 and XLA are unreliable there)"


def pinned_files() -> list:
    """Every weights file sdanim downloads (pinned URL and hash), de-duplicated by name."""
    files = [keras_cv_file(version, part) for version in WEIGHT_FILES for part in PART_ORDER
             if part in WEIGHT_FILES[version]]
    files += [rife.PINNED, *taesd.PINNED.values(), *esrgan.PINNED.values()]
    unique = {}
    for pinned in files:
        unique.setdefault(pinned.name, pinned)
    return list(unique.values())


def cache_state(verify: bool = True) -> dict:
    """{file name: "verified" / "present (not checked)" / "absent" / why it is refused}."""
    state = {}
    for pinned in pinned_files():
        if not os.path.isfile(pinned.path):
            state[pinned.name] = "absent"
        elif not verify:
            state[pinned.name] = "present (not checked)"
        else:
            try:
                pinned.cached()
                state[pinned.name] = "verified"
            except PinnedFileError as error:
                state[pinned.name] = f"not usable: {error.reason}"
    return state


def measure_step(model, repeat: int = 3) -> float:
    """Seconds per guided UNet step (one image: the unconditional and conditional rows), the
    best of `repeat` 2-step samplings after one that traces."""
    dim = int(model.diffusion_model.inputs[2].shape[-1])  # (latent, t_emb, context)
    rng = np.random.default_rng(0)
    context = rng.standard_normal((1, 77, dim), dtype=np.float32)
    latent = rng.standard_normal((1, model.height // 8, model.width // 8, 4), dtype=np.float32)
    settings = RenderSettings(height=model.height, width=model.width, num_steps=2, guidance_scale=7.5,
                              scheduler="ddim")
    renderer = Renderer(model.diffusion_model, model.decoder, settings, np.zeros((77, dim), np.float32))
    renderer.sample_latents(context, latent, [0])  # traces
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        renderer.sample_latents(context, latent, [0])
        best = min(best, (time.perf_counter() - start) / settings.num_steps)
    return best


def _hints(system: str, machine: str, backend: str, device: str, precision: str) -> list:
    hints = []
    apple = system == "Darwin" and machine == "arm64"
    if apple and backend == "tensorflow":
        hints.append("on Apple silicon the torch backend runs on the GPU (MPS): pip install \"sdanim[apple]\" and "
                     "unset KERAS_BACKEND (or set it to torch)")
    if apple and backend == "torch" and device == "cpu":
        hints.append("torch does not see the Apple GPU (MPS): update macOS (12.3+) and torch")
    if device == "cpu" and backend != "tensorflow" and not apple:
        hints.append("on a CPU the TensorFlow backend is sdanim's fastest (docs/benchmarks.md): KERAS_BACKEND=tensorflow")
    if device == "cpu" and precision == "float32" and dev.cpu_has_native_bfloat16() and backend == "tensorflow":
        hints.append(f"this CPU has bfloat16 in hardware: unset {dev.BF16_OVERRIDE} (precision auto: mixed bfloat16, "
                     "about 2x)")
    if device in ("cpu", "metal"):
        hints.append("for previews: the tiny decoder (--decoder tiny) and a few-step sampler (an LCM LoRA with "
                     "--scheduler lcm --steps 4) cut a frame's time several-fold")
    return hints


def doctor(speed: bool = True, quick: bool = False, model=None, verify: bool = True,
           print_report: bool = True) -> DoctorReport:
    """What sdanim finds on this machine, and how fast it renders here.

    Args:
        speed: bool. Measure seconds per guided UNet step with random weights (builds the
            real architecture unless `model` is given: 30-90 s on a CPU). Defaults to True.
        quick: bool. Measure at 128x128 instead of 512x512. Defaults to False.
        model: a loaded model to measure instead of building one (its own size).
        verify: bool. Check every weights file in the cache against its pinned hash
            (reads each file). Defaults to True.
        print_report: bool. Print the report. Defaults to True.

    Returns:
        `DoctorReport`.
    """
    check(isinstance(speed, bool), f"speed must be True or False. Received: speed={speed!r}")
    check(isinstance(quick, bool), f"quick must be True or False. Received: quick={quick!r}")
    keras = import_keras()
    backend = keras.backend.backend()
    device = dev.detect_device()
    report = dev.hardware_report()
    precision, jit = dev.device_defaults(device, backend=backend)
    system, machine = platform.system(), platform.machine()
    tensorflow = _first_version("tensorflow", "tensorflow-cpu", "tensorflow-macos", "tf-nightly")
    frameworks = [tensorflow] + [f"{name} {_version(name)}" for name in ("torch", "jax") if name == backend]
    fields = {
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "versions": f"sdanim {_version('sdanim')}, keras {_version('keras')}, {', '.join(frameworks)}, "
                    f"keras-cv {_version('keras-cv')}, numpy {np.__version__}",
        "backend": f"{backend} ({backend_choice()})",
        "device": _accelerator(backend, device),
        "precision auto": f"{precision}, jit_compile={jit}: {_precision_why(device, backend, precision)}",
    }
    if backend == "tensorflow" and device == "cpu":
        why = report.get("onednn_choice") or ("TF_ENABLE_ONEDNN_OPTS=" + report["overrides"]["TF_ENABLE_ONEDNN_OPTS"]
                                              if "TF_ENABLE_ONEDNN_OPTS" in report["overrides"] else "TensorFlow's default")
        fields["oneDNN"] = (f"{'on' if report['onednn'] else 'off'} ({why}); weights kept in its kernels: "
                            f"{'yes' if report['weights_kept'] else 'no'}")
    cache = cache_state(verify)
    seconds, size = None, (128 if quick else 512)
    if speed:
        if model is None:
            model = load_model(weights="random", height=size, width=size)
        size = int(model.height)
        seconds = measure_step(model)
    result = DoctorReport(fields, cache, seconds, size, _hints(system, machine, backend, device, precision))
    if print_report:
        print(result)
    return result


__all__ = ["DoctorReport", "cache_state", "doctor", "measure_step", "pinned_files"]
