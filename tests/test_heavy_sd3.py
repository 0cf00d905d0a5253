"""SD3 at its real shapes: one transformer call at 256 px against diffusers'
`SD3Transformer2DModel` holding the same random weights (every parameter drawn, the
position grid too), for SD3 medium's layout and 3.5 medium's MMDiT-X.

Memory: each transformer is about 8.3 GB in float32, so they never live together. The
reference is built, its output computed, its weights written to a safetensors file and
the model dropped; then sdanim builds KerasHub's MMDiT and reads the file one tensor at a
time through the same name map a diffusers folder goes through (peak about 10 GB).

The family tier (`python -m pytest -m family`); the quick tier checks the same code on
tiny configurations (tests/test_sd3.py)."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from conftest import require

torch = require("torch")
diffusers = require("diffusers")
require("keras_hub")

pytestmark = [pytest.mark.heavy, pytest.mark.family]

SIZE = 256
LATENT = SIZE // 8
# KerasHub's presets' parameter counts (stable_diffusion_3_presets.py): the whole backbone,
# CLIP-L, CLIP-G, their projections, the MMDiT and the VAE -- sdanim's configs must give them.
PRESET_PARAMETERS = {"sd3-medium": 2_987_080_931, "sd3.5-medium": 3_371_793_763}


@pytest.mark.parametrize("version", ["sd3-medium", "sd3.5-medium"])
def test_the_mmdit_matches_diffusers_at_real_shapes(version, tmp_path, capsys):
    from safetensors.torch import save_file

    from sdanim.core.runtime import import_keras
    from sdanim.formats.sd3_files import mmdit_weights
    from sdanim.formats.tensors import read_tensors
    from sdanim.model import sd3

    config = sd3.SD3_CONFIGS[version]
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((2, LATENT, LATENT, 16)).astype(np.float32)
    seq = rng.standard_normal((2, sd3.SEQUENCE_TOKENS, sd3.CONTEXT_WIDTH)).astype(np.float32)
    seq[:, 77:] = 0.0
    pooled = rng.standard_normal((2, 2048)).astype(np.float32)
    t = np.array([[1000.0], [250.0]], np.float32)

    torch.manual_seed(0)
    ref = diffusers.SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=config.num_layers,
        attention_head_dim=64, num_attention_heads=config.num_heads, joint_attention_dim=4096,
        caption_projection_dim=config.hidden_dim, pooled_projection_dim=2048, pos_embed_max_size=config.position_size,
        dual_attention_layers=config.dual_attention, qk_norm=config.qk_norm).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            spread = p[0].numel() ** -0.5 if p.ndim > 1 else 0.2
            p.copy_(torch.randn_like(p) * spread + (1.0 if "norm" in name and p.ndim == 1 else 0.0))
        ref.pos_embed.pos_embed.copy_(torch.randn_like(ref.pos_embed.pos_embed))
        expected = ref(hidden_states=torch.from_numpy(latent.transpose(0, 3, 1, 2)),
                       encoder_hidden_states=torch.from_numpy(seq), pooled_projections=torch.from_numpy(pooled),
                       timestep=torch.from_numpy(t[:, 0])).sample.numpy().transpose(0, 2, 3, 1)
    path = str(tmp_path / "transformer.safetensors")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    parameters = sum(p.numel() for p in ref.parameters())
    grid = ref.pos_embed.pos_embed.numel()  # a buffer in diffusers, a weight in KerasHub
    del ref
    gc.collect()

    keras = import_keras()
    keras.utils.set_random_seed(0)
    backbone = sd3.build_backbone(config, SIZE, SIZE, "float32")
    assert backbone.diffuser.count_params() == parameters + grid  # the same architecture, to the parameter
    assert backbone.count_params() == PRESET_PARAMETERS[version]  # and the text encoders and VAE KerasHub's
    sd3.assign(backbone.diffuser, mmdit_weights(read_tensors(path), config.num_layers, config.dual_attention,
                                                config.qk_norm), "the reference transformer")
    model = sd3.wrap(version, backbone, SIZE, SIZE, "random", "float32")
    packed = np.zeros((2, sd3.CONTEXT_ROWS, sd3.CONTEXT_WIDTH), np.float32)
    packed[:, : sd3.SEQUENCE_TOKENS], packed[:, sd3.SEQUENCE_TOKENS, :2048] = seq, pooled
    ours = np.asarray(model.diffusion_model([latent, t, packed]))
    scale = np.abs(expected).max()
    gap = np.abs(ours - expected).max() / scale
    with capsys.disabled():
        print(f"\n{version} MMDiT at {SIZE} px ({parameters:,} parameters): max |sdanim - diffusers| = "
              f"{gap:.2e} of the output's scale {scale:.2f}")
    assert scale > 0.1
    assert gap <= 1e-4
