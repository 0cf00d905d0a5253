"""Shared fixtures, and the order and memory plan of the heavy tests.

Real architectures (random weights) are the expensive part of the suite: building the
SD 1.4 UNet takes 30-90 s and ~5.5 GB. Each is built once per run and dropped after the
last test that needs it. TensorFlow keeps the weights its traced functions captured
(about 3.5 GB of the SD 1.4 UNet) after the model is dropped, so the heavy tests run
in an order that keeps the suite's process tree at about 13 GiB (a 16 GB laptop):

    1. tests that start a process of their own that builds a model (the real CLI, the
       notebooks' kernel, the SD 2.1 tests in a child pytest), while this process
       holds nothing big;
    2. tests on the shared SD 1.4 model (`sd_model`): first the checkpoint test, which
       builds its torch reference before the model exists and gives the model its own
       weights back afterwards; then the rest.

(`sd21_model` is the same arrangement inside the SD 2.1 child, tests/heavy_sd21.py.)

With pytest-xdist's `-n 2` (the README's command and its quick tier) the tests run in two workers a
module at a time; all the heavy tests (they live in tests/test_heavy*.py) are one unit
that one worker runs in that order (`pytest_xdist_make_scheduler`).

Reference libraries (torch, diffusers, transformers, JAX, nbclient) are test
dependencies: with CI=true or SDANIM_STRICT=1 a missing one fails the run instead of
skipping its tests (see `require`).
"""

import contextlib
import gc
import importlib
import json
import os
import socket
import sys
import warnings
import weakref

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The tests' local Ray instances stay on the loopback interface (Ray rewrites 127.0.0.1 to
# the machine's network address unless it runs single-node; read when Ray is imported).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# torch's CUDA wheels (what `pip install torch` picks on Linux) bring triton, whose
# native library segfaults when it loads after TensorFlow's (`import keras; import
# triton` crashes; the other order works). diffusers loads it through torch._dynamo, so
# the reference tests would crash the run depending on which test imported first.
try:
    import triton  # noqa: F401
except ImportError:
    pass

# pytest-xdist's workers (-n N) share the machine's cores: each computes with its share
# (TensorFlow's and torch's thread pools, and every process a test starts, inherit it),
# instead of every process running a pool as wide as the machine. Oversubscribed pools
# made the two-worker suite's tests 2-3x slower than alone (the ControlNet pipeline
# test: 137 s beside the heavy tests, 41 s alone, on 2 cores).
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:
    _SHARE = str(max(1, (os.cpu_count() or 1) // _XDIST_WORKERS))
    for _name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, _SHARE)

# The CPU path this run computes on, made explicit before anything imports TensorFlow:
# TensorFlow's oneDNN kernels (TF_ENABLE_ONEDNN_OPTS) and bfloat16 for precision "auto"
# (SDANIM_CPU_BF16), each as the machine would have it unless the run sets it. Without
# this, a test that asks sdanim for float32 before TensorFlow's import would turn oneDNN
# off for the rest of the run (`choose_onednn`), and "as the machine is" would depend on
# which test ran first. Every child process the tests start inherits the choice. The
# three real paths -- oneDNN off + float32, oneDNN on + float32, oneDNN on + bfloat16 --
# are .ci/run's passes; `pytest_report_header` says which one this is.
from sdanim.model.device import BF16_OVERRIDE, cpu_has_native_bfloat16, onednn_enabled  # noqa: E402

BF16_GIVEN = os.environ.get(BF16_OVERRIDE)  # the run's own setting (None: the machine's, read by sdanim)
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1" if onednn_enabled() else "0")
os.environ.setdefault(BF16_OVERRIDE, "1" if cpu_has_native_bfloat16() else "0")


def pytest_report_header(config):
    onednn = os.environ["TF_ENABLE_ONEDNN_OPTS"] in ("1", "true")
    bf16 = os.environ[BF16_OVERRIDE] in ("1", "true")
    return (f"sdanim CPU path: oneDNN {'on' if onednn else 'off'} + precision auto = "
            f"{'mixed_bfloat16' if bf16 else 'float32'} (TF_ENABLE_ONEDNN_OPTS={os.environ['TF_ENABLE_ONEDNN_OPTS']}, "
            f"{BF16_OVERRIDE}={os.environ[BF16_OVERRIDE]})")


# The shared real-architecture models' image size: the smallest KerasCV's UNet takes (an
# 8x8 latent, 1x1 at its deepest level), every layer and code path of 512 px at a
# quarter of 128 px's convolution work.
HEAVY_SIZE = 64
HEAVY_LATENT = (HEAVY_SIZE // 8, HEAVY_SIZE // 8, 4)
STRICT = os.environ.get("CI", "").lower() in ("1", "true", "yes") or os.environ.get("SDANIM_STRICT") == "1"

# Built models, by fixture name; freed by `pytest_runtest_teardown` after their last user.
_MODELS: dict = {}


def require(name: str):
    """Imports a reference dependency: skips without it locally, fails in CI/strict runs."""
    if STRICT:
        return importlib.import_module(name)  # ImportError: the test (or module) fails
    return pytest.importorskip(name)


def missing(what: str, hint: str):
    """A test dependency that is not a Python package is missing (a browser): the one
    rule `require` follows, skip locally, fail in CI/strict runs."""
    if STRICT:
        pytest.fail(f"{what} is missing: {hint}")
    pytest.skip(f"no {what} ({hint})")


def read_manifest(path) -> dict:
    """A run's manifest.json: the file, or the one in a frames folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "manifest.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def level_gap(a, b) -> int:
    """The largest difference of two uint8 images, in levels."""
    import numpy as np

    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


def relative_gap(ours, theirs) -> float:
    """max |ours - theirs| / max |theirs|: parity with a reference, on its own scale."""
    import numpy as np

    return float(np.abs(np.asarray(ours) - np.asarray(theirs)).max() / np.abs(np.asarray(theirs)).max())


def gif_frames(path) -> list:
    """Every frame of a GIF as (H, W, 3) uint8, in order."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        frames = []
        for k in range(im.n_frames):
            im.seek(k)
            frames.append(np.asarray(im.convert("RGB")))
    return frames


def free_port() -> int:
    """A TCP port on the loopback interface nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def dtype_policy(name: str):
    """Within this block Keras builds layers under the dtype policy `name` (a global that
    load_model sets for the process); the previous policy is put back after."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


@contextlib.contextmanager
def keras_cv_layers(model):
    """Within this block the model runs KerasCV's own layers (load_model gives
    TensorFlow-on-CPU models faster GroupNormalization and padded-convolution forms,
    `sdanim.model.layers.use_fast_layers`): for reference runs of KerasCV's loop."""
    from sdanim.model.compiled import compiled_entries, restore_compiled
    from sdanim.model.layers import use_fast_layers

    parts = (model.diffusion_model, model.decoder)
    # Switching layers drops the parts' compiled sampling functions; switching back
    # restores exactly the layers they were traced with, so they are put back after
    # (every later test would otherwise trace the real UNet again).
    saved = {m: compiled_entries(m) for m in parts}
    counts = tuple(use_fast_layers(m, enabled=False) for m in parts)
    try:
        yield counts
    finally:
        for m, count in zip(parts, counts):
            if count:
                use_fast_layers(m)
        for m, entries in saved.items():
            restore_compiled(m, entries)


def pytest_configure(config):
    config.addinivalue_line("markers", "heavy: builds the real KerasCV architecture (random weights)")
    config.addinivalue_line("markers", "own_process: starts a process that builds a real model itself")


# A shared model's users: tests that take it (built before the test) or its `_later`
# getter (built when the test asks, e.g. after freeing a torch reference model).
_USERS = {name: (name, name + "_later") for name in ("sd_model", "sd21_model")}


def _uses(item, name: str) -> bool:
    return any(f in getattr(item, "fixturenames", ()) for f in _USERS[name])


def _phase(item) -> tuple:
    if item.get_closest_marker("heavy") is None:
        return (0, 0)
    names = getattr(item, "fixturenames", ())
    if item.get_closest_marker("own_process"):
        return (1, 0)
    for phase, name in ((2, "sd_model"), (3, "sd21_model")):
        if _uses(item, name):
            return (phase, 0 if name + "_later" in names else 1)  # lazy users first
    return (2, 0)


def _in_heavy_module(nodeid: str) -> bool:
    return os.path.basename(nodeid.split("::", 1)[0]).startswith(("test_heavy", "heavy_"))


def pytest_collection_modifyitems(session, config, items):
    misplaced = [i.nodeid for i in items if (i.get_closest_marker("heavy") is not None) != _in_heavy_module(i.nodeid)]
    if misplaced:  # pytest-xdist's units (pytest_xdist_make_scheduler) tell heavy tests by their file
        raise pytest.UsageError(
            f"heavy tests live in tests/test_heavy*.py (or heavy_*.py), quick ones elsewhere: {misplaced[:3]}")
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: the heavy unit is handed out first
        items.sort(key=lambda item: (item.get_closest_marker("heavy") is None, _phase(item)))
    else:
        items.sort(key=_phase)  # stable: file order within a phase


def pytest_xdist_make_scheduler(config, log):
    """Work for pytest-xdist's workers (-n N): each quick test module is one unit (its
    fixtures, like a Ray instance, made once), and all the heavy tests (tests/test_heavy*.py)
    are one unit that one worker runs first to last in the memory plan's order, while the
    other takes the quick modules (the README's command: about 18 min instead of 30 on 2
    slow cores; 14.1 GiB at the peak counting shared pages once, 19.7 GiB summing resident
    sets)."""
    if config.getoption("dist") not in ("load", "loadscope"):
        return None  # another --dist asked for by name
    from xdist.scheduler import LoadScopeScheduling

    class Lanes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "heavy" if _in_heavy_module(nodeid) else nodeid.split("::", 1)[0]

    return Lanes(config, log)


def _free(name: str) -> None:
    model = _MODELS.pop(name, None)
    if model is None:
        return
    alive = weakref.ref(model)
    del model
    # A failed test's traceback (kept by pytest for post-mortem debugging) holds its
    # frames, and so the model: let it go.
    for attr in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, attr):
            setattr(sys, attr, None)
    import keras

    keras.backend.clear_session()
    gc.collect()
    if alive() is not None:
        warnings.warn(f"{name} is still referenced after its last test: its memory stays in use")
    try:  # hand freed heap pages back to the OS, so the next phase starts low
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    yield  # the test is done: setup, call, teardown, and pytest has dropped its fixture values
    if not _MODELS:
        return
    items = item.session.items
    rest = items[items.index(item) + 1:] if nextitem is not None else []
    for name in list(_MODELS):
        if not any(_uses(later, name) for later in rest):
            _free(name)


def _shared(name: str, version: str):
    if name not in _MODELS:
        from sdanim.model.loading import load_model

        _MODELS[name] = load_model(version=version, weights="random", height=HEAVY_SIZE, width=HEAVY_SIZE,
                                   precision="float32", jit_compile=False, attention="keras-cv")
    return _MODELS[name]


@pytest.fixture
def sd_model():
    """The real SD 1.4 architecture with seeded random weights at HEAVY_SIZE, built once
    per run and freed after the last test that asks for it."""
    return _shared("sd_model", "1.4")


@pytest.fixture
def sd21_model():
    """The real SD 2.1 architecture (OpenCLIP text encoder, 1024-wide context), HEAVY_SIZE,
    built once per run and freed after the last test that asks for it."""
    return _shared("sd21_model", "2.1")


@pytest.fixture
def sd_model_later():
    """A getter of the shared SD 1.4 model, for a test that must free memory first."""
    return lambda: _shared("sd_model", "1.4")


@pytest.fixture
def sd21_model_later():
    """A getter of the shared SD 2.1 model, for a test that must free memory first."""
    return lambda: _shared("sd21_model", "2.1")


@pytest.fixture
def tiny():
    from tiny import make_tiny_model

    return make_tiny_model()
