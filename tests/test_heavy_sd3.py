"""SD3 at its real shapes: one transformer call at 256 px against diffusers'
`SD3Transformer2DModel` holding the same random weights (every parameter drawn, the
position grid too), for SD3 medium's layout and 3.5 medium's MMDiT-X.

Memory: each transformer is about 8.1 GB in float32, so they never live together. In a
process of its own per version, the reference is built, every tensor drawn from a generator
seeded by its position in the state dict, its output computed and the model dropped; then
sdanim builds KerasHub's backbone (the MMDiT, CLIP-L, CLIP-G and the VAE: its parameter count
is checked against KerasHub's preset's) and takes the same tensors, drawn again one at a time,
through the same name map a diffusers folder goes through. Nothing is written to disk (8 GB
of weights there filled CI's disk once).

A tier of its own (`python -m pytest -m sd3_shapes`, about 5.5 min); the quick tier checks
the same code on tiny configurations (tests/test_sd3.py)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import require  # noqa: E402

torch = require("torch")
diffusers = require("diffusers")
require("keras_hub")

# A tier of its own (`python -m pytest -m sd3_shapes`; .ci/run runs it): beside the family
# tier it would take that past 15 min. own_process: each version's child (18.7 GiB) runs
# before anything in the parent holds a model; beside the family tier's shared SD 1.4 model
# it was killed for memory (24 GB).
pytestmark = [pytest.mark.heavy, pytest.mark.sd3_shapes, pytest.mark.own_process]

SIZE = 256
LATENT = SIZE // 8
# KerasHub's presets' parameter counts (stable_diffusion_3_presets.py): the whole backbone,
# CLIP-L, CLIP-G, their projections, the MMDiT and the VAE -- sdanim's configs must give them.
PRESET_PARAMETERS = {"sd3-medium": 2_987_080_931, "sd3.5-medium": 3_371_793_763}


@pytest.mark.parametrize("version", ["sd3-medium", "sd3.5-medium"])
def test_the_mmdit_matches_diffusers_at_real_shapes(version, capsys):
    """Each version in a process of its own: TensorFlow keeps a dropped model's weights
    alive in the functions it traced, and two 8 GB transformers do not fit beside them."""
    proc = subprocess.run([sys.executable, __file__, version], capture_output=True, text=True,
                          timeout=1100)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    with capsys.disabled():
        print(f"\n{version} MMDiT at {SIZE} px ({result['parameters']:,} parameters): max |sdanim - diffusers| = "
              f"{result['gap']:.2e} of the output's scale {result['scale']:.2f}; child peak RSS "
              f"{result['peak_gib']:.1f} GiB")
    assert result["scale"] > 0.1
    assert result["mmdit_parameters"] == result["parameters"] + result["grid"]  # the same architecture
    assert result["backbone_parameters"] == PRESET_PARAMETERS[version]  # its text encoders and VAE KerasHub's
    assert result["gap"] <= 1e-4


def _draw(index: int, name: str, shape: tuple) -> "torch.Tensor":
    """The reference's tensor `index` of the state dict, the same on every call: matrices
    scaled by their fan-in, norm scales around 1, the position grid at unit scale."""
    values = torch.randn(shape, generator=torch.Generator().manual_seed(index))
    if name.endswith("pos_embed.pos_embed"):
        return values
    if len(shape) > 1:
        return values * float(np.prod(shape[1:])) ** -0.5
    return values * 0.2 + (1.0 if "norm" in name else 0.0)


class _Drawn:
    """A tensor drawn again when the name map asks for it (as `LazyTensor` reads a
    checkpoint's): never more than one tensor in memory beside the model."""

    def __init__(self, index: int, name: str, shape: tuple):
        self.index, self.name, self.shape = index, name, shape

    def load(self) -> np.ndarray:
        return _draw(self.index, self.name, self.shape).numpy()


def _compare(version: str) -> dict:
    import resource

    from sdanim.core.runtime import import_keras
    from sdanim.formats.sd3_files import mmdit_weights
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
    specs = [(i, name, tuple(value.shape)) for i, (name, value) in enumerate(ref.state_dict().items())]
    with torch.no_grad():
        for (i, name, shape), value in zip(specs, ref.state_dict().values()):
            value.copy_(_draw(i, name, shape))  # parameters and the position grid (a buffer)
        expected = ref(hidden_states=torch.from_numpy(latent.transpose(0, 3, 1, 2)),
                       encoder_hidden_states=torch.from_numpy(seq), pooled_projections=torch.from_numpy(pooled),
                       timestep=torch.from_numpy(t[:, 0])).sample.numpy().transpose(0, 2, 3, 1)
    parameters = sum(p.numel() for p in ref.parameters())
    grid = ref.pos_embed.pos_embed.numel()  # a buffer in diffusers, a weight in KerasHub
    del ref
    gc.collect()

    keras = import_keras()
    keras.utils.set_random_seed(0)
    backbone = sd3.build_backbone(config, SIZE, SIZE, "float32")
    state = {name: _Drawn(i, name, shape) for i, name, shape in specs}
    sd3.assign(backbone.diffuser, mmdit_weights(state, config.num_layers, config.dual_attention, config.qk_norm),
               "the reference transformer")
    model = sd3.wrap(version, backbone, SIZE, SIZE, "random", "float32")
    packed = np.zeros((2, sd3.CONTEXT_ROWS, sd3.CONTEXT_WIDTH), np.float32)
    packed[:, : sd3.SEQUENCE_TOKENS], packed[:, sd3.SEQUENCE_TOKENS, :2048] = seq, pooled
    ours = np.asarray(model.diffusion_model([latent, t, packed]))
    scale = float(np.abs(expected).max())
    return {"gap": float(np.abs(ours - expected).max()) / scale, "scale": scale, "parameters": int(parameters),
            "grid": int(grid), "mmdit_parameters": int(backbone.diffuser.count_params()),
            "backbone_parameters": int(backbone.count_params()),
            "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


if __name__ == "__main__":
    print("RESULT " + json.dumps(_compare(sys.argv[1])), flush=True)
