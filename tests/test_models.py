"""Model loading without network: tokenizer vocab from a package, clear weight errors."""

import os

import numpy as np
import pytest

from sdanim.config.errors import SdanimError
from sdanim.model.registry import WEIGHT_FILES, file_name
from sdanim.model.device import device_defaults
from sdanim.model.loading import load_model
from sdanim.model.tokenizer import load_tokenizer
from sdanim.core.prompts import PromptEncoder


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_tokenizer_vocab_is_keras_cv_file(tokenizer):
    import hashlib

    from sdanim.model.tokenizer import clip_vocab_path

    digest = hashlib.sha256(open(clip_vocab_path(), "rb").read()).hexdigest()
    assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    assert tokenizer.encode("a ford truck") == [49406, 320, 1623, 4629, 49407]


def test_empty_prompt_is_keras_cv_unconditional_context(tokenizer):
    from keras_cv.src.models.stable_diffusion.constants import _UNCONDITIONAL_TOKENS

    assert PromptEncoder(tokenizer, None).tokenize("") == list(_UNCONDITIONAL_TOKENS)


def test_long_prompt_is_truncated_with_a_warning(tokenizer):
    encoder = PromptEncoder(tokenizer, None)
    prompt = " ".join(["cat"] * 80)  # 80 content tokens + start + end = 82
    with pytest.warns(UserWarning, match=r"prompt is 80 tokens long, over CLIP's 75; the last 5 tokens were dropped"):
        tokens = encoder.tokenize(prompt)
    assert len(tokens) == 77 and tokens[0] == 49406 and tokens[-1] == 49407
    assert tokens[1:76] == [tokenizer.encode("cat")[1]] * 75


def test_prompt_of_exactly_75_tokens_is_not_truncated(tokenizer, recwarn):
    tokens = PromptEncoder(tokenizer, None).tokenize(" ".join(["cat"] * 75))
    assert tokens[-1] == 49407 and len(tokens) == 77
    assert not [w for w in recwarn if "dropped" in str(w.message)]


def test_device_defaults():
    assert device_defaults("cpu", native_bfloat16=False) == ("float32", False)
    assert device_defaults("cpu", native_bfloat16=True) == ("mixed_bfloat16", False)
    assert device_defaults("cpu", native_bfloat16=True, backend="jax") == ("float32", False)  # not measured there
    assert device_defaults("cuda") == ("mixed_float16", True)
    assert device_defaults("metal", native_bfloat16=True) == ("float32", False)


def test_native_bfloat16_is_read_from_the_cpu_flags():
    from sdanim.model.device import cpu_flags, cpu_has_native_bfloat16

    sapphire = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    epyc_zen2 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
    graviton3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
    assert {"avx512_bf16", "amx_bf16"} <= cpu_flags(sapphire)
    assert not cpu_flags(epyc_zen2) & {"avx512_bf16", "amx_bf16", "bf16"}
    assert "bf16" in cpu_flags(graviton3)
    # This machine: the answer agrees with its own /proc/cpuinfo (where there is one), or
    # with the override the run set (SDANIM_CPU_BF16, .ci/run's second pass).
    forced = os.environ.get("SDANIM_CPU_BF16")
    if forced is not None:
        assert cpu_has_native_bfloat16() == (forced == "1")
    elif os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = cpu_flags(f.read())
        assert cpu_has_native_bfloat16() == bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def test_weights_dir_missing_files_named(tmp_path):
    (tmp_path / file_name("1.4", "decoder")).write_bytes(b"x")
    with pytest.raises(SdanimError) as info:
        load_model(weights=str(tmp_path), height=64, width=64)
    message = str(info.value)
    assert "kcv_encoder.h5" in message and "kcv_diffusion_model.h5" in message
    assert "kcv_decoder.h5" not in message
    assert str(tmp_path) in message and "--weights random" in message and "--weights DIR" in message
    assert "\n" not in message


def test_weights_not_a_directory(tmp_path):
    with pytest.raises(SdanimError, match=r"weights must be 'keras-cv', 'random' or a directory.*Received: weights='.*nope'"):
        load_model(weights=str(tmp_path / "nope"), height=64, width=64)


def test_weights_dir_unreadable(tmp_path, monkeypatch):
    # chmod does not stop root (CI runs as root), so deny access where the loader asks.
    from sdanim.model import loading as models

    monkeypatch.setattr(models.os, "access", lambda path, mode: False)
    with pytest.raises(SdanimError, match=r"the weights directory cannot be read\. Received: weights='.*'"):
        load_model(weights=str(tmp_path), height=64, width=64)


def test_keras_cv_weights_offline_gives_one_clear_error(tmp_path, monkeypatch):
    """No weights in the cache and no network: one message naming the files and the
    ways out, not KerasCV's bare `Exception: URL fetch failure`."""
    import keras

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://huggingface.co/...: None -- [Errno -2] Name or service not known")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(SdanimError) as info:
        load_model(weights="keras-cv", height=64, width=64)
    message = str(info.value)
    for name in ("kcv_encoder.h5", "kcv_diffusion_model.h5", "kcv_decoder.h5"):
        assert name in message
    assert os.path.join(str(tmp_path), "datasets") in message
    assert "--weights random" in message


def test_a_users_file_in_the_cache_is_refused_and_kept(tmp_path, monkeypatch):
    """A KerasCV weights file in the Keras cache with other content (a copy the offline
    message told the user to make, gone wrong): one line naming the file and both hashes,
    the file left as it is; Keras's get_file (which deletes it and downloads it again) is
    never asked for it."""
    import hashlib

    import keras

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    cache = tmp_path / "datasets"
    cache.mkdir()
    (cache / "kcv_decoder.h5").write_bytes(b"a truncated copy")
    asked = []

    def offline(*args, **kwargs):
        asked.append(kwargs.get("fname"))
        raise Exception("URL fetch failure on https://huggingface.co/...: None -- [Errno -2] Name or service not known")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(SdanimError) as info:
        load_model(weights="keras-cv", height=64, width=64)
    message = str(info.value)
    found = hashlib.sha256(b"a truncated copy").hexdigest()[:12]
    assert f"kcv_decoder.h5 in the cache has another SHA-256 ({found}..., pinned ad350a65cc8b...)" in message
    assert "kcv_encoder.h5 could not be downloaded ([Errno -2] Name or service not known)" in message
    assert "\n" not in message and (cache / "kcv_decoder.h5").read_bytes() == b"a truncated copy"
    assert "kcv_decoder.h5" not in asked


def _keras_cv_downloads(cls) -> tuple:
    """(origin, file_hash) that KerasCV's class asks keras.utils.get_file for, read
    from the class's own __init__ source (building the 860M-parameter UNet just to
    watch the call would cost a minute)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and node.func.attr == "get_file"]
    assert len(calls) == 1, cls
    kw = {k.arg: ast.literal_eval(k.value) for k in calls[0].keywords}
    return kw["origin"], kw["file_hash"]


@pytest.mark.parametrize("version", ["1.4", "2.1"])
def test_weight_files_are_what_keras_cv_downloads(version, monkeypatch):
    """sdanim's table of weight files (name, URL, sha256) equals what the KerasCV class
    that sdanim builds for each part would download itself, so a cached KerasCV file is
    found and a wrong name, URL or hash cannot pass."""
    from keras_cv.src.models.stable_diffusion import decoder, diffusion_model, image_encoder, text_encoder

    from sdanim.model import loading as models

    built = {}
    for module in (decoder, diffusion_model, image_encoder, text_encoder):
        for name, cls in list(vars(module).items()):
            if isinstance(cls, type) and cls.__module__ == module.__name__ and "download_weights" in inspect_params(cls):
                monkeypatch.setattr(module, name, lambda *a, _cls=cls, **k: _cls)  # hand back the class, build nothing
    for part, make in models._builders(version, 64, 64).items():
        built[part] = make()
    for part, cls in built.items():
        assert WEIGHT_FILES[version][part] == _keras_cv_downloads(cls), (version, part, cls.__name__)
        assert file_name(version, part) == _keras_cv_downloads(cls)[0].rsplit("/", 1)[-1]
    assert built["text_encoder"].__name__ == ("TextEncoderV2" if version == "2.1" else "TextEncoder")
    assert built["diffusion_model"].__name__ == ("DiffusionModelV2" if version == "2.1" else "DiffusionModel")


def inspect_params(cls) -> tuple:
    import inspect

    try:
        return tuple(inspect.signature(cls.__init__).parameters)
    except (TypeError, ValueError):
        return ()


def test_keras_cv_weights_are_the_tables_files_checked_by_their_hashes(tmp_path, monkeypatch):
    """Online: load_model downloads the table's files (KerasCV's own URLs, under the names
    KerasCV caches them by) and checks each against the table's SHA-256; a download that
    does not match is removed (sdanim's own download) and named."""
    import keras

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    seen = []

    def fake_get_file(fname=None, origin=None, **kw):
        seen.append((fname, origin))
        path = tmp_path / "datasets" / fname
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"not the weights")
        return str(path)

    monkeypatch.setattr(keras.utils, "get_file", fake_get_file)
    with pytest.raises(SdanimError, match=r"the download of text_encoder_v2_1\.h5 does not match its published hash"):
        load_model(weights="keras-cv", version="2.1", height=64, width=64)
    origins = [WEIGHT_FILES["2.1"][part][0] for part in ("text_encoder", "diffusion_model", "decoder")]
    assert seen == [(origin.rsplit("/", 1)[-1], origin) for origin in origins]
    assert os.listdir(tmp_path / "datasets") == []


def test_bad_version_and_precision():
    with pytest.raises(SdanimError, match=r"model must be one of 1\.4, 2\.1\. Received: model='3'"):
        load_model(version="3")
    with pytest.raises(SdanimError, match=r"precision must be one of .*Received: precision='int8'"):
        load_model(precision="int8", weights="random", height=64, width=64)


def test_weights_dir_loads_h5_files(tmp_path):
    """A folder of .h5 files (as KerasCV names them) loads into the right parts."""
    import keras
    from keras_cv.src.models.stable_diffusion.decoder import Decoder

    from sdanim.model import loading as models

    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    def save_legacy_h5(model, name):  # the layout of KerasCV's published .h5 files
        with h5py.File(str(tmp_path / name), "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, model)

    keras.utils.set_random_seed(123)
    dec = Decoder(64, 64, download_weights=False)
    save_legacy_h5(dec, file_name("1.4", "decoder"))
    files = models._resolve_weight_files("1.4", str(tmp_path), ["decoder"])
    assert files == {"decoder": str(tmp_path / file_name("1.4", "decoder"))}
    with models._weights_loaded_later():  # as load_model builds it: no random draws
        built = models._builders("1.4", 64, 64)["decoder"]()
    assert not any(np.any(w) for w in built.get_weights())
    built.load_weights(files["decoder"])
    x = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype("float32")
    np.testing.assert_allclose(np.asarray(built(x)), np.asarray(dec(x)), atol=1e-6)


def test_loaded_weights_are_not_drawn_first(tmp_path, monkeypatch):
    """Parts whose weights are loaded right after the build skip the initializers'
    random draws (a third of the UNet's build time), hold exactly the files' weights,
    and weights="random" still draws them."""
    import types

    from keras.src.backend import random as backend_random
    from keras.src.layers.layer import Layer

    from sdanim.model import loading as models
    from tiny import make_tiny_model, tiny_decoder, tiny_image_encoder, tiny_text_encoder, tiny_unet

    source = make_tiny_model(seed=5)
    models.write_keras_weights(types.SimpleNamespace(version="1.4", **{p: getattr(source, p) for p in models.PART_ORDER}),
                               str(tmp_path))
    monkeypatch.setattr(models, "_builders", lambda version, h, w: {
        "text_encoder": tiny_text_encoder, "diffusion_model": lambda: tiny_unet(h, w),
        "decoder": lambda: tiny_decoder(h, w), "image_encoder": tiny_image_encoder})
    draws = []
    original = backend_random.uniform

    def counting(*args, **kwargs):
        draws.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(backend_random, "uniform", counting)
    add_weight = Layer.add_weight
    loaded = load_model(weights=str(tmp_path), height=64, width=64, precision="float32", attention="keras-cv")
    loaded.image_encoder  # built lazily, loaded too
    assert draws == []
    for part in models.PART_ORDER:
        ours, theirs = getattr(loaded, part).get_weights(), getattr(source, part).get_weights()
        assert len(ours) == len(theirs) and all(np.array_equal(a, b) for a, b in zip(ours, theirs)), part
    random_model = load_model(weights="random", seed=3, height=64, width=64, precision="float32", attention="keras-cv")
    assert len(draws) > 0
    kernel = random_model.diffusion_model.get_weights()[0]
    assert np.abs(kernel).max() > 0 and np.unique(kernel).size > 100  # drawn, not zeros
    assert Layer.add_weight is add_weight  # the build's patch is gone
