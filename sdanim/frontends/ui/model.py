"""The app's one model and what visitors may ask of it.

Two modes (`Access`): a local app (bound to 127.0.0.1) takes a model choice (SD 1.x/2.x or
SD3-family, or "auto") and weights and LoRA paths typed in its Model section, as the person
at the keyboard owns the machine; an app reachable from the network (`--listen`, `--share`)
offers only the weights (each with the model it loads as), LoRAs, ControlNets and motion
modules the operator named at start, by name, and no endpoint accepts a path. Server-side `Limits`
(`sdanim.config.limits`) bound every request whatever the widgets allow.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import threading
from typing import Optional

from sdanim.config.choices import MODELS
from sdanim.config.errors import SdanimError, check
from sdanim.config.limits import Limits
from sdanim.formats.checkpoints import inspect_checkpoint
from sdanim.formats.controlnet_files import inspect_controlnet
from sdanim.formats.lora_files import Lora, as_loras, check_lora_files, read_lora
from sdanim.formats.motion_files import inspect_motion_module
from sdanim.model.loading import weight_source_kind
from sdanim.model.sd3 import is_sd3, version_of
from sdanim.model.spec import ModelSpec

AUTO = "auto"  # the model choice that reads the family off the weights


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
        models: {weights name: the model they load as} (network mode; None: read off the
            weights, as `ModelSpec(version=None)` does). The operator's, never a visitor's.
        loras: {name: LoRA file} offered (network mode).
        controlnets: {name: ControlNet file or folder} offered (network mode).
        motion_modules: {name: motion module file or folder} offered (network mode).
    """

    network: bool = False
    weights: dict = dataclasses.field(default_factory=dict)
    models: dict = dataclasses.field(default_factory=dict)
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
    start, and the files in `models_dir` recognised by their headers (an SD 1.x/2.x
    checkpoint, an SD3-family file or diffusers folder, a ControlNet, motion modules or a
    LoRA; anything else is left out), listed by name, each weight source with the model
    it loads as. Nothing a visitor types is ever opened."""
    weights, models, loras, nets, motions = {}, {}, {}, {}, {}
    for path in controlnets:
        nets[os.path.basename(os.fspath(path).rstrip("/"))] = os.fspath(path)
    for path in motion_modules:
        inspect_motion_module(os.fspath(path))  # the operator's file: one line if it is not motion modules
        motions[os.path.basename(os.fspath(path).rstrip("/"))] = os.fspath(path)
    if spec is not None:
        name = os.path.basename(spec.weights.rstrip("/")) or spec.weights
        weights[name], models[name] = spec.weights, spec.version
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
            held = version_of(path)  # an SD3-family file or diffusers folder
            if held is not None:
                if name not in weights:
                    weights[name], models[name] = path, held
                continue
            if weight_source_kind(path) == "checkpoint":
                try:
                    inspect_checkpoint(path)
                    if name not in weights:
                        weights[name], models[name] = path, None
                    continue
                except SdanimError:
                    pass
            if os.path.isfile(path):
                try:
                    read_lora(path)
                    loras.setdefault(name, path)
                except SdanimError:
                    pass
    return Access(network=True, weights=weights, models=models, loras=loras, controlnets=nets,
                  motion_modules=motions)


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
        check(weights in ("keras-cv", "keras-hub", "random") or os.path.exists(weights),
              "weights must be keras-cv (keras-hub), random, a folder of .h5 files, a checkpoint or an SD3 file or "
              "folder that exists. "
              f"Received: weights={weights!r}")  # here, not a minute into the next render
        return weights, check_lora_files(as_loras([x.strip() for x in str(loras or "").split(",") if x.strip()]))

    def _model(self, weights: str, source: str, model: Optional[str]) -> Optional[str]:
        """The model (version) a request's weights load as: in network mode the operator's
        offer decides; locally the model chosen, or with "auto" the one the weights hold
        (an SD3-family file or folder), else None (SD 1.x/2.x, read off the weights)."""
        model = str(model or AUTO).strip()
        if self.access.network:
            offered = self.access.models.get(weights)
            check(model in (AUTO, offered or AUTO),
                  f"this app loads {weights} as the model {offered or AUTO} (the operator's choice). "
                  f"Received: model={model!r}")
            return offered
        if model == AUTO:
            return version_of(source)
        check(model in MODELS, f"model must be {AUTO} or one of {', '.join(MODELS)}. Received: model={model!r}")
        return model

    def use(self, weights: str, loras, model: Optional[str] = AUTO) -> str:
        """Switches the model, weight source and/or LoRAs (local: a model name or "auto",
        a path and comma-separated FILE[:SCALE]; network: names from the offer, the model
        coming with the weights). Checked first, the weights against the model from their
        headers; LoRAs alone change in place (no rebuild), a new model or weights load at
        the next render."""
        weights = str(weights or "").strip()
        check(self.spec is not None,
              "this app was started with a model object of its own; start it with --weights "
              f"(or launch(spec=...)) to switch weights. Received: weights={weights!r}")
        if not self.access.network:
            weights = weights or self.spec.weights
        source, wanted = self._wanted(weights, loras)
        version = self._model(weights, source, model)
        same = (source, version) == (self.spec.weights, self.spec.version)
        if not same:  # another model or weights: do they fit each other? (headers only)
            dataclasses.replace(self.spec, weights=source, version=version, loras=()).check_weights()
        label = f" as {version}" if version else ""
        with self.lock:
            if same:
                self.spec = dataclasses.replace(self.spec, loras=wanted)
                if self.model is not None and self.model.loras != wanted:
                    self.model.set_loras(wanted)
                return f"Using {weights} with {len(wanted)} LoRA(s); the loaded model was changed in place."
            self.spec = dataclasses.replace(self.spec, weights=source, version=version, loras=wanted)
            self.model = None
            gc.collect()
            return f"Using {weights}{label} with {len(wanted)} LoRA(s): the model loads at the next render."

    @property
    def family(self) -> str:
        """"sd3" or "sd" (SD 1.x/2.x): what the samplers offered start at."""
        version = getattr(self.spec, "version", None) or getattr(self.model, "version", None)
        return "sd3" if is_sd3(version) else "sd"
