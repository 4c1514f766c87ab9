"""Calibrated answer-option margins: kind ``margin``, run as the ``policy=margin`` rule, and kind
``simlens``, run as the ``policy=simlens`` rule (the margin read off the SimLens continuation,
the answer too).

The rules (:class:`~adainfer_lmeval.policies.rules.OptionMargin`,
:class:`~adainfer_lmeval.policies.rules.ContinuationMargin`) need no training; a file holds only
the operating point training chose for its rule (τ, ``min_layer``, under the guarantee of
:mod:`adainfer_lmeval.experiments.calibration`) and where that came from. Loaded with
``policy=file,path=...`` (or ``policy=<path>``), it is the rule ``policy=margin,margin=τ,min_layer=m``
(or ``policy=simlens,...``) checked against the model it was calibrated on.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from adainfer_lmeval.core.exit_policy import CONTINUATION_CARRIES
from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.policies import files as pf
from adainfer_lmeval.policies.learned.base import LearnedKind, LearnedPolicy, read_policy, register_kind
from adainfer_lmeval.policies.rules import ContinuationMargin, OptionMargin


class RuleFile:
    """A rule-kind policy file as its rule at the file's operating point (mixed in before the rule)."""

    params = LearnedPolicy.params
    file_kind = ""

    def __init__(self, path: str, threshold: float | None = None, min_layer: int | None = None):
        _, meta = read_policy(path)  # reached through policy=file, which found this kind in it
        super().__init__(margin=meta["threshold"] if threshold is None else threshold,
                         min_layer=meta["min_layer"] if min_layer is None else min_layer, **self.rule_args(meta))
        self.meta, self.source = meta, str(path)

    @staticmethod
    def rule_args(meta: dict) -> dict:
        """The rule's arguments the file holds besides its operating point."""
        return {}

    def bind(self, model) -> None:
        pf.check_fits(self.meta, model, self.source)
        super().bind(model)

    def describe(self) -> dict:
        return {**super().describe(), "kind": self.file_kind, "file": self.source,
                "trained_for": self.meta["model"]["name"],
                "data_sha256": (self.meta.get("training") or {}).get("data_sha256")}


class MarginFile(RuleFile, OptionMargin):
    """A ``kind: margin`` policy file as the ``policy=margin`` rule at the file's operating point."""

    file_kind = "margin"


class SimLensFile(RuleFile, ContinuationMargin):
    """A ``kind: simlens`` policy file as the ``policy=simlens`` rule at the file's operating point."""

    file_kind = "simlens"

    @staticmethod
    def rule_args(meta: dict) -> dict:
        # files trained on the filled read-out (train --carry filled) run with carry=filled;
        # older files have no such field and carry as SimLens
        return {"carry": meta.get("continuation_carry", "simlens")}


@register_kind("margin", policy=MarginFile)
class MarginKind(LearnedKind):
    """The answer-option margin as its own score: nothing to fit but the operating point."""

    score_meaning = "answer-option margin (top minus second option probability)"
    scaled = False
    fits_parameters = False
    #: the margin is a difference of probabilities: a threshold above 1 is never reached
    max_threshold = 1.0

    def to_dict(self) -> dict:
        return {}

    @classmethod
    def check_dict(cls, path: Path, meta: dict) -> None:
        reads = list(cls.policy.features)
        if meta["features"] != reads:
            raise AdaInferError(f"{path}: corrupt policy file (a {cls.kind} policy reads \"features\": {json.dumps(reads)})")
        if not 0 <= meta["threshold"] <= cls.max_threshold:
            raise AdaInferError(f"{path}: corrupt policy file (a {cls.kind} threshold is between 0 and 1)")

    @classmethod
    def from_dict(cls, meta: dict, path: Path | None = None) -> "MarginKind":
        return cls()

    def fit(self, X, y, **options) -> "MarginKind":
        return self

    def step(self, state, x: torch.Tensor):
        return None, x[:, 0].to(torch.float64)


@register_kind("simlens", policy=SimLensFile)
class SimLensKind(MarginKind):
    """The option margin read off the SimLens continuation as its own score; the answer is read there too."""

    score_meaning = "answer-option margin at the continuation's last layer (top minus second option probability)"

    @classmethod
    def check_dict(cls, path: Path, meta: dict) -> None:
        super().check_dict(path, meta)
        if meta.get("continuation_carry", "simlens") not in CONTINUATION_CARRIES:
            raise AdaInferError(f"{path}: corrupt policy file (\"continuation_carry\" is one of {', '.join(CONTINUATION_CARRIES)})")
