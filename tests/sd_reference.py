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


def use_tanh_geglu(monkeypatch) -> None:
    """Switches diffusers' GEGLU to the tanh GELU approximation that KerasCV's uses."""
    import torch.nn.functional as F
    from diffusers.models import activations

    monkeypatch.setattr(activations.GEGLU, "gelu", lambda self, gate: F.gelu(gate, approximate="tanh"))


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

    from sdanim.formats.weight_map import PARTS, spec

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


# LoRA files, written the way the community's tools write them ----------------------------

LORA_UNET = (  # attention, feed-forward, a 1x1 projection and LoCon 3x3 convolutions
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
    "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0",
    "up_blocks.2.attentions.0.transformer_blocks.0.ff.net.2",
    "mid_block.attentions.0.proj_in",
    "down_blocks.1.resnets.0.conv1",
    "up_blocks.0.resnets.1.conv2",
)
LORA_TEXT = (
    "text_model.encoder.layers.0.self_attn.q_proj",
    "text_model.encoder.layers.5.self_attn.out_proj",
    "text_model.encoder.layers.11.mlp.fc1",
)


def _lora_pair(weight, rank: int, rng, std: float):
    import torch

    out, inn = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    down = rng.normal(0, std, (rank, inn) + kernel).astype("float32")
    up = rng.normal(0, std, (out, rank) + ((1, 1) if kernel else ())).astype("float32")
    return torch.from_numpy(down), torch.from_numpy(up)


def random_lora(models: dict, style: str, seed: int, rank: int = 4, std: float = 0.15,
                unet_modules=LORA_UNET, text_modules=LORA_TEXT) -> dict:
    """A random LoRA over `models`' layers: style "kohya" (lora_unet_/lora_te_ names,
    lora_down/lora_up, alpha; LoCon for the convolutions) or "peft" (diffusers' unet./
    text_encoder. names with lora_A/lora_B, no alpha; linear layers only)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    modules = {"unet": dict(models["unet"].named_modules()), "text_encoder": dict(models["text_encoder"].named_modules())}
    state = {}
    for part, names in (("unet", unet_modules), ("text_encoder", text_modules)):
        for name in names:
            found = modules[part]
            module = found.get(name) or found[name.removeprefix("text_model.")]  # transformers 5 drops text_model.
            weight = module.weight
            if style == "peft" and weight.ndim == 4:
                continue
            down, up = _lora_pair(weight, rank, rng, std)
            if style == "kohya":
                key = ("lora_unet_" if part == "unet" else "lora_te_") + name.replace(".", "_")
                state[key + ".lora_down.weight"], state[key + ".lora_up.weight"] = down, up
                state[key + ".alpha"] = torch.tensor(float(rank) / 2)
            else:
                state[f"{part}.{name}.lora_A.weight"], state[f"{part}.{name}.lora_B.weight"] = down, up
    return state


def fused_outputs(models: dict, lora_path, scale, run) -> dict:
    """run(pipeline) with the LoRA loaded and fused by diffusers (PEFT) into a
    StableDiffusionPipeline over `models`, then taken out again. Several LoRAs (lists of
    paths and scales): each loaded as its own adapter, weighted by its scale
    (`set_adapters`) and all fused at once."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=None, unet=models["unet"],
        scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    if isinstance(lora_path, (list, tuple)):
        names = [f"adapter{i}" for i in range(len(lora_path))]
        for path, name in zip(lora_path, names):
            pipe.load_lora_weights(path, adapter_name=name)
        pipe.set_adapters(names, adapter_weights=list(scale))
        pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    else:
        pipe.load_lora_weights(lora_path, adapter_name="test")
        pipe.fuse_lora(lora_scale=scale)
    try:
        return run(pipe)
    finally:
        pipe.unfuse_lora()
        pipe.unload_lora_weights()


def lcm_latents(pipe, context, noise, step_noises, num_steps: int = 4):
    """diffusers' StableDiffusionPipeline with LCMScheduler (as LCM-LoRA's card loads it),
    guidance 1, from `context` (1, 77, D) and `noise` (1, h, w, 4); the fresh noise
    between steps is `step_noises[i]` (h, w, 4) instead of torch's generator, so the
    two implementations can be compared. Returns the final latents (1, h, w, 4)."""
    import torch
    from diffusers import LCMScheduler
    from diffusers.schedulers import scheduling_lcm

    pipe.scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    drawn = iter(step_noises)
    real = scheduling_lcm.randn_tensor
    scheduling_lcm.randn_tensor = lambda shape, **k: torch.from_numpy(next(drawn)).permute(2, 0, 1)[None].to(k.get("dtype"))
    try:
        with torch.no_grad():
            out = pipe(prompt_embeds=torch.from_numpy(context), latents=torch.from_numpy(noise).permute(0, 3, 1, 2),
                       num_inference_steps=num_steps, guidance_scale=1.0, output_type="latent").images
    finally:
        scheduling_lcm.randn_tensor = real
    return out.permute(0, 2, 3, 1).numpy()


class AidProcessor:
    """AID's attention interpolation (He et al. 2024, eqs. 5-6 and the fused outer form),
    written from the paper's equations as a diffusers attention processor
    (`unet.set_attn_processor`): the reference sdanim's `attention_interp` is held to.

    Rows of the UNet's batch: `cond_start` onwards are the conditional rows; among them,
    row r (on[r] = 1) attends with keys and values of its keyframes' rows a[r] and b[r]
    (indices within the conditional rows), mixed at t[r]. Every other row: plain attention.
    """

    def __init__(self, mode: str, cond_start: int, t, a, b, on):
        import torch

        self.mode, self.start = mode, cond_start
        self.t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)  # (R, 1, 1, 1)
        self.a, self.b = torch.as_tensor(a, dtype=torch.long), torch.as_tensor(b, dtype=torch.long)
        self.on = torch.as_tensor(on, dtype=torch.bool)

    @staticmethod
    def _attend(q, k, v, scale):
        """softmax(Q K^T * scale) V: q (R, h, T, d), k and v (R, h, S, d)."""
        import torch

        return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        import torch

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        n, tokens, _ = hidden_states.shape

        def heads(x):  # (N, T, h*d) -> (N, h, T, d)
            return x.reshape(n, x.shape[1], attn.heads, -1).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(context)), heads(attn.to_v(context))
        out = self._attend(q, k, v, attn.scale)  # plain, every row
        s = self.start
        qc, kc, vc = q[s:], k[s:], v[s:]
        ka, kb, va, vb = kc[self.a], kc[self.b], vc[self.a], vc[self.b]
        t = self.t
        if self.mode == "inner":  # eq. 5
            mixed = self._attend(qc, (1 - t) * ka + t * kb, (1 - t) * va + t * vb, attn.scale)
        elif self.mode == "outer":  # eq. 6
            mixed = (1 - t) * self._attend(qc, ka, va, attn.scale) + t * self._attend(qc, kb, vb, attn.scale)
        else:  # fused outer: the row's own keys beside each keyframe's
            mixed = ((1 - t) * self._attend(qc, torch.cat([kc, ka], 2), torch.cat([vc, va], 2), attn.scale)
                     + t * self._attend(qc, torch.cat([kc, kb], 2), torch.cat([vc, vb], 2), attn.scale))
        out = torch.cat([out[:s], torch.where(self.on.reshape(-1, 1, 1, 1), mixed, out[s:])], 0)
        out = out.transpose(1, 2).reshape(n, tokens, -1)  # (N, h, T, d) -> (N, T, h*d)
        return attn.to_out[1](attn.to_out[0](out))


def aid_unet_outputs(unet, latent, t, context, rows) -> dict:
    """diffusers' UNet on (N, h, w, 4) latents with `AidProcessor` in every attention
    layer (self and cross), per mode, and without it ("plain"): {mode: (N, h, w, 4)}.
    rows: (cond_start, t, a, b, on)."""
    import torch

    saved = unet.attn_processors
    with torch.no_grad():  # the plain UNet, for what interpolation moves
        out = {"plain": unet(torch.from_numpy(latent).permute(0, 3, 1, 2), t, torch.from_numpy(context))
               .sample.permute(0, 2, 3, 1).numpy()}
    try:
        for mode in ("inner", "outer", "fused"):
            unet.set_attn_processor(AidProcessor(mode, *rows))
            with torch.no_grad():
                sample = unet(torch.from_numpy(latent).permute(0, 3, 1, 2), t, torch.from_numpy(context)).sample
            out[mode] = sample.permute(0, 2, 3, 1).numpy()
    finally:
        unet.set_attn_processor(saved)
    return out
