"""Operating points: the (threshold, min_layer) a policy runs at, chosen on held-out documents.

A policy stops at the first layer l >= ``min_layer`` whose score reaches ``threshold``
(:func:`exit_layers`). :func:`calibrate` picks the pair on calibration documents by one of
:data:`CRITERIA`:

* ``guarantee`` (the default of training): as in CALM's Learn-then-Test (Schuster et al., 2022),
  a point is accepted only if the one-sided binomial (Clopper-Pearson) upper confidence bound
  on its rate of answers changed against full depth, over the n calibration documents, is at
  most δ (``max_changed``). Thresholds are tested from the strictest down for each
  ``min_layer`` (fixed-sequence testing), and a path stops at its first failure, so that a
  lucky aggressive threshold past a failing one is never taken. Each of the L - 1 ``min_layer``
  paths is tested at 1 - (1 - confidence) / (L - 1) (Bonferroni), so that the best of them still
  holds at ``confidence``.
* ``agreement``: at most ``tolerance`` of the calibration answers changed (empirical);
* ``accuracy``: calibration accuracy within ``tolerance`` of full depth (empirical).

With few documents no point but the most cautious passes the guarantee: the bound for 0
changes in n documents is 1 - (1 - confidence)^(1/n) (0.03 at n = 100, 95%), so δ = 0.01 at
95% needs about 300 calibration documents with no change at all (0.00994 at n = 300), and with
the Bonferroni correction over a 30-layer model's 29 paths about 640.
A document answered under several few-shot settings counts once, as changed if any of its
answers changed (its rows are not independent draws).

When no point passes, the never-exit point is written: ``min_layer`` = L, which a policy never
reaches (layer L is never consulted), so it consults nothing and every input runs to full depth,
whatever scores inputs outside the calibration set would have.

Among the accepted points, the one with the fewest layers run wins; each consultation is
charged ``check_cost`` decoder layers, so that of two points that exit alike the one that
consults from a later layer wins.

What a document answers when it exits at layer l, and what reading that answer costs beyond the
layers run, is the policy's :class:`Readout`: the lens by default (the collected choice at l,
nothing extra: the exit's head is part of the layer), the SimLens continuation for the policies
that read it (their answers at each layer, their carries in layer equivalents).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.stats import beta

CRITERIA = ("guarantee", "agreement", "accuracy")
DEFAULT_CHECK_COST = 0.05  # one consultation, in decoder layers (the target of reports/benchmark/)


def changed_upper_bound(changed: int, n: int, confidence: float = 0.95) -> float:
    """The one-sided Clopper-Pearson upper bound on the true changed rate after seeing
    ``changed`` of ``n`` calibration answers change (1.0 when n is 0)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be between 0 and 1")
    if not 0 <= changed <= n:
        raise ValueError(f"changed={changed} must be between 0 and n={n}")
    if n == 0 or changed == n:
        return 1.0
    return float(beta.ppf(confidence, changed + 1, n - changed))


def passes_guarantee(changed: int, n: int, max_changed: float, confidence: float = 0.95) -> bool:
    """Whether an operating point that changed ``changed`` of ``n`` calibration answers may be
    used under ``max_changed`` (δ) at ``confidence``."""
    return changed_upper_bound(changed, n, confidence) <= max_changed


@dataclass
class Outcome:
    """Per document, what a policy point did: its exit layer, its answer there, and the read-out's
    cost beyond the layers run (layer equivalents)."""

    exits: np.ndarray  # [N] 1-based exit layer
    answers: np.ndarray  # [N] the option answered
    extra_layers: np.ndarray  # [N]

    @property
    def layers_run(self) -> np.ndarray:
        return self.exits + self.extra_layers


@dataclass
class Readout:
    """Per document and exit layer l: the answer, and the cost of reading it beyond the layers run.

    A consultation at layer l costs ``check_cost[:, l-1]``, the exit answer at l ``exit_cost[:, l-1]``
    (layer equivalents); a document pays for every consultation from ``min_layer`` up to its exit
    (layer L is never consulted) and for its exit answer: from ``min_layer`` = L, nothing.
    """

    answers: np.ndarray  # [N, L]
    check_cost: np.ndarray  # [N, L-1]
    exit_cost: np.ndarray  # [N, L]

    @classmethod
    def lens(cls, data) -> "Readout":
        """The collected choice at each layer, nothing read beyond the layers run."""
        n, L = data.choice.shape
        return cls(data.choice, np.zeros((n, L - 1)), np.zeros((n, L)))

    @classmethod
    def carried(cls, data, checks: bool, answers: bool) -> "Readout":
        """With the SimLens continuation (:mod:`adainfer_lmeval.core.continuation`): ``answers``,
        the continuation's answer at layers 1..L-1 (a document that never stops runs to layer L
        and is read as usual), else the lens'; ``checks``, each check at layer l carries the
        speaker's check tokens (a policy reading ``continuation_margin``; its option head rows are
        not counted, as the lens margin's are not). Carries in layer equivalents: tokens x
        remaining layers over the group's computed rows' tokens; an exit answer at l < L carries
        every computed row's scored positions less what a check at l already carried
        (``reused_tokens``)."""
        readout = data.continuation
        if readout is None:
            raise ValueError("no continuation read-out: collect it (adainfer_lmeval.experiments.collect_continuation) first")
        n, L = data.choice.shape
        remaining = readout.remaining_layers(L)  # [N, L] layers a carry from layer l runs through
        if answers:
            picked = readout.choice.copy()
            picked[:, L - 1] = data.choice[:, L - 1]
            exit_tokens = readout.exit_tokens - (readout.reused_tokens if checks else 0.0)
            exit_cost = (exit_tokens / readout.row_tokens)[:, None] * remaining
        else:
            picked, exit_cost = data.choice, np.zeros((n, L))
        check_tokens = readout.check_tokens if checks else np.zeros(n)
        check_cost = (check_tokens / readout.row_tokens)[:, None] * remaining[:, : L - 1]
        return cls(picked, check_cost, exit_cost)

    @cached_property
    def _checks_through(self) -> np.ndarray:
        """[N, L]: column l, the cost of consulting layers 1..l (column 0: none)."""
        return np.concatenate([np.zeros((len(self.check_cost), 1)), np.cumsum(self.check_cost, 1)], 1)

    def outcome(self, exits: np.ndarray, min_layer: int) -> Outcome:
        rows = np.arange(len(exits))
        checked = self._checks_through
        last_check = np.minimum(exits, checked.shape[1] - 1)
        first = min(max(0, min_layer - 1), checked.shape[1] - 1)
        extra = checked[rows, last_check] - checked[:, first] + self.exit_cost[rows, exits - 1]
        return Outcome(exits, self.answers[rows, exits - 1], extra)


def exit_layers(scores: np.ndarray, threshold: float, min_layer: int) -> np.ndarray:
    """First layer l (1-based, >= min_layer, < L) with score >= threshold; L when none (a NaN
    score never stops)."""
    n, m = scores.shape  # m = L - 1
    stop = scores >= threshold
    stop[:, : max(0, min_layer - 1)] = False
    return np.where(stop.any(1), stop.argmax(1) + 1, m + 1)


def first_consulted(min_layer: int, num_layers: int, chain_start: int | None = None) -> int:
    """The first layer a policy consults: ``min_layer``, or a chain's start before it (a chain
    reads every layer from there), but a policy that can stop nowhere reads none."""
    return min_layer if chain_start is None or min_layer >= num_layers else min(chain_start, min_layer)


def evaluate(data, exits: np.ndarray, readout: Readout | None = None, min_layer: int = 1) -> dict:
    """Accuracy, agreement with full depth and layers saved of ``data`` exiting at ``exits``, read
    by ``readout`` (default: the lens) consulted from ``min_layer``: layers saved count its cost."""
    return evaluate_outcome(data, (Readout.lens(data) if readout is None else readout).outcome(exits, min_layer))


def evaluate_outcome(data, outcome: Outcome) -> dict:
    """:func:`evaluate` of what the documents of ``data`` did (``outcome``: exits, answers, read-out costs)."""
    picked, exits = outcome.answers, outcome.exits
    L = data.num_layers
    return {
        "n_docs": int(len(exits)),
        "chance_acc": float((1.0 / data.n_options).mean()),
        "full_acc": float((data.choice[:, L - 1] == data.gold).mean()),
        "policy_acc": float((picked == data.gold).mean()),
        "mean_exit_layer": float(exits.mean()),
        "layers_saved": float(1 - (exits.mean() + outcome.extra_layers.mean()) / L),
        "agreement_with_full": float((picked == data.choice[:, L - 1]).mean()),
    }


def documents_changed(doc_index: np.ndarray, changed_rows: np.ndarray) -> int:
    """How many documents (``doc_index`` per row) have at least one changed row."""
    return int((np.bincount(doc_index, weights=changed_rows.astype(np.float64)) > 0).sum())


def calibrate(data, scores: np.ndarray, tolerance: float = 0.01, n_thresholds: int = 80, criterion: str = "accuracy",
              check_cost: float = 0.0, chain_start: int | None = None, max_changed: float = 0.01,
              confidence: float = 0.95, max_threshold: float | None = None, readout: Readout | None = None) -> dict:
    """The operating point under ``criterion`` (:data:`CRITERIA`; see the module docstring) with
    the fewest layers run (with ``readout``'s cost) plus ``check_cost`` per consultation; the
    never-exit point when none passes. Answers are ``readout``'s (default: the lens).

    ``tolerance`` serves the empirical criteria, ``max_changed`` and ``confidence`` the guarantee.
    A CRF reads every layer of its chain from ``chain_start`` on whatever ``min_layer`` is, so its
    consultations are counted from there. ``max_threshold`` caps the never-exit threshold for a
    score with a ceiling (a margin's is 1). Every point records its calibration size (documents),
    how many changed and their upper bound at ``confidence``; a guarantee point also δ and
    whether it passed.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    L = data.num_layers
    final = data.choice[:, L - 1]
    full = float((final == data.gold).mean())
    _, doc_index = np.unique(np.asarray(data.keys), return_inverse=True)
    n_docs = int(doc_index.max()) + 1 if len(doc_index) else 0
    finite_scores = scores[np.isfinite(scores)]
    qs = np.unique(np.quantile(finite_scores, np.linspace(0.0, 1.0, n_thresholds))) if finite_scores.size else np.array([])
    never = float(finite_scores.max() + 1.0) if finite_scores.size else 1.0
    if max_threshold is not None:
        never = min(never, max_threshold)
    first_check = lambda m: first_consulted(m, L, chain_start)  # noqa: E731
    readout = Readout.lens(data) if readout is None else readout

    def point_at(threshold: float, min_layer: int, exits: np.ndarray) -> dict:
        outcome = readout.outcome(exits, first_check(min_layer))
        picked = outcome.answers
        return {"threshold": float(threshold), "min_layer": int(min_layer), "mean_exit_layer": float(exits.mean()),
                "continuation_layers": float(outcome.extra_layers.mean()),
                "acc": float((picked == data.gold).mean()), "changed_rate": float((picked != final).mean()),
                "calibration_changed": documents_changed(doc_index, picked != final),
                "mean_checks": float((np.minimum(exits, L - 1) - first_check(min_layer) + 1).mean())}

    def accepted(point: dict) -> bool:
        if criterion == "accuracy":
            return point["acc"] >= full - tolerance - 1e-12
        if criterion == "agreement":
            return point["changed_rate"] <= tolerance + 1e-12
        return passes_guarantee(point["calibration_changed"], n_docs, max_changed, path_confidence)

    path_confidence = 1.0 - (1.0 - confidence) / max(1, L - 1)  # Bonferroni over the min_layer paths
    cost = lambda point: point["mean_exit_layer"] + point["continuation_layers"] + check_cost * point["mean_checks"]  # noqa: E731
    best = point_at(never, L, np.full(len(scores), L))  # the never-exit point
    accepted_any = accepted(best)
    # first_from[:, m-1]: the first layer >= m whose score reaches the threshold (L if none), i.e.
    # exit_layers(scores, threshold, m) for every m at once. Thresholds run from the strictest down:
    # a guarantee path (one min_layer) ends at its first failure (fixed-sequence testing).
    path_open = np.ones(L, dtype=bool)
    candidates = []
    for threshold in qs[::-1]:
        stop = scores >= threshold
        first_from = np.full((len(scores), L), L)
        for layer in range(L - 1, 0, -1):
            first_from[:, layer - 1] = np.where(stop[:, layer - 1], layer, first_from[:, layer])
        for min_layer in range(1, L):
            if not path_open[min_layer]:
                continue
            point = point_at(threshold, min_layer, first_from[:, min_layer - 1])
            if accepted(point):
                candidates.append(point)
            elif criterion == "guarantee":
                path_open[min_layer] = False
    # the cheapest accepted point; among equals, the most accurate, then the lowest threshold
    # and min_layer (the order the empirical criteria have always broken ties in)
    for point in sorted(candidates, key=lambda p: (p["threshold"], p["min_layer"])):
        if (cost(point), -point["acc"]) < (cost(best), -best["acc"]):
            best, accepted_any = point, True
    # the bound a guarantee point was tested at: each min_layer path's corrected confidence
    bound_confidence = path_confidence if criterion == "guarantee" else confidence
    best.update(full_acc=full, check_cost=check_cost, criterion=criterion, calibration_docs=n_docs, confidence=confidence,
                changed_upper_bound=changed_upper_bound(best["calibration_changed"], n_docs, bound_confidence))
    if criterion == "guarantee":
        best.update(max_changed=max_changed, passed=bool(accepted_any), path_confidence=path_confidence)
    else:
        best["tolerance"] = tolerance
    return best


def best_static_layer(data, tolerance: float) -> dict:
    """The shallowest fixed exit layer within ``tolerance`` of full depth (a baseline)."""
    L = data.num_layers
    full = float((data.choice[:, L - 1] == data.gold).mean())
    for layer in range(1, L + 1):
        acc = float((data.choice[:, layer - 1] == data.gold).mean())
        if acc >= full - tolerance - 1e-12:
            return {"layer": layer, "acc": acc, "full_acc": full}
    return {"layer": L, "acc": full, "full_acc": full}
