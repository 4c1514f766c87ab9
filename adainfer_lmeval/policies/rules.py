"""Policies that need no training: full depth, a static exit layer, a confidence threshold, an
answer-option margin, and the answer-option margin read off the SimLens continuation.

The static layer, the threshold and the margin read a stopping row's answer through the lens by
default; ``readout=continuation`` reads it off the SimLens continuation instead (the cheap check
decides, the carry answers: the study's ``simlens_static`` and ``margin_simlens``).
``carry=filled`` (with a continuation) carries the positions read attending to the whole prompt,
its keys and values projected from the exit layer's states, instead of with token 0 alone."""

from __future__ import annotations

import torch

from adainfer_lmeval.core.exit_policy import CONTINUATION_CARRIES, EXIT_READOUTS, ExitPolicy, ModelIdentity
from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.policies.registry import register_policy


CARRY_PARAM = {"carry": (str, "how a continuation carries the positions it reads: simlens (default; with token 0 alone) or "
                              "filled (attending to the whole prompt, its keys and values projected from the exit layer's "
                              "states)")}
READOUT_PARAM = {"readout": (str, "where a stopping row's answer is read: lens (default; the exit layer's states through the "
                                  "final norm and head) or continuation (SimLens: its positions carried on to the last layer)"),
                 **CARRY_PARAM}


class ReadoutChoice:
    """A rule whose exit answer can be read through the lens or off the continuation (``readout``),
    carried as ``carry`` says."""

    def _set_readout(self, readout: str, carry: str = "simlens") -> None:
        if readout not in EXIT_READOUTS:
            raise AdaInferError(f"readout={readout!r} for policy={self.name}: choose one of {', '.join(EXIT_READOUTS)}")
        if carry not in CONTINUATION_CARRIES:
            raise AdaInferError(f"carry={carry!r} for policy={self.name}: choose one of {', '.join(CONTINUATION_CARRIES)}")
        if carry != "simlens" and readout == "lens":
            raise AdaInferError(f"carry={carry} for policy={self.name} carries a continuation, which readout=lens does not read; "
                                "add readout=continuation")
        self.exit_readout, self.continuation_carry = readout, carry

    def _described(self, described: dict) -> dict:
        """``described`` with the read-out and carry when they are not the defaults (older results stay as they were)."""
        if self.exit_readout != "lens":
            described = {**described, "exit_readout": self.exit_readout}
        if self.continuation_carry != "simlens":
            described = {**described, "continuation_carry": self.continuation_carry}
        return described


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
class StaticLayer(ReadoutChoice, ExitPolicy):
    """Always stop after layer ``layer``: the logit lens at a fixed depth (plain layer pruning)."""

    params = {"layer": (int, "exit layer, 1..num_layers"), **READOUT_PARAM}

    def __init__(self, layer: int | None = None, readout: str = "lens", carry: str = "simlens"):
        if layer is None:
            raise AdaInferError("policy=static needs layer=K (1..num_layers), e.g. policy=static,layer=12")
        if layer < 1:
            raise AdaInferError(f"layer={layer} must be >= 1 (layer 0 is the embeddings)")
        self.layer = layer
        self.min_layer = layer
        self._set_readout(readout, carry)

    def consults_at(self, layer: int, num_layers: int) -> bool:
        return layer == self.layer and layer < num_layers

    def bind(self, model: ModelIdentity) -> None:
        if not 1 <= self.layer <= model.num_layers:
            raise AdaInferError(f"layer={self.layer} is outside 1..{model.num_layers} for this model")

    def decide(self, layer, num_layers, history):
        return torch.ones(history.shape[0], dtype=torch.bool, device=history.device)

    def describe(self) -> dict:
        return self._described({"name": self.name, "layer": self.layer})


@register_policy("threshold")
class ConfidenceThreshold(ReadoutChoice, ExitPolicy):
    """Stop at the first layer (>= min_layer) whose gap, or top prob, reaches the threshold."""

    params = {
        "gap": (float, "stop when p1 - p2 >= gap"),
        "top_prob": (float, "stop when p1 >= top_prob"),
        "min_layer": (int, "first layer that may exit (default 1)"),
        **READOUT_PARAM,
    }

    def __init__(self, gap: float | None = None, top_prob: float | None = None, min_layer: int = 1, readout: str = "lens",
                 carry: str = "simlens"):
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
        self._set_readout(readout, carry)

    def decide(self, layer, num_layers, history):
        return history[:, layer, 0] >= self.threshold

    def describe(self) -> dict:
        key = "gap" if self.feature == "gap" else "top_prob"
        return self._described({"name": self.name, key: self.threshold, "min_layer": self.min_layer})


@register_policy("margin")
class OptionMargin(ReadoutChoice, ExitPolicy):
    """Stop at the first layer (>= min_layer) where the answer options' margin reaches τ.

    The margin is the top minus the second probability of a softmax over the group's options'
    logits at the position where they first differ (:mod:`adainfer_lmeval.core.options`): one
    head row per option, no vocabulary. Loglikelihood only; a group with one option never stops.
    """

    params = {
        "margin": (float, "stop when the options' top probability minus the second's >= margin"),
        "min_layer": (int, "first layer that may exit (default 1)"),
        **READOUT_PARAM,
    }
    features = ("margin",)

    def __init__(self, margin: float | None = None, min_layer: int = 1, readout: str = "lens", carry: str = "simlens"):
        if margin is None:
            raise AdaInferError("policy=margin needs margin=τ (0..1), e.g. policy=margin,margin=0.6,min_layer=8")
        if not 0.0 <= margin <= 1.0:
            raise AdaInferError(f"margin={margin} is outside 0..1 (it compares option probabilities)")
        if min_layer < 1:
            raise AdaInferError(f"min_layer={min_layer} must be >= 1 (layer 0 is the embeddings)")
        self.margin = float(margin)
        self.min_layer = int(min_layer)
        self._set_readout(readout, carry)

    def decide(self, layer, num_layers, history):
        return history[:, layer, 0] >= self.margin  # NaN (fewer than two options) never stops

    def describe(self) -> dict:
        return self._described({"name": self.name, "margin": self.margin, "min_layer": self.min_layer})


@register_policy("simlens")
class ContinuationMargin(OptionMargin):
    """Stop at the first layer (>= min_layer) where the options' margin read off the continuation
    reaches τ, and read the answer off the continuation too (SimLens, Ma et al., 2025).

    At a consulted layer the group's speaker, its token 0 and positions decision..margin, is
    carried through the remaining layers alone (:mod:`adainfer_lmeval.core.continuation`); the
    margin is that of ``policy=margin``, at the carried margin position. A stopping group's rows
    carry their scored positions the same way, and their log-likelihoods come from those last-layer
    states. Loglikelihood only; a group with one option never stops. ``carry=filled`` carries the
    check's positions and the exit's attending to the whole prompt instead (both: the margin is
    read where the answer will be).
    """

    params = {
        "margin": (float, "stop when the continuation's top option probability minus the second's >= margin (default 0.9)"),
        "min_layer": (int, "first layer that may exit (default 1)"),
        **CARRY_PARAM,
    }
    features = ("continuation_margin",)
    exit_readout = "continuation"  # always (training reads it off the class, as the engine off the instance)

    def __init__(self, margin: float = 0.9, min_layer: int = 1, carry: str = "simlens"):
        super().__init__(margin, min_layer, readout="continuation", carry=carry)
