"""SD 2.1 on the real architecture (random weights), run in a process of its own by
tests/test_heavy.py::test_sd21_in_its_own_process (see why there); not collected by the
main run (the file name does not start with test_).

    python -m pytest tests/heavy_sd21.py
"""

import dataclasses
import gc

import numpy as np
import pytest

from conftest import HEAVY_LATENT, HEAVY_SIZE, keras_cv_layers, require
from test_heavy_checkpoints import (
    _assert_parity, _check_names, _inputs, _max_diff, _ours, _reference_text, _reference_unet,
    _reference_vae, _round_parameters, ref, torch,
)

from sdanim.model.stable_diffusion import prompt_encoder
from sdanim.core.noise import seeded_noise
from sdanim.render.sampling import Renderer
from sdanim.config.settings import RenderSettings

pytestmark = pytest.mark.heavy
require("diffusers")


def test_sd2_checkpoint_loads_like_diffusers(sd21_model_later, tmp_path, monkeypatch, capsys):
    """SD 2.x: OpenCLIP text encoder (fused q/k/v in the original layout, penultimate
    layer) and the UNet with linear projections, from a bf16 original-layout file."""
    from sdanim.formats.tensors import CheckpointError, LazyTensor
    from sdanim.formats.checkpoints import inspect_checkpoint
    from sdanim.model.loading import load_checkpoint_weights
    from sdanim.formats.weight_map import bind
    from transformers.activations import ACT2FN

    # 1. The reference: names, bf16-rounded weights, outputs, the file; then freed.
    models = ref.build("2.1", seed=2)
    _check_names(models, "2.1")
    _round_parameters(models, torch.bfloat16)
    x = _inputs(1024, seed=3)
    exact_text = _reference_text(models["text_encoder"], x)
    # KerasCV's TextEncoderV2 calls keras.ops.gelu, whose default is the tanh approximation.
    mlps = [m for m in models["text_encoder"].modules() if hasattr(m, "activation_fn")]
    assert len(mlps) == 23
    for mlp in mlps:
        mlp.activation_fn = ACT2FN["gelu_pytorch_tanh"]
    ref.use_tanh_geglu(monkeypatch)
    expected = {"text": _reference_text(models["text_encoder"], x), "unet": _reference_unet(models["unet"], x)}
    expected["decode"], _ = _reference_vae(models["vae"], x)
    original = ref.to_original(ref.diffusers_state(models), "2.1")
    del models
    # Real SD 2.x files carry OpenCLIP's 24th layer and projection, unused by SD.
    for k in [k for k in original if ".resblocks.22." in k]:
        original[k.replace(".resblocks.22.", ".resblocks.23.")] = original[k].clone()
    original["cond_stage_model.model.text_projection"] = torch.zeros(1024, 1024)
    single = str(tmp_path / "v2.safetensors")
    ref.save_safetensors(original, single, dtype=torch.bfloat16)
    (tmp_path / "v2.yaml").write_text("model:\n  params:\n    parameterization: eps\n")  # a 512 (noise) model
    del original
    gc.collect()

    # 2. The shared SD 2.1 model takes the file.
    model = sd21_model_later()
    load_checkpoint_weights(model, single)
    ours = _ours(model, x, parts=("text", "unet", "decode"))
    _assert_parity("SD 2.x", ours, expected, capsys,
                   f"text encoder {_max_diff(ours['text'], exact_text):.2e} against exact GELU")

    # 3. A mis-shaped tensor: one error naming it, and nothing assigned.
    checkpoint = inspect_checkpoint(single)
    before = [np.array(v) for v in model.text_encoder.weights]
    bad = dict(checkpoint.tensors)
    bad["cond_stage_model.model.ln_final.weight"] = LazyTensor((5, 5), lambda: np.zeros((5, 5), np.float32))
    with pytest.raises(CheckpointError, match=r"1 tensors of the wrong shape \(cond_stage_model\.model\.ln_final"
                       r"\.weight \(5, 5\) \(expected \(1024,\)\)\)"):
        bind(model.text_encoder, dataclasses.replace(checkpoint, tensors=bad), "text_encoder")
    for a, b in zip(model.text_encoder.weights, before):
        np.testing.assert_array_equal(np.array(a), b)


def test_sd21_architecture_matches_keras_cv_v2_loop(sd21_model):
    """SD 2.1 (OpenCLIP text encoder, 1024-wide context) renders like KerasCV's V2 loop."""
    from sdanim.model.reference import keras_cv_pipeline

    encoder = prompt_encoder(sd21_model)
    contexts = encoder.encode(["a lighthouse in a storm"])  # (1, 77, 1024)
    assert contexts.shape == (1, 77, 1024)
    noise = seeded_noise(3, HEAVY_LATENT)[None]
    settings = RenderSettings(height=HEAVY_SIZE, width=HEAVY_SIZE, num_steps=2, batch_size=1)
    ours = Renderer(sd21_model.diffusion_model, sd21_model.decoder, settings, encoder.encode_one("")).render(contexts, noise, [3])
    with keras_cv_layers(sd21_model):  # the reference: KerasCV's loop on KerasCV's layers
        theirs = keras_cv_pipeline(sd21_model).generate_image(contexts, batch_size=1, num_steps=2, diffusion_noise=noise)
    diff = int(np.abs(ours.astype(int) - np.asarray(theirs).astype(int)).max())
    print(f"sd2.1 max pixel diff {diff}, image std {ours.std():.1f}")
    assert diff <= 2 and ours.std() > 1


def test_sd21_controlnet_matches_diffusers(sd21_model, tmp_path, monkeypatch, capsys):
    """SD 2.1's ControlNet shapes (linear projections, a 1024-wide context), as
    tests/test_heavy_controlnet.py checks SD 1.5's."""
    from test_heavy_controlnet import controlnet_parity

    controlnet_parity(sd21_model, "2.1", tmp_path, monkeypatch, capsys)
