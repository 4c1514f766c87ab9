"""Exit signals: named per-layer features a policy reads, registered one function each.

A signal is a function of one check's :class:`SignalInputs` that returns one float per row,
registered under its name with what it reads::

    @signal("gap", reads="vocab")
    def gap(inputs):
        top2 = inputs.top2_probs
        return top2[:, 0] - top2[:, 1]

``reads`` tells the exit check what to compute for it, and nothing is computed that no asked-for
signal reads: ``vocab`` the exit logits at the decision position (the full head, or K rows with
``check_vocab``), ``options`` the answer options' logits at the margin position (K head rows, see
:mod:`.options`), ``continuation`` the same K logits read off the SimLens continuation (the
group's speaker carried from this layer to the last, :mod:`.continuation`), ``hidden`` this
layer's and the previous layer's decision states, ``layer`` nothing but the layer. Intermediates several signals share (the log-partition, the top two
probabilities, the options' softmax) are computed once per check, on first use.

The paper's features are the top probability p1 and the gap p1 - p2 of the softmax over the
vocabulary; entropy, the cosine similarity of consecutive hidden states and the relative depth
are the extra ones its ablation weighs (:data:`FEATURE_NAMES`, the columns of collected traces
and of policy files). The option signals: ``margin`` (top minus second option probability),
``option_change`` (1.0 where the options' argmax moved since the previous consulted layer) and
``option_kl`` (KL from the previous consulted layer's option distribution to this one's). The
continuation signal: ``continuation_margin`` (the ``margin`` of the options' logits at the last
layer of the continuation instead of at this layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch

from adainfer_lmeval.core.options import option_change, option_kl, option_margin, option_probs
from adainfer_lmeval.errors import AdaInferError

FEATURE_NAMES = ("p1", "gap", "entropy", "cosine", "depth")
READS = ("vocab", "options", "continuation", "hidden", "layer")


@dataclass(frozen=True)
class Signal:
    name: str
    reads: str  # one of READS
    compute: Callable[["SignalInputs"], torch.Tensor]


SIGNALS: dict[str, Signal] = {}


def signal(name: str, reads: str):
    """Function decorator: register ``fn(inputs) -> [rows]`` as the signal ``name``."""
    if reads not in READS:
        raise ValueError(f"signal {name!r} reads {reads!r}; choose one of {', '.join(READS)}")

    def wrap(fn):
        SIGNALS[name] = Signal(name, reads, fn)
        return fn

    return wrap


def signal_reads(names: tuple[str, ...]) -> set[str]:
    """What the signals ``names`` read (see the module docstring); one line for an unknown name."""
    unknown = [name for name in names if name not in SIGNALS]
    if unknown:
        raise AdaInferError(f"unknown exit signal(s) {', '.join(unknown)}; known: {', '.join(SIGNALS)}")
    return {SIGNALS[name].reads for name in names}


def option_signals(names: tuple[str, ...]) -> list[str]:
    """Those of ``names`` that read the answer options."""
    return _reading(names, "options")


def continuation_signals(names: tuple[str, ...]) -> list[str]:
    """Those of ``names`` that read the continuation (they need the answer options too)."""
    return _reading(names, "continuation")


def _reading(names: tuple[str, ...], reads: str) -> list[str]:
    return [name for name in names if name in SIGNALS and SIGNALS[name].reads == reads]


@dataclass
class SignalInputs:
    """What one check hands its signals, for ``rows`` decision makers; None where no signal asked."""

    layer: int
    num_layers: int
    rows: int
    device: torch.device
    logits: torch.Tensor | None = None  # [rows, V or K] exit logits at the decision position
    hidden: torch.Tensor | None = None  # [rows, d] this layer's decision states
    previous_hidden: torch.Tensor | None = None  # [rows, d] the layer before's (None at layer 1 of a pass without them)
    option_logits: torch.Tensor | None = None  # [rows, K] at the margin position
    option_valid: torch.Tensor | None = None  # [rows, K] bool
    previous_option_probs: torch.Tensor | None = None  # [rows, K] at the previous consulted layer
    has_previous_options: torch.Tensor | None = None  # [rows] bool: that layer exists
    continuation_option_logits: torch.Tensor | None = None  # [rows, K] at the continuation's margin position

    # p1 and gap need only the top two logits and the log-partition: a full-vocabulary
    # softmax per check would materialise [rows, vocab] probabilities for two numbers.
    @cached_property
    def float_logits(self) -> torch.Tensor:
        return self.logits.float()

    @cached_property
    def log_z(self) -> torch.Tensor:
        return torch.logsumexp(self.float_logits, dim=-1)

    @cached_property
    def top2_probs(self) -> torch.Tensor:
        return torch.exp(self.float_logits.topk(2, dim=-1).values - self.log_z[:, None])

    @cached_property
    def option_probs(self) -> torch.Tensor:
        return option_probs(self.option_logits, self.option_valid)

    @cached_property
    def continuation_option_probs(self) -> torch.Tensor:
        return option_probs(self.continuation_option_logits, self.option_valid)

    def select(self, pick: torch.Tensor) -> "SignalInputs":
        """The inputs of the rows ``pick`` (bool [rows]) only, intermediates not carried over."""
        rows = {name: getattr(self, name) for name in _ROW_FIELDS}
        picked = {name: None if value is None else value[pick] for name, value in rows.items()}
        count = next(len(value) for value in picked.values() if value is not None)  # a shape: no device sync
        return SignalInputs(self.layer, self.num_layers, count, self.device, **picked)

    def since_previous_options(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` [rows], NaN where no earlier layer was consulted."""
        return torch.where(self.has_previous_options, values, torch.full_like(values, float("nan")))


_ROW_FIELDS = ("logits", "hidden", "previous_hidden", "option_logits", "option_valid", "previous_option_probs",
               "has_previous_options", "continuation_option_logits")


def compute_signals(names: tuple[str, ...], inputs: SignalInputs) -> torch.Tensor:
    """The signals ``names`` (at least one) for each row: float32 [rows, len(names)]."""
    return torch.stack([SIGNALS[name].compute(inputs).float() for name in names], dim=-1)


def compute_features(
    names: tuple[str, ...],
    logits: torch.Tensor,
    hidden: torch.Tensor,
    previous_hidden: torch.Tensor | None,
    layer: int,
    num_layers: int,
) -> torch.Tensor:
    """Signals ``names`` that read no answer options (the paper's), off the exit logits
    ``logits`` [rows, vocab] and the decision states ``hidden``/``previous_hidden`` [rows, hidden]."""
    signal_reads(names)
    inputs = SignalInputs(layer, num_layers, len(logits), logits.device, logits=logits, hidden=hidden,
                          previous_hidden=previous_hidden)
    return compute_signals(names, inputs)


# ---- the paper's features ---------------------------------------------------------------------


@signal("p1", reads="vocab")
def _p1(inputs: SignalInputs) -> torch.Tensor:
    return inputs.top2_probs[:, 0]


@signal("gap", reads="vocab")
def _gap(inputs: SignalInputs) -> torch.Tensor:
    top2 = inputs.top2_probs
    return top2[:, 0] - top2[:, 1]


@signal("entropy", reads="vocab")
def _entropy(inputs: SignalInputs) -> torch.Tensor:
    # H = log Z - E_p[logit]; the softmax is formed only for the policies that ask.
    logits, log_z = inputs.float_logits, inputs.log_z
    probs = torch.exp(logits - log_z[:, None])
    return log_z - (probs * logits).sum(-1)


@signal("cosine", reads="hidden")
def _cosine(inputs: SignalInputs) -> torch.Tensor:
    if inputs.previous_hidden is None:
        return torch.zeros(inputs.rows, device=inputs.device)
    return torch.nn.functional.cosine_similarity(inputs.hidden.float(), inputs.previous_hidden.float(), dim=-1)


@signal("depth", reads="layer")
def _depth(inputs: SignalInputs) -> torch.Tensor:
    return torch.full((inputs.rows,), inputs.layer / inputs.num_layers, device=inputs.device)


# ---- over the answer options (loglikelihood groups only) ----------------------------------------


@signal("margin", reads="options")
def _margin(inputs: SignalInputs) -> torch.Tensor:
    return option_margin(inputs.option_probs, inputs.option_valid)


@signal("option_change", reads="options")
def _option_change(inputs: SignalInputs) -> torch.Tensor:
    changed = option_change(inputs.option_probs, inputs.previous_option_probs, inputs.option_valid)
    return inputs.since_previous_options(changed)


@signal("option_kl", reads="options")
def _option_kl(inputs: SignalInputs) -> torch.Tensor:
    kl = option_kl(inputs.option_probs, inputs.previous_option_probs, inputs.option_valid)
    return inputs.since_previous_options(kl)


# ---- over the continuation (SimLens; loglikelihood groups only) --------------------------------


@signal("continuation_margin", reads="continuation")
def _continuation_margin(inputs: SignalInputs) -> torch.Tensor:
    return option_margin(inputs.continuation_option_probs, inputs.option_valid)
