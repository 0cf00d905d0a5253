"""Checkpoint files: tensors read exactly without torch, pickles never run, bad files named.

torch is used here only to write files the way users' tools write them.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from sdanim.formats.checkpoints import Checkpoint, inspect_checkpoint
from sdanim.formats.tensors import CheckpointError, LazyTensor, read_tensors
from sdanim.config.errors import SdanimError

from conftest import require  # noqa: E402

torch = require("torch")


def _assert_same(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    for k, t in theirs.items():
        expected = t.float().numpy() if t.is_floating_point() else t.numpy()
        got = ours[k].load()
        assert ours[k].shape == tuple(t.shape)
        assert got.dtype == (np.float32 if t.is_floating_point() else expected.dtype), k
        np.testing.assert_array_equal(got, expected, err_msg=k)


def _tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g)
    return {
        "w32": torch.randn(3, 4, 3, 3, generator=g),
        "w16": torch.randn(7, generator=g).half(),
        "wbf16": torch.randn(4, 5, generator=g).bfloat16(),
        "transposed": base.t(),          # a strided view: stride (1, 4)
        "offset": base[2:],              # shares base's storage at an offset
        "ids": torch.arange(5),
    }


def test_ckpt_tensors_match_torch_load(tmp_path):
    """fp32, fp16, bf16, strided and offset views, ints; nested under "state_dict" with
    the non-tensor entries Lightning checkpoints carry."""
    tensors = _tensors()
    path = tmp_path / "model.ckpt"
    linear = torch.nn.Linear(3, 2).state_dict()  # an OrderedDict with torch's `_metadata`
    assert hasattr(linear, "_metadata")
    torch.save({"state_dict": {"model": tensors, "head": linear}, "global_step": 10, "epoch": np.float64(1.5)}, path)
    _assert_same(read_tensors(str(path)), {**{f"model.{k}": v for k, v in tensors.items()},
                                           **{f"head.{k}": v for k, v in linear.items()}})


def test_safetensors_match_including_bfloat16(tmp_path):
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in _tensors().items()}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    _assert_same(read_tensors(str(path)), tensors)


class _Payload:
    """A pickle that creates a file when unpickled (what a malicious checkpoint does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_ckpt_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hook": _Payload(marker)}, path)
    with pytest.raises(CheckpointError) as info:
        read_tensors(str(path))
    message = str(info.value)
    assert "io.open" in message and "safetensors" in message and "\n" not in message
    assert not marker.exists()
    # The payload is live: torch's full unpickler creates the file.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_legacy_pickle_is_refused_and_runs_nothing(tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    path = tmp_path / "old.ckpt"
    path.write_bytes(pickle.dumps({"w": _Payload(marker)}, protocol=2))
    with pytest.raises(CheckpointError, match=r"legacy .*pickle format.*Received: checkpoint='.*old\.ckpt'"):
        read_tensors(str(path))
    assert not marker.exists()


def test_truncated_and_foreign_files_get_one_line_errors(tmp_path):
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(1000)}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    ckpt = tmp_path / "good.ckpt"
    torch.save({"w": torch.ones(1000)}, ckpt)
    cut_ckpt = tmp_path / "cut.ckpt"
    cut_ckpt.write_bytes(ckpt.read_bytes()[: len(ckpt.read_bytes()) // 2])
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, not a model")
    text_ckpt = tmp_path / "notes.ckpt"
    text_ckpt.write_text("hello, not a model")
    for path in (cut, cut_ckpt, text, text_ckpt, tmp_path / "absent.safetensors"):
        with pytest.raises(CheckpointError) as info:
            read_tensors(str(path))
        assert f"Received: checkpoint={str(path)!r}" in str(info.value) and "\n" not in str(info.value)


def _write_unet_probe(path, in_channels=4, context=768, linear=False, extra=None):
    """The three tensors `inspect_checkpoint` reads to recognise an architecture."""
    from safetensors.numpy import save_file

    u = "model.diffusion_model."
    tensors = {
        u + "input_blocks.0.0.weight": np.zeros((320, in_channels, 3, 3), np.float16),
        u + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": np.zeros((320, context), np.float16),
        u + "input_blocks.1.1.proj_in.weight": np.zeros((320, 320) if linear else (320, 320, 1, 1), np.float16),
    }
    tensors.update(extra or {})
    save_file(tensors, str(path))
    return str(path)


def test_architectures_recognised_and_refused_by_name(tmp_path):
    assert inspect_checkpoint(_write_unet_probe(tmp_path / "a.safetensors")).version == "1.4"
    assert inspect_checkpoint(_write_unet_probe(tmp_path / "b.safetensors", context=1024, linear=True)).version == "2.1"
    cases = {
        "inpainting model": dict(in_channels=9),
        "instruct-pix2pix": dict(in_channels=8),
        "SDXL": dict(extra={"conditioner.embedders.0.transformer.x": np.zeros(1, np.float16)}),
        "class embedding": dict(extra={"model.diffusion_model.label_emb.0.0.weight": np.zeros(1, np.float16)}),
    }
    for i, (name, kwargs) in enumerate(cases.items()):
        path = _write_unet_probe(tmp_path / f"c{i}.safetensors", **kwargs)
        with pytest.raises(CheckpointError, match=name):
            inspect_checkpoint(path)
    # v-prediction: declared by the config beside the file (A1111's convention).
    v = _write_unet_probe(tmp_path / "v.safetensors", context=1024, linear=True)
    (tmp_path / "v.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    with pytest.raises(CheckpointError, match="predicts v"):
        inspect_checkpoint(v)
    # A config there that cannot be read, or is no SD config, is named: never ignored.
    for text, match in (("model: [unclosed\n", r"the config beside the checkpoint cannot be read \(.*\); fix or remove "
                                                 r".*v\.yaml\. Received: checkpoint="),
                        ("just a string\n", r"the \.yaml beside the checkpoint is not a Stable Diffusion config "
                                             r"\(no model\.params\)")):
        (tmp_path / "v.yaml").write_text(text)
        with pytest.raises(CheckpointError, match=match):
            inspect_checkpoint(v)
    with pytest.raises(CheckpointError, match="no Stable Diffusion UNet"):
        from safetensors.numpy import save_file

        save_file({"encoder.weight": np.zeros(3, np.float32)}, str(tmp_path / "other.safetensors"))
        inspect_checkpoint(str(tmp_path / "other.safetensors"))


def _diffusers_folder(root, prediction="epsilon", parts=("unet", "vae", "text_encoder")):
    from safetensors.numpy import save_file

    files = {
        "unet": ("diffusion_pytorch_model.safetensors", {
            "conv_in.weight": np.zeros((320, 4, 3, 3), np.float32),
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": np.zeros((320, 768), np.float32),
            "down_blocks.0.attentions.0.proj_in.weight": np.zeros((320, 320, 1, 1), np.float32)}),
        "vae": ("diffusion_pytorch_model.safetensors", {"decoder.conv_in.weight": np.zeros(1, np.float32)}),
        "text_encoder": ("model.safetensors", {"text_model.final_layer_norm.weight": np.zeros(1, np.float32)}),
    }
    for part in parts:
        os.makedirs(root / part)
        name, tensors = files[part]
        save_file(tensors, str(root / part / name))
    os.makedirs(root / "scheduler")
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": prediction}))
    (root / "model_index.json").write_text("{}")
    return str(root)


def test_diffusers_folders(tmp_path):
    assert inspect_checkpoint(_diffusers_folder(tmp_path / "ok")).layout == "diffusers"
    with pytest.raises(CheckpointError, match=r"lacks vae/"):
        inspect_checkpoint(_diffusers_folder(tmp_path / "novae", parts=("unet", "text_encoder")))
    with pytest.raises(CheckpointError, match="predicts v"):
        inspect_checkpoint(_diffusers_folder(tmp_path / "v", prediction="v_prediction"))


def _full_original(version: str) -> dict:
    from sdanim.formats.weight_map import PARTS, spec

    tensors = {}
    for part in PARTS:
        for leaf in spec(part, version):
            source = leaf["original"]
            for key in source.keys(source.bases[0]):
                tensors[key] = LazyTensor((1,), lambda: np.zeros(1, np.float32))
    return tensors


@pytest.mark.parametrize("version", ["1.4", "2.1"])
def test_every_tensor_accounted_for(version):
    from sdanim.formats.weight_map import check_keys

    tensors = _full_original(version)
    # What full training checkpoints carry beside the model is not an error.
    for extra in ("model_ema.decay", "model_ema.diffusion_modelinput_blocks00weight", "betas", "alphas_cumprod",
                  "first_stage_model.loss.logvar"):
        tensors[extra] = LazyTensor((1,), lambda: np.zeros(1))
    check_keys(Checkpoint("m.safetensors", "original", version, tensors))
    missing = sorted(k for k in tensors if k.startswith("model.diffusion_model.output_blocks.1"))[:7]
    for k in missing:
        del tensors[k]
    tensors["model.diffusion_model.lora_up.weight"] = LazyTensor((1,), lambda: np.zeros(1))
    with pytest.raises(CheckpointError) as info:
        check_keys(Checkpoint("m.safetensors", "original", version, tensors))
    message = str(info.value)
    assert "7 missing tensors" in message and sum(k in message for k in missing) == 5 and "and 2 more" in message
    assert "1 unexpected tensors (model.diffusion_model.lora_up.weight)" in message
    assert "\n" not in message


def test_weight_source_kinds(tmp_path):
    from sdanim.model.loading import weight_source_kind

    assert weight_source_kind("random") == "random"
    assert weight_source_kind(str(tmp_path / "x.safetensors")) == "checkpoint"
    assert weight_source_kind(_diffusers_folder(tmp_path / "d")) == "checkpoint"
    assert weight_source_kind(str(tmp_path)) == "h5-dir"


def test_cli_bad_checkpoints_exit_2_without_traceback(tmp_path, capsys):
    from sdanim.frontends.cli import main

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_text("not a model")
    inpaint = _write_unet_probe(tmp_path / "inpaint.safetensors", in_channels=9)
    runs = [
        ["convert", str(garbage), "--out", str(tmp_path / "out")],
        ["convert", inpaint, "--out", str(tmp_path / "out")],
        ["convert", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "out")],
        ["generate", "a cat", "--weights", inpaint, "--size", "64x64", "--steps", "1"],
        ["generate", "a cat", "--weights", _write_unet_probe(tmp_path / "v1.safetensors"), "--model", "2.1",
         "--size", "64x64", "--steps", "1"],
    ]
    for argv in runs:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("sdanim: error: ") and err.count("\n") == 1, err
        # A checkpoint that cannot be converted creates no output folder at all.
        assert not (tmp_path / "out").exists(), argv


def test_model_version_mismatch_is_named(tmp_path):
    from sdanim.model.loading import load_model

    with pytest.raises(SdanimError, match=r"holds a Stable Diffusion 1\.x model.*Received: model='2\.1'"):
        load_model(version="2.1", weights=_write_unet_probe(tmp_path / "v1.safetensors"), height=64, width=64)


def test_sd2_single_files_without_config_are_tested_for_v_prediction(tmp_path):
    """SD 2.x 768-v and 512 files share an architecture: a bare single file is marked
    unknown (load_model then runs AUTOMATIC1111's UNet test); a .yaml or a diffusers
    config decides instead."""
    import keras

    from sdanim.model.convert import looks_like_v_prediction

    v2 = _write_unet_probe(tmp_path / "v2.safetensors", context=1024, linear=True)
    assert inspect_checkpoint(v2).prediction_known is False
    (tmp_path / "v2.yaml").write_text("model:\n  params:\n    parameterization: eps\n")
    assert inspect_checkpoint(v2).prediction_known is True
    assert inspect_checkpoint(_write_unet_probe(tmp_path / "v1.safetensors")).prediction_known is True

    def unet(fn):
        latent, t_emb, context = keras.Input((8, 8, 4)), keras.Input((320,)), keras.Input((77, 1024))
        out = keras.layers.Lambda(lambda xs: fn(xs[0]) + 0.0 * keras.ops.mean(xs[1]) + 0.0 * keras.ops.mean(xs[2]))(
            [latent, t_emb, context])
        return keras.Model([latent, t_emb, context], out)

    assert looks_like_v_prediction(unet(lambda x: x * 0.0 - 2.0))        # far below the input
    assert not looks_like_v_prediction(unet(lambda x: x))                 # a noise predictor's answer
    assert not looks_like_v_prediction(unet(lambda x: x * 0.0 - 0.4))


def test_malformed_and_damaged_files_are_named(tmp_path):
    import struct

    header = json.dumps(["not", "a", "header"]).encode()
    odd = tmp_path / "odd.safetensors"
    odd.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match=r"not a readable \.safetensors file.*Received: checkpoint='.*odd\.safetensors'"):
        read_tensors(str(odd))
    # A flipped byte inside a stored tensor: the zip's CRC check fails when it is read.
    path = tmp_path / "damaged.ckpt"
    torch.save({"w": torch.arange(4096, dtype=torch.float32)}, path)
    data = bytearray(path.read_bytes())
    start = bytes(data).index(np.arange(4096, dtype=np.float32).tobytes()[:64])
    data[start + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    tensors = read_tensors(str(path))
    with pytest.raises(CheckpointError, match=r"cannot be read .*damaged.*Received: checkpoint='.*damaged\.ckpt'"):
        tensors["w"].load()


def test_convert_refuses_an_output_folder_it_cannot_create(tmp_path, capsys):
    from sdanim.frontends.cli import main

    (tmp_path / "taken").write_text("a file where the folder should go")
    probe = _write_unet_probe(tmp_path / "m.safetensors")
    assert main(["convert", probe, "--out", str(tmp_path / "taken" / "out")]) == 2
    err = capsys.readouterr().err
    assert "the output folder cannot be created" in err and "Received: out=" in err and err.count("\n") == 1


def test_load_checkpoint_weights_refuses_what_is_not_a_checkpoint(tmp_path):
    from sdanim.model.loading import load_checkpoint_weights

    with pytest.raises(SdanimError, match=r"checkpoint must be a \.safetensors/\.ckpt file or a diffusers folder\. "
                       r"Received: checkpoint='random'"):
        load_checkpoint_weights(None, "random")
