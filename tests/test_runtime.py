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
    """What "auto" picks here, from this machine's features (or the run's override)."""
    from sdanim.model.device import cpu_has_native_bfloat16, detect_device, resolve_precision

    if detect_device() != "cpu":
        pytest.skip("the CPU path")
    import keras

    expected = "mixed_bfloat16" if cpu_has_native_bfloat16() and keras.backend.backend() == "tensorflow" else "float32"
    assert resolve_precision("auto") == expected
    assert resolve_precision("float32") == "float32"


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

    imported = ("assert device.resolve_precision('float32') == 'float32'\n"
                "r = device.hardware_report(); print(r['onednn'], r['onednn_choice'], os.environ['TF_ENABLE_ONEDNN_OPTS'])")
    assert run(imported) == ["False", "off", "for", "float32", "(sdanim)", "0"]
    # TensorFlow not imported: each call reads the environment as it is then.
    choices = ("print(device.choose_onednn('mixed_bfloat16'), device.choose_onednn('mixed_float16'))\n"
               "os.environ['SDANIM_CPU_BF16'] = '1'; print(device.choose_onednn('auto'))  # auto is bfloat16\n"
               "os.environ['SDANIM_CPU_BF16'] = '0'; print(device.choose_onednn('auto'))  # auto is float32\n"
               "os.environ['TF_ENABLE_ONEDNN_OPTS'] = '1'; print(device.choose_onednn('float32'))  # the user's word")
    assert run(choices) == ["None", "None", "None", "False", "None"]
