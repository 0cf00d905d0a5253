"""Keyframes: what a walk passes through, from Python, the CLI, or a walk file's data
(the file itself is read by `sdanim.formats.walk_files`).

A keyframe is a prompt (or a weighted mix of prompts), a seed, the number of frames to
the next keyframe, and the easing of that transition. A walk file is YAML or JSON,
parsed as data only (yaml.safe_load / json), never executed:

    loop: true                 # optional: walk back to the first keyframe
    interpolation: slerp       # optional: slerp | linear
    attention: fused           # optional: off | inner | outer | fused (AID, see
                               #   sdanim.model.attention_interp); default off
    attention_warmup: 0.5      # optional: fraction of the steps that interpolate
    noise: keyframes           # optional: keyframes (each keyframe's seed, slerped)
                               #   or circle (a seamless loop in noise space around
                               #   the prompts, from the first seed and seed + 1)
    keyframes:
      - prompt: a red barn at dawn
        seed: 1
        frames: 24
        easing: ease-in-out    # optional, default linear
      - prompt: {a rabbit: 0.5, a frog: 0.5}
        seed: 2
        frames: 24
        guide: a cartoon animal    # optional (PAID): the in-betweens to the next keyframe
                                   #   take this prompt's embedding instead of the blend
        negative: blurry, text     # optional: this keyframe's negative prompt (or mix),
                                   #   interpolated between keyframes as the prompts are;
                                   #   a keyframe without one takes the run's negative prompt
        control_image: edges.png   # optional, with --controlnet: this keyframe's picture
        control_scale: 0.8         #   and scale (one, or a list: one per net), blended
                                   #   and interpolated between keyframes
      - prompt: a snowy forest
        seed: 3
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import numpy as np

from sdanim.config.errors import check
from sdanim.config.choices import ATTENTION_INTERPS, INTERPOLATIONS, WALK_NOISES
from sdanim.core.interpolation import check_easing, path_positions
from sdanim.core.noise import check_seed

Prompt = Union[str, tuple]  # "text" or (("text", weight), ...)


def normalize_prompt(prompt, field: str = "prompt") -> Prompt:
    """A prompt as "text" or a tuple of (text, weight) pairs with a non-zero sum."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict):
        prompt = list(prompt.items())
    ok = isinstance(prompt, (list, tuple)) and len(prompt) >= 1 and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str)
        and isinstance(p[1], (int, float)) and not isinstance(p[1], bool)
        for p in prompt
    )
    check(ok, f"{field} must be a string or a mapping of prompt to weight. Received: {field}={prompt!r}")
    pairs = tuple((str(text), float(weight)) for text, weight in prompt)
    total = sum(w for _, w in pairs)
    check(abs(total) > 1e-8, f"{field} weights must not sum to zero. Received: {field}={dict(pairs)!r}")
    return pairs


def parse_prompt_text(text: str, field: str = "prompt") -> Prompt:
    """The command line's mix syntax: "a rabbit:0.5 | a frog:0.5" -> (("a rabbit", 0.5),
    ("a frog", 0.5)). Text without "|" is a plain prompt; a part without ":weight"
    weighs 1."""
    if "|" not in text:
        return text
    pairs = []
    for part in text.split("|"):
        body, sep, weight = part.rpartition(":")
        try:
            pair = (body.strip(), float(weight)) if sep else (part.strip(), 1.0)
        except ValueError:
            pair = (part.strip(), 1.0)
        check(pair[0] != "", f"{field} has an empty part in a '|' mix. Received: {field}={text!r}")
        pairs.append(pair)
    return normalize_prompt(pairs, field)


def prompt_texts(prompt: Prompt) -> list:
    return [prompt] if isinstance(prompt, str) else [text for text, _ in prompt]


def mix_embeddings(prompt: Prompt, embed) -> np.ndarray:
    """The (77, D) embedding of a prompt or weighted mix: sum_i w_i e_i / sum_i w_i.

    `embed(texts) -> (N, 77, D)` encodes plain prompts.
    """
    if isinstance(prompt, str):
        return embed([prompt])[0]
    texts = [t for t, _ in prompt]
    weights = np.array([w for _, w in prompt], dtype=np.float64)
    embeddings = embed(texts).astype(np.float64)  # (N, 77, D)
    mixed = np.tensordot(weights / weights.sum(), embeddings, axes=1)  # (77, D)
    return mixed.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Keyframe:
    """One stop of a walk.

    Args:
        prompt: str or mix. The text, or (text, weight) pairs to blend.
        seed: int. Noise seed of this keyframe.
        frames: int. Frames from this keyframe to the next (ignored on the last
            keyframe unless the walk loops). Defaults to 24.
        easing: str. Easing of the transition to the next keyframe. Defaults to
            "linear".
        guide: str, mix or None. PAID's guide prompt for the transition to the next
            keyframe: its in-between frames take this embedding instead of the blend
            of the two keyframes'. Defaults to None.
        control_image: tuple of str or None. The ControlNets' pictures at this keyframe
            (one for every net, or one per net), blended between keyframes. Defaults to None.
        control_scale: tuple of float or None. The nets' scales at this keyframe (one, or
            one per net), interpolated between keyframes. Defaults to None.
        negative: str, mix or None. This keyframe's negative prompt: under guidance each
            frame's negative embedding is interpolated between its keyframes' as its
            prompt embedding is. None: the run's negative prompt. Defaults to None.
    """

    prompt: Prompt
    seed: int
    frames: int = 24
    easing: str = "linear"
    guide: Optional[Prompt] = None
    control_image: Optional[tuple] = None
    control_scale: Optional[tuple] = None
    negative: Optional[Prompt] = None

    def record(self) -> dict:
        record = {"prompt": _prompt_record(self.prompt), "seed": self.seed, "frames": self.frames, "easing": self.easing}
        if self.guide is not None:  # recorded only when set: walks without one read as before
            record["guide"] = _prompt_record(self.guide)
        if self.negative is not None:  # as the guide: only when set
            record["negative"] = _prompt_record(self.negative)
        for name in ("control_image", "control_scale"):
            value = getattr(self, name)
            if value is not None:
                record[name] = value[0] if len(value) == 1 else list(value)
        return record

    def control(self, name: str, net: int):
        """This keyframe's `control_image` or `control_scale` for ControlNet `net` (one
        value serves every net), or None."""
        value = getattr(self, name)
        if value is None:
            return None
        return value[0] if len(value) == 1 else (value[net] if net < len(value) else None)


def _prompt_record(prompt):
    return prompt if isinstance(prompt, str) else [list(p) for p in prompt]


def _control_values(where: str, name: str, value, kind):
    """A keyframe's control_image / control_scale as a tuple (one value or one per net)."""
    if value is None:
        return None
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if kind is str:
        ok = values and all(isinstance(v, str) and v for v in values)
        check(ok, f"{where}.{name} must be an image path or a list of them (one per ControlNet). Received: {value!r}")
        return tuple(values)
    ok = values and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in values)
    check(ok, f"{where}.{name} must be a number >= 0 or a list of them (one per ControlNet). Received: {value!r}")
    return tuple(float(v) for v in values)


def make_keyframe(index: int, prompt, seed, frames=24, easing="linear", guide=None, control_image=None,
                  control_scale=None, negative=None) -> Keyframe:
    """A validated keyframe; errors name the field as keyframes[index].field."""
    where = f"keyframes[{index}]"
    check(prompt is not None, f"{where} has no prompt. Received: prompt=None")
    prompt = normalize_prompt(prompt, f"{where}.prompt")
    seed = check_seed(seed, f"{where}.seed")
    check(
        isinstance(frames, int) and not isinstance(frames, bool) and frames >= 1,
        f"{where}.frames must be a whole number >= 1. Received: frames={frames!r}",
    )
    check_easing(easing, f"{where}.easing")
    if guide is not None:
        guide = normalize_prompt(guide, f"{where}.guide")
    if negative is not None:
        negative = normalize_prompt(negative, f"{where}.negative")
    return Keyframe(prompt, seed, frames, easing, guide, _control_values(where, "control_image", control_image, str),
                    _control_values(where, "control_scale", control_scale, float), negative)


@dataclasses.dataclass(frozen=True)
class Walk:
    """Keyframes plus how to move between them."""

    keyframes: tuple
    loop: bool = False
    interpolation: str = "slerp"
    noise: str = "keyframes"
    attention: str = "off"
    attention_warmup: float = 0.5

    def __post_init__(self):
        check(
            self.noise in WALK_NOISES,
            f"noise must be one of {', '.join(WALK_NOISES)}. Received: noise={self.noise!r}",
        )
        check(self.noise != "circle" or self.loop, "a circle noise walk must loop. Received: loop=False")
        need = 1 if self.loop else 2
        check(
            len(self.keyframes) >= need,
            f"a walk needs at least 2 keyframes (1 with loop). Received: {len(self.keyframes)} keyframes",
        )
        check(
            self.interpolation in INTERPOLATIONS,
            f"interpolation must be one of {', '.join(INTERPOLATIONS)}. Received: interpolation={self.interpolation!r}",
        )
        check(self.attention in ATTENTION_INTERPS,
              f"attention_interp must be one of {', '.join(ATTENTION_INTERPS)}. Received: attention_interp={self.attention!r}")
        warmup = self.attention_warmup
        check(isinstance(warmup, (int, float)) and not isinstance(warmup, bool) and 0.0 <= warmup <= 1.0,
              f"attention_warmup must be a fraction of the steps in [0, 1]. Received: attention_warmup={warmup!r}")
        check(self.attention == "off" or self.noise != "circle",
              "attention interpolation blends keyframes' attention; a circle noise walk has one prompt and no keyframe "
              f"noises to blend. Received: attention_interp={self.attention!r}, noise='circle'")
        guided = [i for i, k in enumerate(self.keyframes) if k.guide is not None]
        check(not guided or len(self.keyframes) >= 2,
              "a guide prompt guides the frames between two keyframes; this walk has one. "
              f"Received: keyframes[{guided[0] if guided else 0}].guide")

    @property
    def stops(self) -> list:
        """The keyframes in path order; a loop walks back to the first."""
        ks = list(self.keyframes)
        return ks + [ks[0]] if self.loop else ks

    @property
    def intervals(self) -> list:
        """Frames per transition, in path order."""
        return [k.frames for k in self.stops[:-1]]

    @property
    def easings(self) -> list:
        return [k.easing for k in self.stops[:-1]]

    def positions(self, eased: bool = True) -> np.ndarray:
        """Each frame's position along the path; a loop leaves out the final return
        frame, which would repeat frame 0."""
        easings = self.easings if eased else ["linear"] * len(self.intervals)
        return path_positions(self.intervals, easings, include_end=not self.loop)

    def __len__(self) -> int:
        return len(self.positions())

    def record(self) -> dict:
        record = {
            "keyframes": [k.record() for k in self.keyframes],
            "loop": self.loop,
            "interpolation": self.interpolation,
            "noise": self.noise,
        }
        if self.attention != "off":  # recorded only when used: walks without it read as before
            record["attention"] = self.attention
            record["attention_warmup"] = float(self.attention_warmup)
        return record

    def control_stops(self, nets: int) -> tuple:
        """(images, scales): per ControlNet, each stop's `control_image` (None where the
        stop gives none; None for a net no stop gives one) and `control_scale` (None
        where no stop gives one; 1 for a stop without)."""
        images, scales = [], []
        for net in range(nets):
            stop_images = [k.control("control_image", net) for k in self.stops]
            images.append(stop_images if any(i is not None for i in stop_images) else None)
            stop_scales = [k.control("control_scale", net) for k in self.stops]
            scales.append([1.0 if v is None else v for v in stop_scales] if any(v is not None for v in stop_scales)
                          else None)
        return images, scales

    def noise_seeds(self) -> tuple:
        """The seeds noise is drawn from: one per stop, or the circle's two basis seeds."""
        if self.noise == "circle":
            first = self.keyframes[0].seed
            return (first, first + 1)
        return tuple(k.seed for k in self.stops)


def circle_walk(prompt, seed: int, frames: int) -> Walk:
    """A seamless loop of `frames` frames in noise space around one prompt."""
    check(
        isinstance(frames, int) and frames >= 2,
        f"frames must be at least 2. Received: frames={frames}",
    )
    return Walk((make_keyframe(0, prompt, seed, frames),), loop=True, noise="circle")


def walk_from_prompts(
    prompts: Sequence, seeds: Sequence[int], intervals: Sequence[int], easing: str = "linear",
    loop: bool = False, interpolation: str = "slerp", attention: str = "off", attention_warmup: float = 0.5,
    guide=None,
) -> Walk:
    """A walk through `prompts` with intervals[k] frames from prompt k to k + 1 (`guide`,
    if given, guides every transition)."""
    counts = list(intervals) + [1] * (len(prompts) - len(intervals))
    keyframes = tuple(make_keyframe(i, p, s, n, easing, guide if i < len(intervals) else None)
                      for i, (p, s, n) in enumerate(zip(prompts, seeds, counts)))
    return Walk(keyframes, loop, interpolation, attention=attention, attention_warmup=attention_warmup)


_FILE_KEYS = {"keyframes", "loop", "interpolation", "noise", "attention", "attention_warmup"}
_KEYFRAME_KEYS = {"prompt", "seed", "frames", "easing", "guide", "control_image", "control_scale", "negative"}


def parse_walk(data, default_seed: int = 42) -> Walk:
    """A `Walk` from parsed walk-file data (see the module docstring)."""
    check(isinstance(data, dict), f"a walk file must hold a mapping with 'keyframes'. Received: {type(data).__name__}")
    unknown = sorted(set(data) - _FILE_KEYS)
    check(not unknown, f"unknown walk-file field(s): {', '.join(map(str, unknown))}. Received: {unknown}")
    raw = data.get("keyframes")
    check(isinstance(raw, list), f"keyframes must be a list. Received: keyframes={raw!r}")
    loop = data.get("loop", False)
    check(isinstance(loop, bool), f"loop must be true or false. Received: loop={loop!r}")
    keyframes = []
    for i, item in enumerate(raw):
        check(isinstance(item, dict), f"keyframes[{i}] must be a mapping. Received: {item!r}")
        unknown = sorted(set(item) - _KEYFRAME_KEYS)
        check(not unknown, f"keyframes[{i}] has unknown field(s): {', '.join(map(str, unknown))}. Received: {unknown}")
        keyframes.append(make_keyframe(
            i, item.get("prompt"), item.get("seed", default_seed + i), item.get("frames", 24), item.get("easing", "linear"),
            item.get("guide"), item.get("control_image"), item.get("control_scale"), item.get("negative"),
        ))
    return Walk(tuple(keyframes), loop, data.get("interpolation", "slerp"), data.get("noise", "keyframes"),
                data.get("attention", "off"), data.get("attention_warmup", 0.5))
