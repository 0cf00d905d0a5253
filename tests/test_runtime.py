"""What a user's machine decides: TensorFlow's start-up lines silenced on every CPU (its
oneDNN kernels forced on here, as x86 CPUs with AVX512_VNNI/BF16/AMX get by default),
the bfloat16 override, and what precision "auto" picks on the machine the test runs on."""

import os
import subprocess
import sys

import pytest

from sdanim.config.errors import SdanimError
from sdanim.core.runtime import START_UP_LINES, quiet_import

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_start_up_lines_are_dropped_and_everything_else_kept(tmp_path, monkeypatch, capfd):
    """A module that writes Abseil's pre-init lines and its own to file descriptor 2 while
    it is imported: only its own line reaches stderr."""
    (tmp_path / "noisy_module.py").write_text(
        "import os\n"
        "os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n')\n"
        "os.write(2, b'I0000 00:00:1.0  42 port.cc:153] oneDNN custom operations are on. You may see ...\\n')\n"
        "os.write(2, b'a line of its own\\n')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    quiet_import("noisy_module")
    err = capfd.readouterr().err
    assert err == "a line of its own\n"


@pytest.mark.slow
def test_keras_import_is_quiet_with_onednn_forced_on():
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(TF_ENABLE_ONEDNN_OPTS="1", PYTHONPATH=ROOT)
    code = ("from sdanim.core.runtime import import_keras_cv; import_keras_cv()\n"
            "from sdanim.model.device import onednn_enabled; print('onednn', onednn_enabled())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "onednn True"  # TensorFlow's own answer once it is imported
    assert not [line for line in proc.stderr.splitlines() if any(s in line for s in START_UP_LINES)], proc.stderr


def test_bfloat16_override_decides_auto(monkeypatch):
    from sdanim.model.device import cpu_has_native_bfloat16, device_defaults

    monkeypatch.setenv("SDANIM_CPU_BF16", "1")
    assert cpu_has_native_bfloat16() and device_defaults("cpu") == ("mixed_bfloat16", False)
    monkeypatch.setenv("SDANIM_CPU_BF16", "0")
    assert not cpu_has_native_bfloat16() and device_defaults("cpu") == ("float32", False)
    monkeypatch.setenv("SDANIM_CPU_BF16", "maybe")
    with pytest.raises(SdanimError, match=r"SDANIM_CPU_BF16 must be 1 or 0 \(true or false\)\. Received: SDANIM_CPU_BF16='maybe'"):
        cpu_has_native_bfloat16()


def test_auto_precision_is_what_this_machine_has():
    """What load_model's "auto" computes in here (`loading._device_choices`, the choice a
    model is built with), against the machine read independently: /proc/cpuinfo's
    bfloat16 flags, or the run's SDANIM_CPU_BF16."""
    import keras

    from sdanim.model.device import detect_device
    from sdanim.model.loading import _device_choices

    if detect_device() != "cpu":
        pytest.skip("the CPU path")
    from conftest import BF16_GIVEN

    forced = BF16_GIVEN  # what the run set, else the machine read here (not through sdanim)
    if forced is not None:
        native = forced.strip().lower() in ("1", "true")
    else:
        with open("/proc/cpuinfo") as f:
            flags = {w for line in f if line.startswith(("flags", "Features")) for w in line.split(":", 1)[1].split()}
        native = bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    expected = "mixed_bfloat16" if native and keras.backend.backend() == "tensorflow" else "float32"
    assert _device_choices("auto", None, "auto").precision == expected
    assert _device_choices("float32", None, "auto").precision == "float32"


def test_onednn_default_follows_tensorflows_policy(monkeypatch):
    """Before TensorFlow is imported, sdanim predicts its decision: the switch when set,
    else the CPU's features (TensorFlow's DefaultOneDnnPolicy on Linux)."""
    code = "from sdanim.model.device import onednn_enabled; print(onednn_enabled())"
    for value, expected in (("1", "True"), ("0", "False")):
        env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=value, PYTHONPATH=ROOT)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout.strip()
        assert out == expected


def test_float32_process_gets_tensorflows_own_kernels():
    """Where TensorFlow would turn oneDNN on by default (here: a CPU said to have
    AVX512_VNNI), a process resolving float32 before TensorFlow's import runs without
    oneDNN (TensorFlow's own answer afterwards) and says so in its hardware report;
    "auto" without bfloat16 in hardware is float32; bfloat16, or the user's
    TF_ENABLE_ONEDNN_OPTS, keeps TensorFlow's choice."""
    fake_cpu = "import os, sys; from sdanim.model import device; device._linux_flags = lambda: {'avx512_vnni'}\n"
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    env.update(PYTHONPATH=ROOT, SDANIM_CPU_BF16="0")

    def run(code, **extra):
        proc = subprocess.run([sys.executable, "-c", fake_cpu + code], capture_output=True, text=True, env={**env, **extra})
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.split()

    imported = ("device.choose_onednn('float32'); import keras\n"
                "r = device.hardware_report(); print(r['onednn'], r['onednn_choice'], os.environ['TF_ENABLE_ONEDNN_OPTS'])")
    assert run(imported) == ["False", "off", "for", "float32", "(sdanim)", "0"]
    # TensorFlow not imported: each call reads the environment as it is then.
    choices = ("print(device.choose_onednn('mixed_bfloat16'), device.choose_onednn('mixed_float16'))\n"
               "os.environ['SDANIM_CPU_BF16'] = '1'; print(device.choose_onednn('auto'))  # auto is bfloat16\n"
               "os.environ['SDANIM_CPU_BF16'] = '0'; print(device.choose_onednn('auto'))  # auto is float32\n"
               "os.environ['TF_ENABLE_ONEDNN_OPTS'] = '1'; print(device.choose_onednn('float32'))  # the user's word")
    assert run(choices) == ["None", "None", "None", "False", "None"]


def test_keeping_weights_is_asked_for_before_tensorflow_and_the_users_word_stands():
    """A command-line process asks TensorFlow's oneDNN kernels to keep the weights they
    convert (where oneDNN is on); the user's TF_ONEDNN_ASSUME_FROZEN_WEIGHTS=0 stands;
    float32 still gets TensorFlow's own kernels, so nothing is kept there. (TensorFlow's
    own reading of the switch: `test_weights_kept_in_kernels_follow_weight_changes`.)"""
    code = ("import os; from sdanim.model import device; device._linux_flags = lambda: {'avx512_vnni'}\n"
            "device.keep_weights_in_kernels()\n"
            "print(device.choose_onednn('float32'), os.environ['TF_ENABLE_ONEDNN_OPTS'], "
            "os.environ['TF_ONEDNN_ASSUME_FROZEN_WEIGHTS'], device.weights_kept())")
    env = {k: v for k, v in os.environ.items() if k not in ("TF_ENABLE_ONEDNN_OPTS", "TF_ONEDNN_ASSUME_FROZEN_WEIGHTS")}
    env.update(PYTHONPATH=ROOT, SDANIM_CPU_BF16="0")
    for extra, expected in (({}, "False 0 1 False"),  # float32: oneDNN off, so nothing is kept
                            ({"TF_ENABLE_ONEDNN_OPTS": "1"}, "None 1 1 True"),
                            ({"TF_ENABLE_ONEDNN_OPTS": "1", "TF_ONEDNN_ASSUME_FROZEN_WEIGHTS": "0"}, "None 1 0 False")):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, **extra})
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == expected


def test_only_one_job_commands_keep_weights_in_kernels():
    """Every command but the browser app's server runs one job and exits: those keep the
    weights in oneDNN's kernels; the server, whose LoRAs and models change, does not."""
    from sdanim.frontends.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["morph", "a", "b"]).one_job and parser.parse_args(["generate", "a"]).one_job
    assert not parser.parse_args(["ui"]).one_job


KEPT_WEIGHTS_CHILD = """
import sys
import numpy as np
sys.path.insert(0, {tests!r})
import keras
import sdanim
from sdanim.model.convert import looks_like_v_prediction
from sdanim.model.device import weights_kept
from sdanim.model.stable_diffusion import model_state
from tiny import make_tiny_model

settings = sdanim.RenderSettings(height=64, width=64, num_steps=2, batch_size=2)

def render(model):
    return sdanim.generate("a red cube", num_images=2, seed=3, settings=settings, model=model, out_dir=None,
                           progress=False).images

def change(model):  # what merging a LoRA or binding a checkpoint does: values assigned, then invalidate
    parts = (model.diffusion_model, model.decoder)
    for part in parts:
        for variable in part.trainable_variables:
            variable.assign(variable.numpy() * -1.5)
    model_state(model).invalidate(parts)

model = make_tiny_model(seed=0)
before = render(model)
change(model)
after = render(model)
fresh = make_tiny_model(seed=0)
change(fresh)

def unet(scale):  # one 3x3 convolution of the latent: the same kind of kernel for both
    latent = keras.Input((8, 8, 4)); t_emb = keras.Input((320,)); context = keras.Input((77, 16))
    conv = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, kernel_initializer=keras.initializers.Constant(scale))
    return keras.Model([latent, t_emb, context], conv(latent))

v_answers = [looks_like_v_prediction(unet(-0.5)), looks_like_v_prediction(unet(0.0))]
np.savez({out!r}, before=before, after=after, fresh=render(fresh), kept=weights_kept(), v_answers=v_answers)
"""


def test_weights_kept_in_kernels_follow_weight_changes(tmp_path):
    """A process whose oneDNN kernels keep the weights they saw first (a command-line run:
    TF_ONEDNN_ASSUME_FROZEN_WEIGHTS=1, oneDNN forced on as on AVX512_VNNI/BF16/AMX CPUs)
    renders what this process renders; after the weights change (a LoRA, a checkpoint) it
    renders the new weights, as a model built with them does (not the stale converted
    copies); and the checkpoint loader's v-prediction check of two UNets with
    convolutions of one kind answers for each one's own weights (an eager convolution
    would compute with the first one's)."""
    import platform

    import numpy as np

    import sdanim
    from tiny import make_tiny_model

    if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
        pytest.skip("TensorFlow's oneDNN kernels are what x86-64 Linux wheels run")
    out = tmp_path / "kept.npz"
    env = dict(os.environ, PYTHONPATH=ROOT, TF_ENABLE_ONEDNN_OPTS="1", TF_ONEDNN_ASSUME_FROZEN_WEIGHTS="1")
    code = KEPT_WEIGHTS_CHILD.format(tests=os.path.join(ROOT, "tests"), out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = np.load(out)
    assert bool(child["kept"])
    assert np.abs(child["after"].astype(int) - child["before"].astype(int)).max() > 10  # the change shows
    assert np.array_equal(child["after"], child["fresh"])
    assert list(child["v_answers"]) == [True, False]
    # This process (its kernels convert weights at every call; oneDNN as the machine has
    # it) renders the same images: float rounding apart, at most 1 uint8 level.
    settings = sdanim.RenderSettings(height=64, width=64, num_steps=2, batch_size=2)
    here = sdanim.generate("a red cube", num_images=2, seed=3, settings=settings, model=make_tiny_model(seed=0),
                           out_dir=None, progress=False).images
    assert np.abs(here.astype(int) - child["before"].astype(int)).max() <= 1


def test_an_apple_silicon_mac_gets_the_torch_backend_unless_one_was_chosen(tmp_path):
    """Keras's torch backend (MPS) on an Apple-silicon Mac with torch installed; never where
    the user chose a backend (KERAS_BACKEND, or keras.json), on another machine, or without
    torch."""
    from sdanim.core.runtime import default_backend

    home = str(tmp_path)
    assert default_backend("Darwin", "arm64", {}, home, True) == "torch"
    assert default_backend("Darwin", "arm64", {"KERAS_BACKEND": "tensorflow"}, home, True) is None
    assert default_backend("Darwin", "arm64", {}, home, False) is None
    assert default_backend("Darwin", "x86_64", {}, home, True) is None
    assert default_backend("Linux", "aarch64", {}, home, True) is None
    (tmp_path / "keras.json").write_text('{"floatx": "float32"}')  # a config without a backend
    assert default_backend("Darwin", "arm64", {}, home, True) == "torch"
    (tmp_path / "keras.json").write_text('{"backend": "tensorflow"}')  # what Keras writes by itself
    assert default_backend("Darwin", "arm64", {}, home, True) == "torch"
    (tmp_path / "keras.json").write_text('{"backend": "jax"}')  # a choice
    assert default_backend("Darwin", "arm64", {}, home, True) is None


def test_an_sd3_process_keeps_tensorflows_onednn_choice_and_keeps_no_weights():
    """SD3's MMDiT is matrix products, faster on oneDNN's kernels in float32 too (device.py):
    a process asking for SD3 in float32 leaves oneDNN as TensorFlow would have it, and its
    command line does not ask oneDNN to keep converted weights (a copy of the MMDiT per
    compiled function: over 22 GiB at 512 px). SD 1.x's float32 command line still turns
    oneDNN off and asks for kept weights."""
    code = ("import os, sys; from sdanim.model import device; device._linux_flags = lambda: {'avx512_vnni'}\n"
            "from sdanim.frontends import cli\n"
            "args = cli.build_parser().parse_args(sys.argv[1:])\n"
            "args.run = lambda a: print(os.environ.get('TF_ENABLE_ONEDNN_OPTS'), "
            "os.environ.get('TF_ONEDNN_ASSUME_FROZEN_WEIGHTS'), 'tensorflow' in sys.modules) or 0\n"
            "cli._run(args, None)")
    env = {k: v for k, v in os.environ.items() if k not in ("TF_ENABLE_ONEDNN_OPTS", "TF_ONEDNN_ASSUME_FROZEN_WEIGHTS")}
    env.update(PYTHONPATH=ROOT, SDANIM_CPU_BF16="0")
    for model, expected in (("sd3-medium", "None None False"), ("1.4", "0 1 False")):
        proc = subprocess.run([sys.executable, "-c", code, "morph", "a", "b", "--model", model, "--precision", "float32"],
                              capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == expected, model
