"""Collected traces as training data: per document and layer, the signals, the answers, the labels.

:func:`load_data` reads a collection (:mod:`adainfer_lmeval.experiments.collect`) into a
:class:`Data`: the collected features (:data:`~adainfer_lmeval.core.features.FEATURE_NAMES`)
and the answer-option signals (:data:`OPTION_SIGNALS`: margin, option_change, option_kl),
computed from the collected option logits by the core's own signal functions
(:mod:`adainfer_lmeval.core.features`), so that a signal read offline is the one the engine
computes online.

Labels (per document and layer l = 1..L-1; layer L is never a decision), :func:`make_labels`:

* ``gold`` (paper v1): layer l is a stop point when its prediction is the gold answer;
* ``final`` (paper v3): when its prediction equals the full-depth prediction.

"Prediction" is ``option`` (the answer option with the highest summed loglikelihood at that
layer, what lm-eval's ``acc`` scores if the request exits there), ``token`` (the
full-vocabulary top-1 token at the decision position; target: the gold option's first token,
or the full-depth top-1 token), or ``both``.

A collection's SimLens continuation read-out (:mod:`.collect_continuation`), where it was
collected, comes with it as :class:`ContinuationReadout` (:func:`with_continuation`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from adainfer_lmeval.core.features import (FEATURE_NAMES, SIGNALS, SignalInputs, compute_signals, continuation_signals,
                                           option_signals)
from adainfer_lmeval.core.options import option_margin, option_probs
from adainfer_lmeval.errors import AdaInferError

#: the core's signals over the answer options, derived from the collected option logits
OPTION_SIGNALS = tuple(option_signals(tuple(SIGNALS)))
#: the core's signals read off the SimLens continuation, from the continuation read-out
CONTINUATION_SIGNALS = tuple(continuation_signals(tuple(SIGNALS)))
LABEL_MODES = ("gold", "final")
PREDICTIONS = ("option", "token", "both")


@dataclass
class ContinuationReadout:
    """Per document: what the SimLens continuation from each layer reads, answers and costs."""

    margin: np.ndarray  # [N, L] the continuation_margin signal (the options' margin at the continuation's last layer)
    choice: np.ndarray  # [N, L] the continuation's answer (argmax of its options' summed loglikelihoods)
    check_tokens: np.ndarray  # [N] tokens one check carries per remaining layer
    exit_tokens: np.ndarray  # [N] tokens the exit answer carries per remaining layer (every computed row)
    reused_tokens: np.ndarray  # [N] of those, what a simlens check at the exit layer already carried
    row_tokens: np.ndarray  # [N] the group's computed rows' tokens: one layer over the document
    # [N, L] the layers a carry from layer l runs through; None: every remaining one, L - l (a
    # read-out that skips to the model's last layers runs fewer)
    carry_layers: np.ndarray | None = None

    def remaining_layers(self, num_layers: int) -> np.ndarray:
        """[N, L]: the layers a carry from layer l = 1..L runs through."""
        if self.carry_layers is not None:
            return self.carry_layers.astype(np.float64)
        return np.broadcast_to((num_layers - np.arange(1, num_layers + 1)).astype(np.float64), (len(self.margin), num_layers))

    def subset(self, idx) -> "ContinuationReadout":
        return ContinuationReadout(*(None if getattr(self, f.name) is None else getattr(self, f.name)[idx]
                                     for f in fields(self)))

    @classmethod
    def concat(cls, readouts: list["ContinuationReadout"]) -> "ContinuationReadout":
        def joined(name):
            parts = [getattr(r, name) for r in readouts]
            if all(p is None for p in parts):
                return None
            if any(p is None for p in parts):  # some carry through every remaining layer, some not
                parts = [r.remaining_layers(r.margin.shape[1]) for r in readouts]
            return np.concatenate(parts)

        return cls(*(joined(f.name) for f in fields(cls)))


@dataclass
class Data:
    feats: np.ndarray  # [N, L, F] layers 1..L, columns named by feature_names
    top1: np.ndarray  # [N, L]
    choice: np.ndarray  # [N, L]
    gold: np.ndarray  # [N]
    gold_token: np.ndarray  # [N] first token of the gold option
    keys: list[str]  # task:doc_id (a document's folds ignore shots)
    source: list[str]
    shots: np.ndarray
    n_options: np.ndarray
    meta: dict
    feature_names: tuple[str, ...] = field(default=FEATURE_NAMES)
    continuation: ContinuationReadout | None = None  # where the continuation read-out was collected

    @property
    def num_layers(self) -> int:
        return self.feats.shape[1]

    def columns(self, names) -> list[int]:
        """The feature columns of the signals ``names``; one line naming what is not there."""
        missing = [name for name in names if name not in self.feature_names]
        if missing:
            raise AdaInferError(f"the training data has no signal {', '.join(missing)}; it has {', '.join(self.feature_names)}")
        return [self.feature_names.index(name) for name in names]

    def subset(self, idx) -> "Data":
        idx = np.asarray(idx)
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return replace(self, feats=self.feats[idx], top1=self.top1[idx], choice=self.choice[idx], gold=self.gold[idx],
                       gold_token=self.gold_token[idx], keys=pick(self.keys), source=pick(self.source),
                       shots=self.shots[idx], n_options=self.n_options[idx],
                       continuation=None if self.continuation is None else self.continuation.subset(idx))

    @classmethod
    def concat(cls, datas: list["Data"]) -> "Data":
        """One Data of several of the same model and signals (the first one's metadata), with the
        continuation read-out where every one has it."""
        first = datas[0]
        if len({d.num_layers for d in datas}) != 1:
            raise AdaInferError("cannot pool collections of models with different depths")
        if len({d.feature_names for d in datas}) != 1:
            raise AdaInferError("cannot pool collections with different signals")
        cat = lambda name: np.concatenate([getattr(d, name) for d in datas])  # noqa: E731
        return replace(first, feats=cat("feats"), top1=cat("top1"), choice=cat("choice"), gold=cat("gold"),
                       gold_token=cat("gold_token"), keys=[k for d in datas for k in d.keys],
                       source=[s for d in datas for s in d.source], shots=cat("shots"), n_options=cat("n_options"),
                       continuation=(None if any(d.continuation is None for d in datas)
                                     else ContinuationReadout.concat([d.continuation for d in datas])))


def _padded_option_logits(option_logits: list[list[list[float]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, L, K] logits (K: the most options) and [N, K] which options are real."""
    n = len(option_logits)
    layers = len(option_logits[0]) if n else 0
    width = max((len(per_layer[0]) for per_layer in option_logits), default=1)
    logits = torch.zeros(n, layers, width)
    valid = torch.zeros(n, width, dtype=torch.bool)
    for i, per_layer in enumerate(option_logits):
        if len(per_layer) != layers:
            raise AdaInferError(f"example {i} has option logits for {len(per_layer)} layers, the first {layers}")
        logits[i, :, : len(per_layer[0])] = torch.tensor(per_layer, dtype=torch.float32)
        valid[i, : len(per_layer[0])] = True
    return logits, valid


def option_signal_columns(option_logits: list[list[list[float]]]) -> np.ndarray:
    """[N, L, len(OPTION_SIGNALS)] from, per example and layer, the options' logits at the margin
    position, computed by the engine's own signal functions one layer at a time.

    The change signals compare layer l with layer l - 1 (NaN at layer 1): the engine's "previous
    consulted layer" whenever the policy consults every layer from its first decision's
    predecessor on (:class:`~adainfer_lmeval.policies.learned.base.LearnedPolicy` does)."""
    logits, valid = _padded_option_logits(option_logits)
    n, layers, width = logits.shape
    out = torch.empty(n, layers, len(OPTION_SIGNALS), dtype=torch.float64)
    previous = torch.zeros(n, width)
    for layer in range(1, layers + 1):
        inputs = SignalInputs(layer, layers, n, torch.device("cpu"), option_logits=logits[:, layer - 1], option_valid=valid,
                              previous_option_probs=previous, has_previous_options=torch.full((n,), layer > 1))
        out[:, layer - 1] = compute_signals(OPTION_SIGNALS, inputs).double()
        previous = inputs.option_probs
    return out.numpy()


def load_data(path: Path) -> Data:
    """A collection as training data, with the collected features and :data:`OPTION_SIGNALS`."""
    from adainfer_lmeval.experiments.collect import read_collection

    meta, cols = read_collection(path)
    if list(meta.get("feature_names", [])) != list(FEATURE_NAMES):
        raise AdaInferError(f"{path}: features {meta.get('feature_names')} differ from {list(FEATURE_NAMES)}")
    feats = np.concatenate([np.array(cols["features"], dtype=np.float64), option_signal_columns(cols["option_logits"])], -1)
    return Data(
        feats=feats, top1=np.array(cols["top1"]), choice=np.array(cols["option_choice"]),
        gold=np.array(cols["gold"]), gold_token=np.array([o[g] for o, g in zip(cols["option_first_token"], cols["gold"])]),
        keys=[f"{t}:{d}" for t, d in zip(cols["task"], cols["doc_id"])], source=list(cols["source"]),
        shots=np.array(cols["num_fewshot"]), n_options=np.array(cols["n_options"]), meta=meta,
        feature_names=FEATURE_NAMES + OPTION_SIGNALS,
    )


def continuation_readout(cols: dict) -> ContinuationReadout:
    """The read-out of a continuation file's columns (:func:`.collect_continuation.read_continuation`):
    the margin by the core's own option functions, as the ``continuation_margin`` signal computes it."""
    logits, valid = _padded_option_logits(cols["continuation_option_logits"])
    margin = torch.stack([option_margin(option_probs(logits[:, layer], valid), valid) for layer in range(logits.shape[1])], 1)
    choice = np.array([[max(range(len(ll)), key=ll.__getitem__) for ll in per_layer]
                       for per_layer in cols["continuation_option_ll"]])
    tokens = {name: np.array(cols[name], dtype=np.float64)
              for name in ("check_tokens", "exit_tokens", "reused_tokens", "row_tokens")}
    return ContinuationReadout(margin.double().numpy(), choice, **tokens)


def with_continuation(data: Data, collection: Path) -> Data:
    """``data`` (loaded from ``collection``) with the continuation read-out beside it."""
    from adainfer_lmeval.experiments.collect_continuation import continuation_path, read_continuation

    keys = [(key.rsplit(":", 1)[0], int(key.rsplit(":", 1)[1]), int(shots)) for key, shots in zip(data.keys, data.shots)]
    cols = read_continuation(continuation_path(collection), data.meta, keys)
    return replace(data, continuation=continuation_readout(cols))


def with_continuation_signals(data: Data) -> Data:
    """``data`` (with its continuation read-out) with :data:`CONTINUATION_SIGNALS` as feature
    columns too, so that a classifier or a rule can read them like any other signal."""
    if data.continuation is None:
        raise AdaInferError("the training data has no continuation read-out (adainfer_lmeval.experiments.collect_continuation)")
    recorded = {"continuation_margin": data.continuation.margin}  # [N, L] per signal (a new one adds its column here)
    return replace(data, feats=np.concatenate([data.feats, *(recorded[name][:, :, None] for name in CONTINUATION_SIGNALS)], -1),
                   feature_names=data.feature_names + CONTINUATION_SIGNALS)


def make_labels(data: Data, mode: str, prediction: str) -> np.ndarray:
    """Bool [N, L-1]: is layer l (1..L-1) a stop point."""
    L = data.num_layers
    if mode not in LABEL_MODES or prediction not in PREDICTIONS:
        raise AdaInferError(f"label mode must be one of {LABEL_MODES} and prediction one of {PREDICTIONS}")
    target_option = data.gold if mode == "gold" else data.choice[:, L - 1]
    target_token = data.gold_token if mode == "gold" else data.top1[:, L - 1]
    by_option = data.choice[:, : L - 1] == target_option[:, None]
    by_token = data.top1[:, : L - 1] == target_token[:, None]
    return {"option": by_option, "token": by_token, "both": by_option & by_token}[prediction]


def fold_of(keys: list[str], k: int, seed: int = 0) -> np.ndarray:
    """Fold 0..k-1 of each document, from a hash of its key (all shots of a doc together)."""
    return np.array([int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16) % k for key in keys])


def layer_features(data: Data, cols: list[int]) -> np.ndarray:
    """The features a classifier reads: layers 1..L-1 (layer L is never a decision), columns ``cols``."""
    return data.feats[:, : data.num_layers - 1, :][:, :, cols]
