"""Exit policies: given the features of the layers run so far, stop now or go on.

A policy knows nothing of transformers or lm-eval: it sees torch tensors of features
(columns named by :data:`adainfer_lmeval.features.FEATURE_NAMES`) and answers per row.
New policies (learned SVM/CRF classifiers, third-party ones) register a name with
:func:`register_policy` and become reachable as ``policy=<name>`` in model args.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import AdaInferError


@dataclass(frozen=True)
class ModelIdentity:
    """What a policy may know of the model it runs on (a trained policy checks it fits)."""

    name: str  # the short name (e.g. smollm2-135m) or the folder/hub id's last part
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int


class ExitPolicy:
    """Base class. Subclasses set ``name``, ``params`` and override :meth:`decide`.

    ``features`` lists the feature columns :meth:`decide` reads; the engine computes the exit
    head only at layers where :meth:`consults_at` is true, and only if ``features`` is not
    empty (a policy with no features, like ``static``, costs no head evaluations).
    """

    name = "base"
    #: parameter name -> (type, help); values arrive as strings or numbers from model args
    params: dict[str, tuple[type, str]] = {}
    features: tuple[str, ...] = ()
    min_layer: int = 1

    def consults_at(self, layer: int, num_layers: int) -> bool:
        return self.min_layer <= layer < num_layers

    def decide(self, layer: int, num_layers: int, history: torch.Tensor) -> torch.Tensor:
        """Bool tensor [rows]: stop after ``layer``.

        ``history`` is float [rows, layer + 1, len(features)]: the features of layers
        0..layer, NaN for layers where the policy was not consulted.
        """
        raise NotImplementedError

    def bind(self, model: ModelIdentity) -> None:
        """Called once with the model the policy will run on: refuse what cannot work there.

        A trained policy loads or checks its file here (it must fit the model's depth).
        """
        if not 1 <= self.min_layer <= model.num_layers:
            raise AdaInferError(f"min_layer={self.min_layer} is outside 1..{model.num_layers} for this model")

    def describe(self) -> dict:
        """What the results JSON records about this policy."""
        return {"name": self.name, "min_layer": self.min_layer}


_REGISTRY: dict[str, Callable[..., ExitPolicy]] = {}


def register_policy(name: str):
    """Class decorator: make ``policy=name`` build this class from model args."""

    def wrap(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def registered_policies() -> dict[str, Callable[..., ExitPolicy]]:
    return dict(_REGISTRY)


def policy_arg_names() -> set[str]:
    """Every model arg any registered policy reads (so a backend can route them)."""
    names = {"policy"}
    for cls in _REGISTRY.values():
        names.update(getattr(cls, "params", {}))
    return names


def build_policy(name: str, args: dict) -> ExitPolicy:
    """Build the policy ``name`` from model args; one-line errors for anything wrong."""
    if name not in _REGISTRY and "file" in _REGISTRY and ("/" in name or name.lower().endswith(".json")):
        return build_policy("file", {**args, "path": name})  # policy=<path to a policy file>
    if name not in _REGISTRY:
        raise AdaInferError(
            f"unknown policy {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}"
        )
    cls = _REGISTRY[name]
    accepted = getattr(cls, "params", {})
    stray = sorted(set(args) - set(accepted))
    if stray:
        raise AdaInferError(
            f"policy={name} does not take {', '.join(stray)}; it takes: "
            f"{', '.join(f'{k} ({h})' for k, (_, h) in accepted.items()) or 'no arguments'}"
        )
    converted = {}
    for key, value in args.items():
        kind, _ = accepted[key]
        converted[key] = convert_arg(key, value, kind, f"for policy={name}")
    return cls(**converted)


def convert_arg(key: str, value, kind: type, where: str = ""):
    """``value`` (a string, or what lm-eval's arg parser made of it) as ``kind``, without coercion.

    ``int`` takes only whole numbers (``1.5`` and ``True`` are refused, ``int()`` would give 1);
    ``float`` takes only finite numbers (a NaN threshold compares false with everything).
    """
    where = f" {where}" if where else ""
    bad = AdaInferError(f"{key}={value!r} is not a valid {kind.__name__}{where}")
    if kind is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            if value.is_integer():
                return int(value)
            raise AdaInferError(f"{key}={value!r} is not a whole number{where}")
        text = str(value).strip()
        if text.lstrip("+-").isdigit():
            return int(text)
        try:
            number = float(text)
        except ValueError:
            raise bad from None
        if number.is_integer():
            return int(number)
        raise AdaInferError(f"{key}={value!r} is not a whole number{where}")
    if kind is float:
        if isinstance(value, bool):
            raise bad
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if not math.isfinite(number):
            raise AdaInferError(f"{key}={value!r} must be a finite number{where}")
        return number
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise bad from None


# ---- policies that need no training ------------------------------------------------------


@register_policy("full")
class FullDepth(ExitPolicy):
    """Never exit: the full-depth baseline, through the same engine."""

    def consults_at(self, layer: int, num_layers: int) -> bool:
        return False

    def decide(self, layer, num_layers, history):  # never called
        raise AssertionError("full-depth policy is never consulted")

    def describe(self) -> dict:
        return {"name": self.name}


@register_policy("static")
class StaticLayer(ExitPolicy):
    """Always stop after layer ``layer``: the logit lens at a fixed depth."""

    params = {"layer": (int, "exit layer, 1..num_layers")}

    def __init__(self, layer: int | None = None):
        if layer is None:
            raise AdaInferError("policy=static needs layer=K (1..num_layers), e.g. policy=static,layer=12")
        if layer < 1:
            raise AdaInferError(f"layer={layer} must be >= 1 (layer 0 is the embeddings)")
        self.layer = layer
        self.min_layer = layer

    def consults_at(self, layer: int, num_layers: int) -> bool:
        return layer == self.layer and layer < num_layers

    def bind(self, model: ModelIdentity) -> None:
        if not 1 <= self.layer <= model.num_layers:
            raise AdaInferError(f"layer={self.layer} is outside 1..{model.num_layers} for this model")

    def decide(self, layer, num_layers, history):
        return torch.ones(history.shape[0], dtype=torch.bool, device=history.device)

    def describe(self) -> dict:
        return {"name": self.name, "layer": self.layer}


@register_policy("threshold")
class ConfidenceThreshold(ExitPolicy):
    """Stop at the first layer (>= min_layer) whose gap, or top prob, reaches the threshold."""

    params = {
        "gap": (float, "stop when p1 - p2 >= gap"),
        "top_prob": (float, "stop when p1 >= top_prob"),
        "min_layer": (int, "first layer that may exit (default 1)"),
    }

    def __init__(self, gap: float | None = None, top_prob: float | None = None, min_layer: int = 1):
        if (gap is None) == (top_prob is None):
            raise AdaInferError("policy=threshold needs exactly one of gap=τ or top_prob=τ, e.g. policy=threshold,gap=0.8")
        threshold = gap if gap is not None else top_prob
        if not 0.0 <= threshold <= 1.0:
            raise AdaInferError(f"threshold {threshold} is outside 0..1 (it compares probabilities)")
        if min_layer < 1:
            raise AdaInferError(f"min_layer={min_layer} must be >= 1 (layer 0 is the embeddings)")
        self.feature = "gap" if gap is not None else "p1"
        self.features = (self.feature,)
        self.threshold = float(threshold)
        self.min_layer = int(min_layer)

    def decide(self, layer, num_layers, history):
        return history[:, layer, 0] >= self.threshold

    def describe(self) -> dict:
        key = "gap" if self.feature == "gap" else "top_prob"
        return {"name": self.name, key: self.threshold, "min_layer": self.min_layer}

