"""Checkpoint import, proved by parity with diffusers and transformers (random weights).

diffusers/transformers models with the SD 1.x and 2.x configurations and random weights
are written out as an original-layout single file (names checked against diffusers' own
single-file conversion) and as a diffusers folder; sdanim loads them into KerasCV's
classes, and each part's output is compared with the reference on the same inputs.

KerasCV's GEGLU uses the tanh approximation of GELU where diffusers uses the exact one;
the parity runs with diffusers switched to the same approximation (so any mapping error
shows at float32 level), and the exact-GELU gap is printed for the record.
"""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest

pytestmark = pytest.mark.heavy

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import sd_reference as ref  # noqa: E402

SIZE = 64  # the UNet's weights do not depend on the image size; small is fast


@pytest.fixture
def tanh_geglu(monkeypatch):
    """diffusers' GEGLU with the tanh GELU approximation that KerasCV's GEGLU uses."""
    import torch.nn.functional as F
    from diffusers.models import activations

    monkeypatch.setattr(activations.GEGLU, "gelu", lambda self, gate: F.gelu(gate, approximate="tanh"))


def _tokens(seed: int):
    rng = np.random.default_rng(seed)
    ids = np.full((2, 77), 49407, np.int64)
    ids[:, 0] = 49406
    ids[0, 1:9] = rng.integers(1, 49000, 8)
    ids[1, 1:30] = rng.integers(1, 49000, 29)
    return ids


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _compare_text(model, reference, seed=0) -> float:
    ids = _tokens(seed)
    positions = np.tile(np.arange(77, dtype=np.int32), (2, 1))
    ours = np.asarray(model.text_encoder([ids.astype(np.int32), positions]))
    with torch.no_grad():
        theirs = reference(torch.from_numpy(ids)).last_hidden_state.numpy()
    return _max_diff(ours, theirs), float(np.abs(theirs).max())


def _compare_unet(model, reference, context_dim: int, seed=0) -> tuple:
    from sdanim.sampling import timestep_embedding

    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((1, SIZE // 8, SIZE // 8, 4)).astype(np.float32)
    context = rng.standard_normal((1, 77, context_dim)).astype(np.float32)
    t = 601
    ours = np.asarray(model.diffusion_model([latent, timestep_embedding(t)[None], context]))
    with torch.no_grad():
        theirs = reference(torch.from_numpy(latent).permute(0, 3, 1, 2), t, torch.from_numpy(context)).sample
    theirs = theirs.permute(0, 2, 3, 1).numpy()
    return _max_diff(ours, theirs), float(np.abs(theirs).max())


def _compare_vae(model, vae, seed=0) -> tuple:
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((1, SIZE // 8, SIZE // 8, 4)).astype(np.float32)
    image = rng.uniform(-1, 1, (1, SIZE, SIZE, 3)).astype(np.float32)
    with torch.no_grad():
        decoded = vae.decode(torch.from_numpy(latent / 0.18215).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
        mean = vae.encode(torch.from_numpy(image).permute(0, 3, 1, 2)).latent_dist.mean.permute(0, 2, 3, 1).numpy()
    ours_decoded = np.asarray(model.decoder(latent))
    ours_latent = np.asarray(model.image_encoder(image))
    return (_max_diff(ours_decoded, decoded), float(np.abs(decoded).max()),
            _max_diff(ours_latent, mean * 0.18215), float(np.abs(mean * 0.18215).max()))


def _weights(model) -> list:
    return [np.array(v) for part in ("text_encoder", "diffusion_model", "decoder", "image_encoder")
            for v in getattr(model, part).weights]


def test_original_names_are_what_diffusers_converts(tmp_path):
    """sdanim's original-layout names, run through diffusers' single-file conversion,
    land every tensor on the diffusers parameter it came from (SD 1.x and 2.x)."""
    from diffusers.loaders import single_file_utils as conv

    for version in ("1.4", "2.1"):
        models = ref.build(version)
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
        del models, original, converted
        gc.collect()


def test_sd1_single_file_diffusers_folder_and_ckpt_match_diffusers(tmp_path, tanh_geglu, capsys):
    from sdanim.models import load_model

    models = ref.build("1.4", seed=1)
    state = ref.diffusers_state(models)
    original = ref.to_original(state, "1.4")
    single = str(tmp_path / "model.safetensors")
    ref.save_safetensors(original, single)
    folder = str(tmp_path / "diffusers")
    ref.save_diffusers_folder(models, folder)
    ckpt = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": {k: v.half() for k, v in original.items()}, "global_step": 7}, ckpt)
    del original, state
    gc.collect()

    model = load_model(weights=single, height=SIZE, width=SIZE, precision="float32", jit_compile=False,
                       attention="keras-cv")
    assert model.version == "1.4"
    text, text_scale = _compare_text(model, models["text_encoder"])
    unet, unet_scale = _compare_unet(model, models["unet"], 768)
    dec, dec_scale, enc, enc_scale = _compare_vae(model, models["vae"])
    import torch.nn.functional as F
    from diffusers.models import activations

    activations.GEGLU.gelu = lambda self, gate: F.gelu(gate)  # exact, for the record (undone by the fixture)
    unet_exact, _ = _compare_unet(model, models["unet"], 768)
    with capsys.disabled():
        print(f"\nSD 1.x parity (max |diff| / max |ref|): text encoder {text:.2e}/{text_scale:.1f}, "
              f"UNet {unet:.2e}/{unet_scale:.2f} ({unet_exact:.2e} against exact GELU), "
              f"VAE decode {dec:.2e}/{dec_scale:.2f}, VAE encode {enc:.2e}/{enc_scale:.2f}")
    assert text < 2e-4 * text_scale and unet < 2e-4 * unet_scale
    assert dec < 2e-4 * dec_scale and enc < 2e-4 * enc_scale
    single_weights = _weights(model)

    # `sdanim convert`'s writer: KerasCV-named .h5 files, found by `--weights DIR` with the
    # version detected; read back below over other weights.
    from sdanim.models import _h5_dir_version, file_name, weight_source_kind, write_keras_weights

    out = tmp_path / "converted"
    out.mkdir()
    written = write_keras_weights(model, str(out))
    assert sorted(os.listdir(out)) == sorted(file_name("1.4", p) for p in written)
    assert weight_source_kind(str(out)) == "h5-dir" and _h5_dir_version(str(out)) == "1.4"

    from sdanim.checkpoints import inspect_checkpoint
    from sdanim.weight_map import bind, check_keys

    # The diffusers folder and the fp16 .ckpt give the same model (the .ckpt rounded to fp16).
    for source, rounded in ((folder, False), (ckpt, True)):
        checkpoint = inspect_checkpoint(source)
        check_keys(checkpoint)
        for part in ("text_encoder", "diffusion_model", "decoder", "image_encoder"):
            bind(getattr(model, part), checkpoint, part)
        for a, b in zip(_weights(model), single_weights):
            expected = b.astype(np.float16).astype(np.float32) if rounded else b
            np.testing.assert_array_equal(a, expected)
    # KerasCV's own load_weights reads the .h5 files over the fp16-rounded weights.
    for part, path in written.items():
        getattr(model, part).load_weights(path)
    for a, b in zip(_weights(model), single_weights):
        np.testing.assert_array_equal(a, b)


def test_sd2_text_encoder_and_unet_match_diffusers(tmp_path, tanh_geglu, capsys):
    """SD 2.x: OpenCLIP text encoder (fused q/k/v in the original layout, penultimate
    layer) and the UNet with linear projections, from an original-layout file."""
    from sdanim.checkpoints import inspect_checkpoint
    from sdanim.weight_map import bind, check_keys
    from sdanim.models import _builders

    models = ref.build("2.1", seed=2)
    original = ref.to_original(ref.diffusers_state(models), "2.1")
    # Real SD 2.x files carry OpenCLIP's 24th layer and projection, unused by SD.
    for k in [k for k in original if ".resblocks.22." in k]:
        original[k.replace(".resblocks.22.", ".resblocks.23.")] = original[k].clone()
    original["cond_stage_model.model.text_projection"] = torch.zeros(1024, 1024)
    single = str(tmp_path / "v2.safetensors")
    ref.save_safetensors(original, single, dtype=torch.bfloat16)
    del original
    gc.collect()

    checkpoint = inspect_checkpoint(single)
    assert checkpoint.version == "2.1"
    check_keys(checkpoint)
    builders = _builders("2.1", SIZE, SIZE)

    class Parts:
        text_encoder = builders["text_encoder"]()
        diffusion_model = builders["diffusion_model"]()

    bind(Parts.text_encoder, checkpoint, "text_encoder")
    bind(Parts.diffusion_model, checkpoint, "diffusion_model")
    # Compare against the reference holding the same bfloat16-rounded weights.
    with torch.no_grad():
        for module in (models["text_encoder"], models["unet"]):
            for p in module.parameters():
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
    exact_text, _ = _compare_text(Parts, models["text_encoder"], seed=3)
    # KerasCV's TextEncoderV2 calls keras.ops.gelu, whose default is the tanh approximation.
    from transformers.activations import ACT2FN

    mlps = [m for m in models["text_encoder"].modules() if hasattr(m, "activation_fn")]
    assert len(mlps) == 23
    for mlp in mlps:
        mlp.activation_fn = ACT2FN["gelu_pytorch_tanh"]
    text, text_scale = _compare_text(Parts, models["text_encoder"], seed=3)
    unet, unet_scale = _compare_unet(Parts, models["unet"], 1024, seed=3)
    with capsys.disabled():
        print(f"\nSD 2.x parity (max |diff| / max |ref|): text encoder {text:.2e}/{text_scale:.1f} "
              f"({exact_text:.2e} against exact GELU), UNet {unet:.2e}/{unet_scale:.2f}")
    assert text < 2e-4 * text_scale and unet < 2e-4 * unet_scale

    # A mis-shaped tensor: one error naming it, and nothing assigned.
    import dataclasses

    from sdanim.checkpoints import CheckpointError, LazyTensor

    before = [np.array(v) for v in Parts.text_encoder.weights]
    bad = dict(checkpoint.tensors)
    bad["cond_stage_model.model.ln_final.weight"] = LazyTensor((5, 5), lambda: np.zeros((5, 5), np.float32))
    with pytest.raises(CheckpointError, match=r"1 tensors of the wrong shape \(cond_stage_model\.model\.ln_final"
                       r"\.weight \(5, 5\) \(expected \(1024,\)\)\)"):
        bind(Parts.text_encoder, dataclasses.replace(checkpoint, tensors=bad), "text_encoder")
    for a, b in zip(Parts.text_encoder.weights, before):
        np.testing.assert_array_equal(np.array(a), b)
