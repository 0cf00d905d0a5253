"""The app's one model and what visitors may ask of it.

Two modes (`Access`): a local app (bound to 127.0.0.1) takes weights and LoRA paths typed
in its Model section, as the person at the keyboard owns the machine; an app reachable
from the network (`--listen`, `--share`) offers only the weights, LoRAs, ControlNets and
motion modules the operator named at start, by name, and no endpoint accepts a path. Server-side `Limits`
(`sdanim.config.limits`) bound every request whatever the widgets allow.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import threading
from typing import Optional

from sdanim.config.errors import SdanimError, check
from sdanim.config.limits import Limits
from sdanim.formats.checkpoints import inspect_checkpoint
from sdanim.formats.controlnet_files import inspect_controlnet
from sdanim.formats.lora_files import Lora, as_loras, check_lora_files, read_lora
from sdanim.formats.motion_files import inspect_motion_module
from sdanim.model.loading import weight_source_kind
from sdanim.model.spec import ModelSpec


def check_disk(limits: Limits, folder: str) -> None:
    """No new render once the output folder holds `limits.max_output_gb`."""
    limit = limits.max_output_gb
    if limit is None or math.isinf(limit):
        return
    used = sum(os.path.getsize(os.path.join(root, f)) for root, _, names in os.walk(folder) for f in names
               if os.path.isfile(os.path.join(root, f)))
    check(used < limit * 2**30,
          f"the app's output folder holds {used / 2**30:.1f} GB, its limit (the operator's --max-output-gb); "
          f"no new render starts until it is cleared. Received: output folder={folder!r}")


@dataclasses.dataclass(frozen=True)
class Access:
    """What visitors may choose.

    Args:
        network: bool. Reachable from the network: choose among `weights`, `loras` and
            `controlnets` by name only. False: a local app, paths typed in.
        weights: {name: weight source} offered (network mode).
        loras: {name: LoRA file} offered (network mode).
        controlnets: {name: ControlNet file or folder} offered (network mode).
        motion_modules: {name: motion module file or folder} offered (network mode).
    """

    network: bool = False
    weights: dict = dataclasses.field(default_factory=dict)
    loras: dict = dataclasses.field(default_factory=dict)
    controlnets: dict = dataclasses.field(default_factory=dict)
    motion_modules: dict = dataclasses.field(default_factory=dict)

    def _offered(self, chosen: str, offer: dict, what: str, parameter: str) -> str:
        """What a request names: in network mode a file the operator offered, by name
        (nothing typed is opened); locally the path typed."""
        chosen = str(chosen or "").strip()
        if not self.network:
            return chosen
        check(chosen in offer, f"choose {what} from the list this app offers ({', '.join(offer) or 'none'}). "
                               f"Received: {parameter}={chosen!r}")
        return offer[chosen]

    def motion_module(self, chosen: str) -> str:
        """The motion modules a request names (locally a path, or "random")."""
        return self._offered(chosen, self.motion_modules, "motion modules", "motion_module")

    def controlnet(self, chosen: str) -> str:
        """The ControlNet weights a request names."""
        return self._offered(chosen, self.controlnets, "a ControlNet", "controlnet")


def offered_models(spec: Optional[ModelSpec], models_dir: Optional[str] = None, controlnets=(),
                   motion_modules=()) -> Access:
    """The network mode's offer: the weights, LoRAs, ControlNets and motion modules named at
    start, and the files in `models_dir` recognised by their headers (a checkpoint, a
    ControlNet, motion modules or a LoRA; anything else is left out), listed by name.
    Nothing a visitor types is ever opened."""
    weights, loras, nets, motions = {}, {}, {}, {}
    for path in controlnets:
        nets[os.path.basename(os.fspath(path).rstrip("/"))] = os.fspath(path)
    for path in motion_modules:
        inspect_motion_module(os.fspath(path))  # the operator's file: one line if it is not motion modules
        motions[os.path.basename(os.fspath(path).rstrip("/"))] = os.fspath(path)
    if spec is not None:
        weights[os.path.basename(spec.weights.rstrip("/")) or spec.weights] = spec.weights
        for lora in spec.loras:
            loras[os.path.basename(lora.path)] = lora.path
    if models_dir is not None:
        check(os.path.isdir(models_dir), f"models_dir must be a folder. Received: models_dir={models_dir!r}")
        for name in sorted(os.listdir(models_dir)):
            path = os.path.join(models_dir, name)
            try:
                inspect_controlnet(path)
                nets.setdefault(name, path)
                continue
            except SdanimError:
                pass
            try:
                inspect_motion_module(path)
                motions.setdefault(name, path)
                continue
            except SdanimError:
                pass
            if weight_source_kind(path) == "checkpoint":
                try:
                    inspect_checkpoint(path)
                    weights.setdefault(name, path)
                    continue
                except SdanimError:
                    pass
            if os.path.isfile(path):
                try:
                    read_lora(path)
                    loras.setdefault(name, path)
                except SdanimError:
                    pass
    return Access(network=True, weights=weights, loras=loras, controlnets=nets, motion_modules=motions)


class ModelHolder:
    """One model for the app, reused; another is loaded (and the old one dropped) only
    for another image size, with a message. A model handed in without a spec is the only one."""

    def __init__(self, model=None, spec: Optional[ModelSpec] = None, access: Optional[Access] = None):
        if spec is None and model is not None and hasattr(model, "weights") and hasattr(model, "version"):
            spec = ModelSpec(version=model.version, weights=model.weights, precision=model.precision,
                             loras=tuple(getattr(model, "loras", ())))
        self.model = model
        self.spec = spec if (spec is not None or model is not None) else ModelSpec()
        self.access = access or Access()
        self.lock = threading.Lock()

    def get(self, settings, notify=print):
        with self.lock:
            if self.model is not None and (self.model.height, self.model.width) == (settings.height, settings.width):
                return self.model
            check(self.spec is not None,
                  f"this app's model is built for {self.model.width}x{self.model.height}; choose that size. "
                  f"Received: size={settings.width}x{settings.height}")
            notify(f"Loading the model for {settings.width}x{settings.height} (about a minute on a GPU, "
                   "more on a CPU); it is kept for the next renders.")
            self.model = None
            gc.collect()
            self.model = self.spec.load(settings.height, settings.width)
            return self.model

    def _wanted(self, weights: str, loras) -> tuple:
        """(weight source, LoRAs) a request asks for, checked before anything changes."""
        if self.access.network:
            check(weights in self.access.weights,
                  f"choose weights from the list this app offers ({', '.join(self.access.weights) or 'none'}). "
                  f"Received: weights={weights!r}")
            names = [x for x in (loras if isinstance(loras, (list, tuple)) else [loras]) if x]
            unknown = [x for x in names if x not in self.access.loras]
            check(not unknown, f"choose LoRAs from the list this app offers ({', '.join(self.access.loras) or 'none'}). "
                               f"Received: loras={unknown!r}")
            return self.access.weights[weights], tuple(Lora(self.access.loras[x]) for x in names)
        check(weight_source_kind(weights) in ("keras-cv", "random") or os.path.exists(weights),
              "weights must be keras-cv, random, a folder of .h5 files or a checkpoint that exists. "
              f"Received: weights={weights!r}")  # here, not a minute into the next render
        return weights, check_lora_files(as_loras([x.strip() for x in str(loras or "").split(",") if x.strip()]))

    def use(self, weights: str, loras) -> str:
        """Switches the weight source and/or LoRAs (local: a path and comma-separated
        FILE[:SCALE]; network: names from the offer). Checked first; LoRAs alone change
        in place (no rebuild), new weights load at the next render."""
        weights = str(weights or "").strip()
        check(self.spec is not None,
              "this app was started with a model object of its own; start it with --weights "
              f"(or launch(spec=...)) to switch weights. Received: weights={weights!r}")
        if not self.access.network:
            weights = weights or self.spec.weights
        source, wanted = self._wanted(weights, loras)
        with self.lock:
            if source == self.spec.weights:
                self.spec = dataclasses.replace(self.spec, loras=wanted)
                if self.model is not None and self.model.loras != wanted:
                    self.model.set_loras(wanted)
                return f"Using {weights} with {len(wanted)} LoRA(s); the loaded model was changed in place."
            self.spec = dataclasses.replace(self.spec, weights=source, version=None, loras=wanted)
            self.model = None
            gc.collect()
            return f"Using {weights} with {len(wanted)} LoRA(s): the model loads at the next render."
