"""`sdanim doctor`: the machine as sdanim sees it (fields a user reads), the weights cache
checked file by file, a measured speed, hints; the command line."""

import hashlib

import pytest

from sdanim.config.errors import SdanimError
from sdanim.frontends.cli import main
from sdanim.model.registry import PinnedFile
from sdanim.tasks import doctor as doctor_module

FIELDS = ["python", "platform", "versions", "backend", "device", "precision auto"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty Keras cache of this test's own."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    (tmp_path / "keras" / "datasets").mkdir(parents=True)
    return tmp_path / "keras" / "datasets"


def test_doctor_reports_the_machine_the_cache_and_a_measured_speed(tiny, cache, monkeypatch):
    import keras

    good, bad = cache / "good.bin", cache / "taesd_decoder.pth"
    good.write_bytes(b"weights")
    bad.write_bytes(b"not the published file")  # a file a user copied in
    real = doctor_module.pinned_files
    pinned = PinnedFile("good.bin", "https://example.invalid/good.bin", sha256=hashlib.sha256(b"weights").hexdigest())
    monkeypatch.setattr(doctor_module, "pinned_files", lambda: real() + [pinned])

    report = doctor_module.doctor(model=tiny, print_report=False)
    assert list(report.fields)[:len(FIELDS)] == FIELDS
    assert report.fields["backend"].startswith(keras.backend.backend())
    assert report.fields["device"].startswith("CPU: ") and "cores" in report.fields["device"]
    assert report.fields["precision auto"].startswith(("float32", "mixed_bfloat16"))
    if keras.backend.backend() == "tensorflow":
        assert report.fields["oneDNN"].startswith(("on", "off"))
    assert report.cache["good.bin"] == "verified"
    assert report.cache["taesd_decoder.pth"].startswith("not usable: taesd_decoder.pth in the cache has another")
    assert report.cache["kcv_diffusion_model.h5"] == "absent" and len(report.cache) >= 14
    assert bad.read_bytes() == b"not the published file"  # left where it is
    assert report.seconds_per_step is not None and 0 < report.seconds_per_step < 60
    assert report.size == tiny.height
    text = str(report)
    assert "s per guided UNet step at 64x64" in text and "good.bin: verified" in text
    assert any("tiny decoder" in hint for hint in report.hints)  # a CPU: the preview hint


def test_the_command_line(cache, capsys):
    assert main(["doctor", "--no-speed"]) == 0
    out = capsys.readouterr().out
    for field in FIELDS + ["weights cache", "kcv_decoder.h5: absent"]:
        assert field in out, field
    assert "per guided UNet step" not in out  # --no-speed builds nothing
    assert main(["doctor", "--quick", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_bad_arguments_are_one_line():
    with pytest.raises(SdanimError, match=r"^speed must be True or False. Received: speed='yes'$"):
        doctor_module.doctor(speed="yes", print_report=False)
    with pytest.raises(SdanimError, match=r"^quick must be True or False. Received: quick=1$"):
        doctor_module.doctor(quick=1, print_report=False)
