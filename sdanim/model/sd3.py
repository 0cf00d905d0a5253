"""Stable Diffusion 3 and 3.5 on KerasHub's pieces: the MMDiT (MMDiT-X for 3.5 medium),
CLIP-L and CLIP-G, and the 16-channel VAE. The only module that knows KerasHub's classes.

sdanim drives its own loop (KerasHub's `generate()` draws its noise itself and takes no
embeddings), so the pieces are wrapped in the call signatures the renderer already
speaks, and every floor above this one renders SD3 as it renders SD 1.x:

    text_encoder([tokens (B, 77) int32, positions (B, 77) int32]) -> (B, 155, 4096)
        rows 0-76: CLIP-L's and CLIP-G's penultimate layers side by side (768 + 1280),
        zero-padded to 4096 (T5's width); rows 77-153: zeros where T5's 77 tokens would
        be (SD3 without T5, as KerasHub and diffusers' `max_sequence_length=77` run it);
        row 154: the pooled embedding (CLIP-L's and CLIP-G's projections, 768 + 1280),
        zero-padded. One array per prompt, so keyframes interpolate, cache and travel
        to Ray workers as SD 1.x's (77, D) do: a frame's sequence and pooled embeddings
        move together.
    diffusion_model([latent (B, h, w, 16), timestep (B, 1), context (B, 155, 4096)])
        -> velocity (B, h, w, 16); timestep = sigma * 1000 (`timestep_input`).
    decoder(latent (B, h, w, 16)) -> image (B, 8h, 8w, 3) in [-1, 1]
        (the latent unscaled by 1.5305 and shifted by 0.0609 first).
    image_encoder(image in [-1, 1]) -> latent (B, H/8, W/8, 16): the posterior mean,
        shifted and scaled.

Weights: "random" (the exact architecture, seeded: offline runs and tests),
"keras-hub": KerasHub's preset (Kaggle; online users), or a diffusers folder, its names
mapped onto KerasHub's layers by `sdanim.formats.sd3_files` (T5 left out).
"""

from __future__ import annotations

import dataclasses
import os
import types
import weakref
from typing import Any, Optional

import numpy as np

from sdanim.config.choices import FLOW_SCHEDULERS, PRECISIONS, SD3_VERSIONS
from sdanim.config.errors import SdanimError, check
from sdanim.config.settings import check_image_size
from sdanim.core.runtime import import_keras, import_keras_hub
from sdanim.formats.checkpoints import CHECKPOINT_SUFFIXES, inspect_checkpoint
from sdanim.formats.lora_files import check_lora_files
from sdanim.formats.sd3_files import (
    SD3Folder, clip_weights, fit_shape, is_stability_file, ldm_vae_weights, mmdit_weights, read_sd3_file,
    read_sd3_folder, stability_mmdit_weights, transformer_layers, vae_weights,
)
from sdanim.formats.tensors import CheckpointError, read_tensors
from sdanim.model.device import choose_onednn, detect_device, device_defaults
from sdanim.model import lora
from sdanim.model.layers import BUILD_LOCK, keep_conv_kernels_in_torch_layout, use_fast_group_norms
from sdanim.model.taesd import SD3_LATENT_CHANNELS, check_taesd, load_part
from sdanim.model.stable_diffusion import ModelState
from sdanim.model.tokenizer import load_tokenizer

SEQUENCE_TOKENS = 154  # 77 CLIP tokens + 77 zero rows where T5's would be
CONTEXT_ROWS = SEQUENCE_TOKENS + 1  # + the pooled embedding's row
CONTEXT_WIDTH = 4096  # T5-XXL's width, which the MMDiT's context projection takes
LATENT_CHANNELS = 16
END_TOKEN = 49407


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    hidden_dim: int
    num_layers: int
    num_heads: int
    intermediate_dim: int
    activation: str  # "quick_gelu" (CLIP-L) or "gelu" (OpenCLIP's bigG)
    vocabulary_size: int = 49408


@dataclasses.dataclass(frozen=True)
class SD3Config:
    """One SD3-family architecture, as diffusers' and KerasHub's configs give it.

    Attributes:
        hidden_dim, num_layers, num_heads: the MMDiT's width, depth and heads.
        position_size: side of the learned position grid (the crop is centred).
        qk_norm: None or "rms_norm" (3.5).
        dual_attention: blocks with MMDiT-X's second, image-only attention (3.5 medium).
        clip_l, clip_g: the text encoders.
        vae_filters, vae_blocks: the VAE's encoder widths and blocks per level (the
            decoder mirrors them with one more block per level).
        shift: the flow-matching schedule's shift.
        steps, guidance: the defaults a run takes.
        preset: KerasHub's preset name (weights="keras-hub").
    """

    hidden_dim: int
    num_layers: int
    num_heads: int
    position_size: int
    qk_norm: Optional[str]
    dual_attention: tuple
    clip_l: ClipConfig
    clip_g: ClipConfig
    vae_filters: tuple = (128, 256, 512, 512)
    vae_blocks: int = 2
    patch_size: int = 2
    shift: float = 3.0
    steps: int = 28
    guidance: float = 7.0
    preset: str = ""
    parameters: int = 0  # the whole model's (KerasHub's preset metadata; checked in the family tier)

    @property
    def memory_gb(self) -> float:
        """Host memory one process holding the model needs: float32 variables (as every
        precision sdanim offers keeps them) and 2 GB for activations and the framework.
        Measured for sd3-medium at 128 px: 12.9 GiB peak RSS (estimate 13.1)."""
        return self.parameters * 4 / 2**30 + 2.0


CLIP_L = ClipConfig(768, 12, 12, 3072, "quick_gelu")
CLIP_G = ClipConfig(1280, 32, 20, 5120, "gelu")

# Stability's and diffusers' configs (transformer/config.json, scheduler shift 3.0), the
# run defaults from each model card (3.5 large turbo: 4 steps without guidance).
SD3_CONFIGS = {
    "sd3-medium": SD3Config(1536, 24, 24, 192, None, (), CLIP_L, CLIP_G, steps=28, guidance=7.0,
                            preset="stable_diffusion_3_medium", parameters=2_987_080_931),
    "sd3.5-medium": SD3Config(1536, 24, 24, 384, "rms_norm", tuple(range(13)), CLIP_L, CLIP_G, steps=40,
                              guidance=4.5, preset="stable_diffusion_3.5_medium", parameters=3_371_793_763),
    "sd3.5-large": SD3Config(2432, 38, 38, 192, "rms_norm", (), CLIP_L, CLIP_G, steps=28, guidance=3.5,
                             preset="stable_diffusion_3.5_large", parameters=9_048_410_595),
    "sd3.5-large-turbo": SD3Config(2432, 38, 38, 192, "rms_norm", (), CLIP_L, CLIP_G, steps=4, guidance=1.0,
                                   preset="stable_diffusion_3.5_large_turbo", parameters=9_048_410_595),
}
assert tuple(SD3_CONFIGS) == SD3_VERSIONS


def is_sd3(version: Optional[str]) -> bool:
    return version in SD3_CONFIGS


def _layers():
    """KerasHub's SD3 classes (their module paths are KerasHub's own: the VAE and MMDiT
    are not exported, the preset files name them by these classes)."""
    keras_hub = import_keras_hub()
    from keras_hub.src.models.stable_diffusion_3.mmdit import MMDiT
    from keras_hub.src.models.vae.vae_backbone import VAEBackbone

    return keras_hub.models.CLIPTextEncoder, keras_hub.models.StableDiffusion3Backbone, MMDiT, VAEBackbone


def build_backbone(config: SD3Config, height: int, width: int, dtype: Optional[str] = None):
    """KerasHub's `StableDiffusion3Backbone` of `config` for one image size, with the
    initial values Keras draws (seed them with keras.utils.set_random_seed first), its
    layers under the dtype policy `dtype` (None: Keras's global one)."""
    CLIPTextEncoder, Backbone, _, VAEBackbone = _layers()

    def clip(c: ClipConfig, name: str):
        return CLIPTextEncoder(dtype=dtype,
            vocabulary_size=c.vocabulary_size, embedding_dim=c.hidden_dim, hidden_dim=c.hidden_dim,
            num_layers=c.num_layers, num_heads=c.num_heads, intermediate_dim=c.intermediate_dim,
            intermediate_activation=c.activation, intermediate_output_index=c.num_layers - 2, name=name)

    levels = len(config.vae_filters)
    vae = VAEBackbone(
        encoder_num_filters=list(config.vae_filters), encoder_num_blocks=[config.vae_blocks] * levels,
        decoder_num_filters=list(reversed(config.vae_filters)), decoder_num_blocks=[config.vae_blocks + 1] * levels,
        sampler_method="mode", input_channels=3, sample_channels=2 * LATENT_CHANNELS, output_channels=3,
        scale=1.5305, shift=0.0609, dtype=dtype, name="vae")
    return Backbone(dtype=dtype,
        mmdit_patch_size=config.patch_size, mmdit_hidden_dim=config.hidden_dim, mmdit_num_layers=config.num_layers,
        mmdit_num_heads=config.num_heads, mmdit_position_size=config.position_size, mmdit_qk_norm=config.qk_norm,
        mmdit_dual_attention_indices=config.dual_attention or None, vae=vae, clip_l=clip(config.clip_l, "clip_l"),
        clip_g=clip(config.clip_g, "clip_g"), shift=config.shift, image_shape=(height, width, 3))


def _wrappers(backbone, height: int, width: int):
    """The backbone's pieces in sdanim's call signatures (module docstring)."""
    keras = import_keras()
    ops = keras.ops
    h, w = height // 8, width // 8
    pooled_width = backbone.clip_hidden_dim  # 2048 for every released model

    class PackText(keras.layers.Layer):
        """CLIP-L and CLIP-G on one prompt's tokens -> the packed (155, 4096) context."""

        def call(self, tokens):
            tokens = ops.cast(tokens, "int32")
            # CLIP-G pads with "!" (id 0) after the end token, CLIP-L with the end token.
            first_end = ops.argmax(ops.cast(ops.equal(tokens, END_TOKEN), "int32"), axis=-1)  # (B,)
            after = ops.arange(ops.shape(tokens)[1])[None, :] > ops.cast(first_end, "int32")[:, None]
            tokens_g = ops.where(after, ops.zeros_like(tokens), tokens)
            l_out = backbone.clip_l({"token_ids": tokens}, training=False)
            g_out = backbone.clip_g({"token_ids": tokens_g}, training=False)
            pooled = ops.concatenate([
                backbone.clip_l_projection(l_out["sequence_output"], tokens, training=False),
                backbone.clip_g_projection(g_out["sequence_output"], tokens_g, training=False),
            ], axis=-1)  # (B, 2048)
            seq = ops.concatenate([l_out["intermediate_output"], g_out["intermediate_output"]], axis=-1)
            seq = ops.cast(seq, "float32")
            seq = ops.pad(seq, [[0, 0], [0, SEQUENCE_TOKENS - ops.shape(seq)[1]], [0, CONTEXT_WIDTH - ops.shape(seq)[2]]])
            pooled = ops.pad(ops.cast(pooled, "float32"), [[0, 0], [0, CONTEXT_WIDTH - pooled_width]])
            return ops.concatenate([seq, pooled[:, None]], axis=1)  # (B, 155, 4096)

    class Velocity(keras.layers.Layer):
        """The MMDiT on sdanim's (latent, timestep, packed context)."""

        def call(self, latent, timestep, context):
            dtype = backbone.diffuser.compute_dtype
            return ops.cast(backbone.diffuser({
                "latent": ops.cast(latent, dtype),
                "context": ops.cast(context[:, :SEQUENCE_TOKENS], dtype),
                "pooled_projection": ops.cast(context[:, SEQUENCE_TOKENS, :pooled_width], dtype),
                # float32 whatever the precision: KerasHub's timestep embedding computes in
                # float32 (as diffusers' does); a bfloat16 timestep would round 987.3 to 988.
                "timestep": ops.cast(timestep, "float32"),
            }, training=False), "float32")

    class Decode(keras.layers.Layer):
        def call(self, latent):
            return ops.cast(backbone.decode_step(ops.cast(latent, backbone.vae.compute_dtype)), "float32")

    class Encode(keras.layers.Layer):
        """The posterior's mean, whatever sampler the VAE was saved with (KerasHub's presets
        may draw a sample, which would make image-to-image depend on a hidden draw)."""

        def call(self, image):
            moments = backbone.vae.encoder(ops.cast(image, backbone.vae.compute_dtype), training=False)
            mean, _ = ops.split(moments, 2, axis=-1)  # (mean, log variance), as KerasHub's sampler splits them
            return ops.cast(backbone.image_rescaling(mean), "float32")

    tokens = keras.Input((77,), dtype="int32", name="tokens")
    positions = keras.Input((77,), dtype="int32", name="positions")
    text_encoder = keras.Model([tokens, positions], PackText(name="pack_text")(tokens), name="sd3_text_encoder")

    latent = keras.Input((h, w, LATENT_CHANNELS), name="latent")
    timestep = keras.Input((1,), name="timestep")
    context = keras.Input((CONTEXT_ROWS, CONTEXT_WIDTH), name="context")
    diffusion_model = keras.Model([latent, timestep, context], Velocity(name="mmdit")(latent, timestep, context),
                                  name="sd3_diffusion_model")

    latent_in = keras.Input((h, w, LATENT_CHANNELS), name="latent")
    decoder = keras.Model(latent_in, Decode(name="vae_decode")(latent_in), name="sd3_decoder")
    image = keras.Input((height, width, 3), name="image")
    image_encoder = keras.Model(image, Encode(name="vae_encode")(image), name="sd3_image_encoder")
    return text_encoder, diffusion_model, decoder, image_encoder


def check_sampler(version: Optional[str], scheduler: str) -> None:
    """SD3 models sample their flow with `FLOW_SCHEDULERS` only, and only they do."""
    flow = scheduler in FLOW_SCHEDULERS
    if is_sd3(version):
        check(flow, f"{version} is a flow-matching model: its sampler is {' or '.join(FLOW_SCHEDULERS)}. "
                    f"Received: scheduler={scheduler!r}")
    else:
        check(not flow, f"the {scheduler} sampler is for flow-matching models (SD3: --model "
                        f"{' | '.join(SD3_VERSIONS)}); Stable Diffusion {version or '1.x/2.x'} predicts noise. "
                        f"Received: scheduler={scheduler!r}")


def timestep_input(t: float) -> np.ndarray:
    """What the MMDiT takes for step time t (sigma * 1000): t itself, (1,)."""
    return np.array([t], np.float32)


@dataclasses.dataclass(eq=False)
class SD3Model:
    """One SD3-family model, built for one image size: the sub-models in sdanim's call
    signatures (module docstring), so the renderer, frame sources and tasks treat it
    as they treat `StableDiffusionModel`.

    Attributes:
        version: str. One of `SD3_VERSIONS`.
        height, width: int. The image size the MMDiT and VAE were built for.
        weights: str. "random", "keras-hub" or a diffusers folder.
        precision: str. The Keras dtype policy the models were built under.
        backbone: KerasHub's `StableDiffusion3Backbone` (its weights are the model's).
    """

    version: str
    height: int
    width: int
    weights: str
    precision: str
    jit_compile: bool
    attention: str
    backbone: Any
    text_encoder: Any
    diffusion_model: Any
    decoder: Any
    image_encoder: Any
    loras: tuple = ()
    lora_records: list = dataclasses.field(default_factory=list)
    state: ModelState = dataclasses.field(default_factory=ModelState)
    taesd: Optional[str] = None
    _tokenizer: Any = None
    _tiny_decoder: Any = None

    family = "sd3"
    latent_channels = LATENT_CHANNELS
    context_dim = CONTEXT_WIDTH

    @property
    def tokenizer(self):
        """CLIP's BPE tokenizer (CLIP-L's and CLIP-G's vocabularies are the same)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer()
        return self._tokenizer

    @property
    def tiny_decoder(self):
        """TAESD3's decoder (`sdanim.model.taesd`), from the model's `taesd` file, loaded on
        first use: the sampler's latents -> images in [-1, 1], as `decoder`."""
        if self._tiny_decoder is None:
            self._tiny_decoder = load_part(check_taesd(self.taesd, channels=SD3_LATENT_CHANNELS), "decoder",
                                           SD3_LATENT_CHANNELS)
        return self._tiny_decoder

    def invalidate(self, *, base: bool = False, layers: bool = False) -> None:
        self.state.invalidate((self.text_encoder, self.diffusion_model, self.decoder, self.image_encoder),
                              base=base, layers=layers)

    def set_loras(self, loras) -> "SD3Model":
        """Makes `loras` the model's LoRAs (of its MMDiT and CLIPs; `sdanim.model.lora`), in place:
        the weights earlier LoRAs touched go back to their base values bit for bit, then
        these are merged in order. Every file is checked first. Returns the model."""
        lora.set_loras(self, loras)
        return self

    def describe(self) -> dict:
        return {"version": self.version, "weights": self.weights, "height": self.height, "width": self.width,
                "precision": self.precision, "jit_compile": self.jit_compile, "attention": self.attention}


def _dense_as_one_matmul(self, inputs, training=None):
    """Keras's `Dense.call` on a (..., C) input as one 2-D matmul: TensorFlow computes a 3-D
    input's product as a batched matmul, 10% slower for the MMDiT on a CPU (one call at
    batch 2, 128 px: 3.5 s -> 3.2 s, docs/benchmarks.md). The same products and sums."""
    ops = import_keras().ops
    x = ops.reshape(inputs, (-1, inputs.shape[-1]))
    y = ops.matmul(x, self.kernel)
    if self.bias is not None:
        y = ops.add(y, self.bias)
    if self.activation is not None:
        y = self.activation(y)
    return ops.reshape(y, (*ops.shape(inputs)[:-1], self.units))


def use_matmul_dense(layer) -> int:
    """Every plain `Dense` inside `layer` (the MMDiT) computed by `_dense_as_one_matmul`
    (only the instances change; weights untouched). Returns how many."""
    keras = import_keras()
    count = 0
    for sub in layer._flatten_layers(include_self=False, recursive=True):
        if type(sub) is keras.layers.Dense and sub.lora_rank is None and not sub.quantization_mode:
            object.__setattr__(sub, "call", types.MethodType(_dense_as_one_matmul, sub))
            count += 1
    return count


def wrap(version: str, backbone, height: int, width: int, weights: str, precision: str,
         jit_compile: bool = False, attention: str = "auto") -> SD3Model:
    """An `SD3Model` around a built backbone, its layers in their faster forms: under
    TensorFlow, the MMDiT's dense layers as 2-D matmuls (`use_matmul_dense`) and, on a
    CPU, the VAE's group norms reduced in two stages (`use_fast_group_norms`); under
    torch, the VAE's convolution kernels in torch's layout."""
    backend = import_keras().backend.backend()
    if backend == "tensorflow":
        use_matmul_dense(backbone.diffuser)
        if detect_device() == "cpu":
            use_fast_group_norms(backbone.vae)
    keep_conv_kernels_in_torch_layout(backbone.vae)  # torch only
    text_encoder, diffusion_model, decoder, image_encoder = _wrappers(backbone, height, width)
    return SD3Model(version, height, width, weights, precision, jit_compile, attention, backbone,
                    text_encoder, diffusion_model, decoder, image_encoder)


def assign(layer, weights: dict, what: str) -> None:
    """Sets every weight of `layer` from {weight path: array, or a function that reads
    it} (`sdanim.formats.sd3_files`); one line for a weight missing from `weights`, one
    left over, or a shape that differs. Values are read one at a time."""
    prefix = layer.name + "/"
    variables = {v.path[len(prefix):] if v.path.startswith(prefix) else v.path: v for v in layer.weights}
    missing = sorted(set(variables) - set(weights))
    extra = sorted(set(weights) - set(variables))
    check(not missing and not extra,
          f"{what} does not match the architecture: {len(missing)} weight(s) missing (e.g. {missing[:1]}), "
          f"{len(extra)} left over (e.g. {extra[:1]}). Received: {len(weights)} tensors")
    for path, variable in variables.items():
        value = weights[path]
        value = fit_shape(np.asarray(value() if callable(value) else value, np.float32), tuple(variable.shape))
        check(tuple(value.shape) == tuple(variable.shape),
              f"{what}: {path} has shape {tuple(value.shape)}, the architecture's is {tuple(variable.shape)}. "
              f"Received: {path}={tuple(value.shape)}")
        variable.assign(value.astype(variable.dtype))


# Models still held by someone, by what they were loaded with (a re-run notebook cell
# gets the same model back instead of a second copy).
_LIVE: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()


def weight_kind(weights: str) -> str:
    """"preset" (KerasHub's, "keras-cv" or "keras-hub"), "random", "diffusers" (a
    diffusers SD3 folder) or "stability" (Stability's single .safetensors); one line for
    anything else, and for SD 1.x/2.x weights."""
    if weights in ("keras-cv", "keras-hub"):
        return "preset"
    if weights == "random":
        return "random"
    if os.path.isdir(weights):
        if os.path.isfile(os.path.join(weights, "transformer", "config.json")):
            return "diffusers"
        if os.path.isdir(os.path.join(weights, "unet")) or any(f.endswith(".h5") for f in os.listdir(weights)):
            raise SdanimError(f"{weights} holds Stable Diffusion 1.x/2.x weights (a UNet), not an SD3 model: use "
                              f"--model 1.4 or 2.1 with it. Received: weights={weights!r}")
    elif os.path.isfile(weights) and weights.lower().endswith(CHECKPOINT_SUFFIXES):
        if weights.lower().endswith(".safetensors"):
            try:
                names = read_tensors(weights, "weights")
            except CheckpointError as error:
                raise SdanimError(str(error)) from None
            if is_stability_file(names):
                return "stability"
        checkpoint = inspect_checkpoint(weights)  # an SD3 file is refused here, with what to do instead
        raise SdanimError(f"{weights} holds a Stable Diffusion {checkpoint.version[0]}.x model (a UNet), not an SD3 "
                          f"model: use --model {checkpoint.version} with it. Received: weights={weights!r}")
    raise SdanimError("weights for an SD3 model must be 'keras-hub' (KerasHub's preset), 'random', a diffusers "
                      "folder (transformer/, text_encoder/, text_encoder_2/, vae/) or Stability's single "
                      f".safetensors file. Received: weights={weights!r}")


def load_sd3(version: str, weights: str = "keras-cv", height: int = 1024, width: int = 1024,
             precision: str = "auto", jit_compile: Optional[bool] = None, attention: str = "auto", seed: int = 0,
             loras=(), taesd: Optional[str] = None) -> SD3Model:
    """Builds an SD3-family model for one image size (see the module docstring).

    Args:
        version: str. One of "sd3-medium", "sd3.5-medium", "sd3.5-large",
            "sd3.5-large-turbo".
        weights: str. "keras-hub" (or "keras-cv", the default of every model spec):
            KerasHub's preset, downloaded from Kaggle by KerasHub; "random": the exact
            architecture with seeded random weights; or a diffusers folder
            (transformer/, text_encoder/, text_encoder_2/, vae/; text_encoder_3/, T5,
            is left out), or Stability's single .safetensors holding the MMDiT, CLIP-L,
            CLIP-G and the VAE (T5's tensors there are left unread); every tensor
            accounted for.
        height, width: int. Image size, multiples of 64.
        precision: str. As `load_model`; passed to KerasHub's layers as their dtype
            policy (the process's global policy is left as it is).
        jit_compile: bool or None. XLA for the sampling loop; None picks by device.
        attention: str. Recorded; KerasHub's MMDiT picks its attention kernel itself.
        seed: int. Seed of random weights.
        loras: LoRA files of the MMDiT and CLIPs (diffusers/PEFT or kohya names; see
            `sdanim.model.lora`), merged into the weights; change them later with
            `model.set_loras`.
        taesd: str or None. TAESD3 weights (a file or folder) for the tiny decoder
            (`RenderSettings(decoder="tiny")`, previews); checked before the build.
    """
    check(version in SD3_CONFIGS, f"model must be one of {', '.join(SD3_VERSIONS)}. Received: model={version!r}")
    check_image_size(height, width)
    check(precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}. Received: precision={precision!r}")
    loras = check_lora_files(loras)  # a missing or malformed LoRA fails before the build
    if taesd is not None:
        check_taesd(taesd, channels=SD3_LATENT_CHANNELS)
    weights = str(weights)
    kind, parts = check_weights(version, weights)
    choose_onednn(precision, family="sd3")
    keras = import_keras()
    default_precision, default_jit = device_defaults(detect_device(), backend=keras.backend.backend())
    precision = default_precision if precision == "auto" else precision
    jit_compile = default_jit if jit_compile is None else bool(jit_compile)
    key = (version, weights, height, width, precision, jit_compile, seed)
    alive = _LIVE.get(key)
    if alive is not None:
        if alive.loras != loras:
            alive.set_loras(loras)
        if alive.taesd != taesd:
            alive.taesd, alive._tiny_decoder = taesd, None  # loaded again on first use
        return alive
    config = SD3_CONFIGS[version]
    if kind == "preset":
        backbone = _from_preset(config, height, width, precision, weights)
    else:
        with BUILD_LOCK:
            keras.utils.set_random_seed(seed)
            backbone = build_backbone(config, height, width, precision)
        if parts is not None:
            load_diffusers(backbone, parts, config, weights)
    model = wrap(version, backbone, height, width, weights, precision, jit_compile, attention)
    model.taesd = taesd
    if loras:
        model.set_loras(loras)
    _LIVE[key] = model
    return model


def _opened(kind: str, weights: str) -> Optional[SD3Folder]:
    """The SD3 files of a "diffusers" or "stability" weight source, opened (headers only);
    None for a preset or random weights."""
    opener = {"diffusers": read_sd3_folder, "stability": read_sd3_file}.get(kind)
    return None if opener is None else opener(weights)


def check_weights(version: str, weights: str) -> tuple:
    """(weight kind, the opened SD3 files or None) for `version`: one line for SD 1.x/2.x
    weights or an SD3 file of another architecture. Headers and configs only: nothing is
    built, downloaded or read in full."""
    kind = weight_kind(weights)
    parts = _opened(kind, weights)
    if parts is not None:
        check_folder_config(parts, SD3_CONFIGS[version], version, weights)
    return kind, parts


def version_of(weights: str) -> Optional[str]:
    """The SD3-family model a diffusers folder or Stability file holds, read off its
    transformer's shape (3.5 large turbo has large's: "sd3.5-large"); None for anything
    else (SD 1.x/2.x weights, unreadable files)."""
    try:
        parts = _opened(weight_kind(weights), weights)
    except SdanimError:
        return None
    if parts is None:  # a preset or random weights: no files to read
        return None
    found = transformer_layers(parts.transformer_config)
    return next((v for v, c in SD3_CONFIGS.items()
                 if (c.num_layers, tuple(c.dual_attention), c.qk_norm) == (found[0], tuple(found[1]), found[2])), None)


def _from_preset(config: SD3Config, height: int, width: int, precision: str, weights: str):
    _, Backbone, _, _ = _layers()
    try:
        return Backbone.from_preset(config.preset, image_shape=(height, width, 3), dtype=precision)
    except Exception as error:  # KerasHub/kagglehub raise many kinds for a failed download
        reason = " ".join(str(error).split())[:160] or type(error).__name__
        raise SdanimError(f"KerasHub's {config.preset} preset could not be loaded ({reason}); it is downloaded from "
                          "Kaggle on first use (accept the model's license there and set KAGGLE_USERNAME/KAGGLE_KEY), "
                          f"or pass a diffusers folder, or --weights random for an offline run. "
                          f"Received: weights={weights!r}") from None


def check_folder_config(parts: "SD3Folder", config: SD3Config, version: str, folder: str) -> None:
    """A diffusers folder of another SD3 architecture than `version`: one line, before the build."""
    layers, dual, qk_norm = transformer_layers(parts.transformer_config)
    check((layers, tuple(dual), qk_norm) == (config.num_layers, tuple(config.dual_attention), config.qk_norm),
          f"{folder}'s transformer has {layers} layers (dual attention in {len(dual)}, qk_norm {qk_norm}), not "
          f"{version}'s {config.num_layers} (dual attention in {len(config.dual_attention)}, qk_norm "
          f"{config.qk_norm}): pass the --model it is. Received: weights={folder!r}")


def load_diffusers(backbone, parts: "SD3Folder", config: SD3Config, folder: str) -> None:
    """A diffusers SD3 folder's (or a Stability single file's: `parts.layout`)
    transformer, CLIP-L, CLIP-G and VAE into the backbone's layers, every tensor accounted
    for, one tensor read at a time."""
    layers, dual, qk_norm = transformer_layers(parts.transformer_config)
    stability = parts.layout == "stability"
    mmdit = stability_mmdit_weights if stability else mmdit_weights
    assign(backbone.diffuser, mmdit(parts.transformer, layers, tuple(dual), qk_norm, what=f"{folder}/transformer"),
           f"{folder}/transformer")
    for name, clip, clip_config, projection in (
            ("text_encoder", backbone.clip_l, config.clip_l, backbone.clip_l_projection),
            ("text_encoder_2", backbone.clip_g, config.clip_g, backbone.clip_g_projection)):
        encoder, proj = clip_weights(getattr(parts, name), clip_config.num_layers, clip.name, what=f"{folder}/{name}")
        assign(clip, encoder, f"{folder}/{name}")
        assign(projection, proj, f"{folder}/{name}")
    vae = ldm_vae_weights if stability else vae_weights
    assign(backbone.vae, vae(parts.vae, len(config.vae_filters), config.vae_blocks, what=f"{folder}/vae"),
           f"{folder}/vae")
