"""Checkpoint import, proved by parity with diffusers and transformers (random weights).

diffusers/transformers models with the SD 1.x and 2.x configurations and random weights
are written out as an original-layout single file (names checked against diffusers' own
single-file conversion), a diffusers folder and a .ckpt; sdanim binds them into the
suite's shared KerasCV models (the weights do not depend on the image size), and each
part's output is compared with the reference on the same inputs.

Memory: the torch reference computes its outputs and writes its files first and is
freed before the shared Keras model is built, so the two never sit in memory at once.

KerasCV's GEGLU uses the tanh approximation of GELU where diffusers uses the exact one;
the parity runs with diffusers switched to the same approximation (so any mapping error
shows at float32 level), and the exact-GELU gap is printed for the record.
"""

from __future__ import annotations

import gc
import hashlib
import os

import numpy as np
import pytest

from conftest import HEAVY_SIZE, require

pytestmark = pytest.mark.heavy

torch = require("torch")
require("diffusers")
require("transformers")
require("peft")  # diffusers' LoRA loading (the LoRA reference)

import sd_reference as ref  # noqa: E402

SIZE = HEAVY_SIZE  # the shared models' size
LCM_SEED = 11


def _tokens(seed: int):
    rng = np.random.default_rng(seed)
    ids = np.full((2, 77), 49407, np.int64)
    ids[:, 0] = 49406
    ids[0, 1:9] = rng.integers(1, 49000, 8)
    ids[1, 1:30] = rng.integers(1, 49000, 29)
    return ids


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _inputs(context_dim: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "ids": _tokens(seed),
        "latent": rng.standard_normal((1, SIZE // 8, SIZE // 8, 4)).astype(np.float32),  # (1, 8, 8, 4)
        "context": rng.standard_normal((1, 77, context_dim)).astype(np.float32),
        "image": rng.uniform(-1, 1, (1, SIZE, SIZE, 3)).astype(np.float32),
        "t": 601,
    }


def _nchw(x):
    return torch.from_numpy(x).permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


def _reference_text(module, x) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x["ids"])).last_hidden_state.numpy()


def _reference_unet(module, x) -> np.ndarray:
    with torch.no_grad():
        out = module(_nchw(x["latent"]), x["t"], torch.from_numpy(x["context"])).sample
    return out.permute(0, 2, 3, 1).numpy()


def _reference_vae(vae, x) -> tuple:
    with torch.no_grad():
        decoded = vae.decode(_nchw(x["latent"] / 0.18215)).sample.permute(0, 2, 3, 1).numpy()
        mean = vae.encode(_nchw(x["image"])).latent_dist.mean.permute(0, 2, 3, 1).numpy()
    return decoded, mean * 0.18215


def _ours(model, x, parts=("text", "unet", "decode", "encode")) -> dict:
    from sdanim.core.schedulers import timestep_embedding

    out = {}
    if "text" in parts:
        positions = np.tile(np.arange(77, dtype=np.int32), (2, 1))
        out["text"] = np.asarray(model.text_encoder([x["ids"].astype(np.int32), positions]))
    if "unet" in parts:
        out["unet"] = np.asarray(model.diffusion_model([x["latent"], timestep_embedding(x["t"])[None], x["context"]]))
    if "decode" in parts:
        out["decode"] = np.asarray(model.decoder(x["latent"]))
    if "encode" in parts:
        out["encode"] = np.asarray(model.image_encoder(x["image"]))
    return out


def _assert_parity(label: str, ours: dict, expected: dict, capsys, note: str) -> None:
    """Prints each part's max |diff| / max |ref| and asserts it under 2e-4 of the scale."""
    gaps = {k: (_max_diff(ours[k], expected[k]), float(np.abs(expected[k]).max())) for k in ours}
    with capsys.disabled():
        print(f"\n{label} parity (max |diff| / max |ref|): "
              + ", ".join(f"{k} {d:.2e}/{m:.2f}" for k, (d, m) in gaps.items()) + f" ({note})")
    for k, (d, m) in gaps.items():
        assert d < 2e-4 * m, (k, d, m)


def _round_parameters(models: dict, dtype) -> None:
    """Rounds every parameter to `dtype` (in float32), as the written file holds them."""
    with torch.no_grad():
        for module in models.values():
            for p in module.parameters():
                p.copy_(p.to(dtype).to(torch.float32))


def _fingerprint(model) -> list:
    """One digest per weight of the four parts: equal lists = bit-identical weights.
    (sha256 of the array's own buffer: hardware-accelerated, no extra copy; 4.3 GB a call.)"""
    import keras

    return [hashlib.sha256(np.ascontiguousarray(keras.ops.convert_to_numpy(v))).digest()
            for part in ("text_encoder", "diffusion_model", "decoder", "image_encoder")
            for v in getattr(model, part).weights]


def _check_names(models: dict, version: str) -> None:
    """sdanim's original-layout names, run through diffusers' single-file conversion,
    land every tensor on the diffusers parameter it came from."""
    from diffusers.loaders import single_file_utils as conv

    original = ref.to_original(ref.diffusers_state(models), version)
    converted = {
        "unet": conv.convert_ldm_unet_checkpoint(original, dict(models["unet"].config)),
        "vae": conv.convert_ldm_vae_checkpoint(original, dict(models["vae"].config)),
        "text_encoder": conv.convert_ldm_clip_checkpoint(original) if version == "1.4"
        else conv.convert_open_clip_checkpoint(models["text_encoder"], original),
    }
    for part, module in models.items():
        theirs = {k.removeprefix("text_model."): v for k, v in converted[part].items()}
        state = {k.removeprefix("text_model."): v for k, v in module.state_dict().items()
                 if not k.endswith("position_ids")}
        assert set(theirs) == set(state), (version, part, sorted(set(theirs) ^ set(state))[:5])
        for k, v in state.items():
            assert torch.equal(theirs[k].reshape(v.shape), v), (version, part, k)


def _aid_inputs(context_dim: int, seed: int) -> dict:
    """One guided UNet batch for attention interpolation: an unconditional row, then the
    conditional rows: two frames (at t = 0.3 and 0.75 between A and B) and A's and B's
    helper rows, each with its own latent and context."""
    rng = np.random.default_rng(seed)
    return {
        "latent": rng.standard_normal((5, SIZE // 8, SIZE // 8, 4)).astype(np.float32),
        "context": rng.standard_normal((5, 77, context_dim)).astype(np.float32),
        "t": 601,
        # (cond_start, t, a, b, on) over the 4 conditional rows; A, B at rows 2, 3 of them
        "rows": (1, np.array([0.3, 0.75, 0, 0], np.float32), np.array([2, 2, 0, 0], np.int32),
                 np.array([3, 3, 0, 0], np.int32), np.array([1, 1, 0, 0], np.float32)),
    }


def _assert_aid_parity(model, aid: dict, expected: dict, capsys) -> None:
    """sdanim's attention interpolation (every self- and cross-attention layer of the
    UNet) against `sd_reference.AidProcessor` on diffusers' UNet with the same weights:
    each mode within 1e-4 of the output's scale; rows that do not interpolate stay the
    plain UNet's (within the same tolerance; bit for bit on the tiny UNet,
    tests/test_attention_interp.py); interpolating moves the frames far beyond it."""
    from sdanim.core.schedulers import timestep_embedding
    from sdanim.model import attention_interp

    inputs = [aid["latent"], np.repeat(timestep_embedding(aid["t"])[None], 5, axis=0), aid["context"]]
    plain = expected["plain"]
    gaps = {}
    for mode in ("inner", "outer", "fused"):
        reference = expected[mode]
        with attention_interp.active(mode, *aid["rows"]):
            ours = np.asarray(model.diffusion_model(inputs))  # eager: the layers read the state as they run
        scale = float(np.abs(reference).max())
        gaps[mode] = (_max_diff(ours, reference), scale, _max_diff(reference[1:3], plain[1:3]))
        assert gaps[mode][0] < 1e-4 * scale, (mode, gaps[mode])
        assert _max_diff(ours[[0, 3, 4]], plain[[0, 3, 4]]) < 1e-4 * scale, mode  # uncond and helper rows: plain
        assert gaps[mode][2] > 1e-2 * scale, (mode, gaps[mode])
    with capsys.disabled():
        print("\nAID parity (max |diff| / max |ref|; moved from plain): "
              + ", ".join(f"{m} {d:.2e}/{s:.2f} ({p:.2f})" for m, (d, s, p) in gaps.items()))


def test_sd1_checkpoints_load_like_diffusers(sd_model_later, tmp_path, monkeypatch, capsys):
    """SD 1.x as a single original-layout .safetensors, a diffusers folder and an fp16
    .ckpt: the same weights, and outputs that match diffusers/transformers; the model's
    own weights come back through KerasCV's load_weights from sdanim's .h5 files."""
    from sdanim.model.loading import _h5_dir_version, load_checkpoint_weights, weight_source_kind
    from sdanim.model.registry import file_name
    from sdanim.model.convert import write_keras_weights
    from sdanim.core.noise import step_noise
    from sdanim.render.sampling import Renderer
    from sdanim.config.settings import RenderSettings

    # 1. The reference: names, fp16-rounded weights, outputs, files; then freed.
    models = ref.build("1.4", seed=1)
    _check_names(models, "1.4")
    _round_parameters(models, torch.float16)  # the files are fp16, as community models ship
    x = _inputs(768, seed=0)
    expected = {"text": _reference_text(models["text_encoder"], x), "unet_exact": _reference_unet(models["unet"], x)}
    ref.use_tanh_geglu(monkeypatch)
    expected["unet"] = _reference_unet(models["unet"], x)
    expected["decode"], expected["encode"] = _reference_vae(models["vae"], x)
    aid = _aid_inputs(768, seed=4)
    expected["aid"] = ref.aid_unet_outputs(models["unet"], aid["latent"], aid["t"], aid["context"], aid["rows"])
    original = ref.to_original(ref.diffusers_state(models), "1.4")
    single = str(tmp_path / "model.safetensors")
    ref.save_safetensors(original, single, dtype=torch.float16)
    ckpt = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": {k: v.half() for k, v in original.items()}, "global_step": 7}, ckpt)
    folder = str(tmp_path / "diffusers")
    ref.save_diffusers_folder({k: m.half() for k, m in models.items()}, folder)
    for m in models.values():
        m.float()  # exact: the weights were rounded to float16 above
    # LoRA files in both formats, merged by diffusers + PEFT into the same weights
    # (last: unfusing in torch does not give the weights back bit for bit).
    loras = {"kohya": (str(tmp_path / "kohya.safetensors"), 0.8), "peft": (str(tmp_path / "peft.safetensors"), 1.0)}
    for style, (path, scale) in loras.items():
        ref.save_safetensors(ref.random_lora(models, style, seed=5 if style == "kohya" else 6), path)
        expected[style] = ref.fused_outputs(models, path, scale, lambda pipe: {
            "text": _reference_text(pipe.text_encoder, x), "unet": _reference_unet(pipe.unet, x),
            "lcm": ref.lcm_latents(pipe, x["context"], x["latent"], step_noise(LCM_SEED, 4, x["latent"].shape[1:]))})
    paths, scales = zip(*loras.values())  # both at once: two adapters, each at its scale, fused together
    expected["stacked"] = ref.fused_outputs(models, list(paths), list(scales), lambda pipe: {
        "text": _reference_text(pipe.text_encoder, x), "unet": _reference_unet(pipe.unet, x)})
    del models, original
    gc.collect()

    # 2. The shared model: its own weights saved as KerasCV .h5 files, then the checkpoint.
    model = sd_model_later()
    own = str(tmp_path / "own")
    os.makedirs(own)
    written = write_keras_weights(model, own)
    assert sorted(os.listdir(own)) == sorted(file_name("1.4", p) for p in written)
    assert weight_source_kind(own) == "h5-dir" and _h5_dir_version(own) == "1.4"
    before = _fingerprint(model)
    load_checkpoint_weights(model, single)
    assert model.weights == single
    ours = _ours(model, x)
    _assert_parity("SD 1.x", ours, expected, capsys,
                   f"UNet {_max_diff(ours['unet'], expected['unet_exact']):.2e} against exact GELU")
    from_single = _fingerprint(model)
    assert from_single != before
    _assert_aid_parity(model, aid, expected["aid"], capsys)

    # 3. LoRAs merged by sdanim match diffusers' fused ones; removing them restores the
    #    checkpoint's weights bit for bit, without a rebuild.
    for style, (path, scale) in loras.items():
        model.set_loras([(path, scale)])
        ours = _ours(model, x, parts=("text", "unet"))
        # End to end: 4 LCM steps at guidance 1 from the same embeddings, noise and step noise.
        lcm = RenderSettings(height=SIZE, width=SIZE, scheduler="lcm")
        ours["lcm"] = np.asarray(Renderer(model.diffusion_model, model.decoder, lcm, np.zeros((77, 768), np.float32))
                                 .sample_latents(x["context"], x["latent"], [LCM_SEED]))
        changed = {k: _max_diff(expected[style][k], expected[k]) for k in ("text", "unet")}  # LoRA vs none
        _assert_parity(f"SD 1.x + {style} LoRA", ours, expected[style], capsys,
                       "the LoRA moved text {text:.2e}, UNet {unet:.2e}".format(**changed))
        assert min(changed.values()) > 1e-2  # the LoRA changes the outputs far beyond the tolerance
        assert model.describe()["loras"] == [{"file": os.path.basename(path), "size": os.path.getsize(path),
                                              "sha256": hashlib.sha256(open(path, "rb").read()).hexdigest(),
                                              "scale": scale}]
    model.set_loras([loras["kohya"], loras["peft"]])  # stacked: diffusers' two adapters fused together
    stacked = _ours(model, x, parts=("text", "unet"))
    _assert_parity("SD 1.x + kohya + peft LoRAs", stacked, expected["stacked"], capsys,
                   f"stacked vs kohya alone {_max_diff(stacked['unet'], expected['kohya']['unet']):.2e}")
    assert min(_max_diff(stacked["unet"], expected[style]["unet"]) for style in loras) > 1e-2
    model.remove_loras()
    assert _fingerprint(model) == from_single and "loras" not in model.describe()

    # 4. The diffusers folder and the .ckpt give bit-identical weights.
    for source in (folder, ckpt):
        load_checkpoint_weights(model, source)
        assert _fingerprint(model) == from_single, source

    # 5. KerasCV's own load_weights reads sdanim's .h5 files: the random weights return.
    for part, path in written.items():
        getattr(model, part).load_weights(path)
    assert _fingerprint(model) == before
    model.weights = "random"  # what it holds again (for the tests that share it)
    model.invalidate()  # its embeddings were made with the checkpoint's text encoder
