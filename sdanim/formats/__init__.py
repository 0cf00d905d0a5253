"""File formats, read without running code: weight files (`tensors`), Stable Diffusion
checkpoints (`checkpoints`) and their name tables onto KerasCV's layers (`weight_map`),
LoRA files (`lora_files`)."""
