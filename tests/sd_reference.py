"""Reference Stable Diffusion parts from diffusers/transformers, with random weights.

Used by the checkpoint tests and the checkpoint benchmark: the SD 1.x and 2.x
configurations of the published models, every parameter random (norm scales and
biases too, so a swapped gamma/beta or a missing bias cannot hide), written out as a
diffusers folder and as an original-layout (CompVis) single file.
"""

from __future__ import annotations

import os


def unet_config(version: str) -> dict:
    v2 = version == "2.1"
    return dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024 if v2 else 768,
        attention_head_dim=(5, 10, 20, 20) if v2 else 8,
        use_linear_projection=v2,
    )


VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)


def text_config(version: str):
    from transformers import CLIPTextConfig

    if version == "2.1":
        return CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                              num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
                              projection_dim=1024)
    return CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                          projection_dim=768)


def randomize(module, seed: int) -> None:
    """Default init for weights; random norm scales and biases (all of them non-trivial)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embedding" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))


def build(version: str, parts=("text_encoder", "unet", "vae"), seed: int = 0) -> dict:
    """{"text_encoder": CLIPTextModel, "unet": UNet2DConditionModel, "vae": AutoencoderKL}."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    out = {}
    if "text_encoder" in parts:
        out["text_encoder"] = CLIPTextModel(text_config(version))
    if "unet" in parts:
        out["unet"] = UNet2DConditionModel(**unet_config(version))
    if "vae" in parts:
        out["vae"] = AutoencoderKL(**VAE_CONFIG)
    for i, module in enumerate(out.values()):
        randomize(module, seed * 10 + i)
        module.eval()
    return out


def diffusers_state(models: dict) -> dict:
    """{"unet.conv_in.weight": tensor, ...}: the names sdanim reads from a diffusers folder."""
    return {f"{part}.{k}": v for part, m in models.items() for k, v in m.state_dict().items()}


def to_original(state: dict, version: str) -> dict:
    """The same tensors under original (CompVis) names, per sdanim's map; the tests check
    this against diffusers' own single-file conversion."""
    import torch

    from sdanim.weight_map import PARTS, spec

    out = {}
    fused: dict = {}
    for part in PARTS:
        for leaf in spec(part, version):
            d, o = leaf["diffusers"], leaf["original"]
            d_base = next(b for b in d.bases if d.keys(b)[0] in state)
            for dk, ok in zip(d.keys(d_base), o.keys(o.bases[0])):
                if o.rows is not None:
                    fused.setdefault(ok, [None] * 3)[o.rows] = state[dk]
                else:
                    out[ok] = state[dk]
    for key, thirds in fused.items():
        out[key] = torch.cat(thirds, dim=0)
    return out


def save_diffusers_folder(models: dict, folder: str) -> None:
    for part, module in models.items():
        module.save_pretrained(os.path.join(folder, part))


def save_safetensors(state: dict, path: str, dtype=None) -> None:
    """Writes `state` with the safetensors package (optionally cast: float16, bfloat16)."""
    from safetensors.torch import save_file

    tensors = {}
    for k, v in state.items():
        t = v.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[k] = t.contiguous()
    save_file(tensors, path)
