"""The model floor: building and keeping the networks, and what they need to run.

Stable Diffusion (KerasCV's classes: `loading`, `layers`, `convert`, `lora`,
`stable_diffusion`, `spec`), the device and precision (`device`), compiled functions
(`compiled`), the text context's projections (`context_cache`), the tokenizer, the
weight-file registry with its pinned downloads (`registry`), and the model families
beside it: attention interpolation, the tiny decoder, the frame interpolator and the
upscaler; and Stable Diffusion 3 / 3.5 on KerasHub's pieces (`sd3`). Only this floor
imports keras_cv and keras_hub; the floors above talk to the models through their call
signatures.
"""
