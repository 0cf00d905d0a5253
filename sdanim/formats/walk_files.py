"""Walk files: a .yaml/.yml/.json file -> a checked `Walk` (`sdanim.core.keyframes`
describes the fields). Parsed as data only (yaml.safe_load / json), never executed; a
keyframe's relative `control_image` paths are the walk file's folder's."""

from __future__ import annotations

import json
import os

from sdanim.config.errors import SdanimError, check
from sdanim.core.keyframes import Walk, parse_walk


def load_walk(path: str, default_seed: int = 42) -> Walk:
    """Reads a .yaml/.yml/.json walk file (data only; nothing in it is executed)."""
    ext = os.path.splitext(path)[1].lower()
    check(ext in (".yaml", ".yml", ".json"), f"walk file must be .yaml, .yml or .json. Received: file={path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as error:
        raise SdanimError(f"cannot read the walk file ({error.strerror}). Received: file={path!r}") from None
    kind = "JSON" if ext == ".json" else "YAML"
    try:
        if ext == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as error:  # json.JSONDecodeError or yaml.YAMLError
        reason = " ".join(str(error).split())[:120] or type(error).__name__
        raise SdanimError(f"the walk file is not valid {kind} ({reason}). Received: file={path!r}") from None
    return parse_walk(_resolved(data, os.path.dirname(os.path.abspath(path))), default_seed)


def _resolved(data, folder: str):
    """The walk's data with each keyframe's relative control_image paths taken relative
    to the walk file's folder."""
    if not isinstance(data, dict) or not isinstance(data.get("keyframes"), list):
        return data

    def absolute(value):
        if isinstance(value, str) and value and not os.path.isabs(value):
            return os.path.join(folder, value)
        return value

    keyframes = []
    for item in data["keyframes"]:
        if isinstance(item, dict) and "control_image" in item:
            value = item["control_image"]
            item = dict(item, control_image=[absolute(v) for v in value] if isinstance(value, list) else absolute(value))
        keyframes.append(item)
    return dict(data, keyframes=keyframes)


__all__ = ["load_walk"]
