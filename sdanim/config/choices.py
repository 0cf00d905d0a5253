"""Every option's choices, in one place: the settings check against them and the
front-ends offer them (argparse `choices=`, the UI's dropdowns)."""

VERSIONS = ("1.4", "2.1")  # KerasCV's StableDiffusion (SD 1.x) and StableDiffusionV2 (SD 2.x)
SD3_VERSIONS = ("sd3-medium", "sd3.5-medium", "sd3.5-large", "sd3.5-large-turbo")  # KerasHub's SD3 pieces
MODELS = VERSIONS + SD3_VERSIONS  # what --model takes
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
ATTENTIONS = ("auto", "fused", "keras-cv")
SCHEDULERS = ("ddim", "ddpm", "euler", "euler_trailing", "euler_a", "dpmpp_2m", "lcm", "tcd", "flow_euler")
FLOW_SCHEDULERS = ("flow_euler",)  # flow matching (SD3): the only samplers SD3 models take, and only they
BETA_SCHEDULES = ("scaled_linear", "linear")  # SD's training betas, and AnimateDiff's
LOOPS = ("auto", "program", "steps")
DECODERS = ("full", "tiny")  # the SD VAE decoder, or TAESD
ATTENTION_INTERPS = ("off", "inner", "outer", "fused")  # AID: how in-between frames attend to keyframes
PREPROCESSORS = ("none", "canny", "lineart", "shuffle", "tile", "inpaint")  # ControlNet hints made without weights

INTERPOLATIONS = ("slerp", "linear")  # between text embeddings (or image latents)
MORPH_NOISES = ("fixed", "slerp")  # a morph: one noise, or slerped between per-prompt seeds
WALK_NOISES = ("keyframes", "circle")  # a walk file's noise
PLAN_NOISES = ("fixed", "slerp", "circle")  # what a frame plan does with its noises
SPACINGS = ("linear", "uniform", "beta")
AUDIO_MODES = ("loudness", "onsets", "beats")

VIDEO_FORMATS = (".gif", ".mp4", ".webm")
FITS = ("crop", "resize")
