"""Exit checks: the exit head and features at a layer where the policy is consulted.

A check is the price of deciding. With the full head it is a matrix-vector product over the
whole vocabulary per row: on a CPU at batch 1 that is memory-bound and costs 84-88% of a
128-token decoder layer for SmolLM2 and Qwen-0.5B (reports/benchmark/), far more than its FLOPs.

``check_vocab=K`` switches on dynamic vocabulary pruning (Vincenti et al., 2024, "Dynamic
Vocabulary Pruning in Early-Exit LLMs"): a row's first check applies the full head and keeps
its K most likely tokens; its later checks compute the logits of those K tokens only (K rows
of the head), so they cost K·d instead of V·d. The features are then read off the softmax
over those K tokens (p1 and gap a little higher than over the full vocabulary: the tail's
mass is left out). The answer itself never comes from a pruned check: a row that exits gets
the full head at its scored positions.

``check_clusters=C`` (with ``check_vocab``) takes the first check's candidates from a
balanced clustering of the head's rows instead of the full head (:mod:`.head_clusters`), so
that no check multiplies the whole head: the first costs C + probes·S head rows, the later
ones K.

A policy that reads only the answer-option signals (``margin``, ...) runs no vocabulary head at
all: its check multiplies one head row per option at the group's margin position. A signal
read off the continuation (``continuation_margin``) first carries the group's speaker, token 0
and its positions decision..margin, from this layer through the remaining ones alone
(:mod:`.continuation`; or, for a policy whose ``continuation_carry`` is "filled", its positions
decision..margin attending to the whole prompt), then multiplies the same K head rows at the
carried margin position.

Knows nothing of lm-eval or policies' internals: it gets the signal names to compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.core.continuation import continue_rows
from adainfer_lmeval.core.features import SignalInputs, compute_signals, signal_reads
from adainfer_lmeval.core.options import AnswerOptions
from adainfer_lmeval.core.stages import stage
from adainfer_lmeval.arg_values import convert_arg

CHECK_ARGS = {  # model args of the exit checks: what each counts (see .head_clusters)
    "check_vocab": "tokens kept per exit check",
    "check_clusters": "head clusters the first check's candidates are picked from",
    "check_probes": "head clusters a first check probes; default check_clusters/32",
}


@dataclass(frozen=True)
class ExitCheckConfig:
    """How exit checks read the head: ``vocab`` K tokens per later check (None: the full head),
    ``clusters`` C head clusters the first check picks its K candidates from (needs ``vocab``),
    ``probes`` of them probed per pick (needs ``clusters``; None: C/32)."""

    vocab: int | None = None
    clusters: int | None = None
    probes: int | None = None

    def __post_init__(self):
        if self.clusters and not self.vocab:
            raise AdaInferError("check_clusters needs check_vocab=K (the candidates it picks); add e.g. check_vocab=64")
        if self.probes and not self.clusters:
            raise AdaInferError("check_probes needs check_clusters=C (the clusters it probes); add e.g. check_clusters=256")
        if self.probes and self.probes > self.clusters:
            raise AdaInferError(
                f"check_probes={self.probes} must be between 1 and check_clusters={self.clusters} "
                "(the clusters a first check probes)"
            )

    @classmethod
    def from_model_args(cls, args: dict) -> "ExitCheckConfig":
        """The ``check_*`` entries of a model-args dict (other keys are ignored): ``check_vocab=K``
        / ``check_clusters=C`` an integer >= 2, none/0 switched off; ``check_probes=P`` an
        integer >= 1, none the default."""
        return cls(*(_check_arg(name, args.get(name)) for name in CHECK_ARGS))

    def model_args(self) -> dict:
        """The config as the model args that give it (run settings, cache keys)."""
        return dict(zip(CHECK_ARGS, (self.vocab, self.clusters, self.probes)))

    def check_against(self, vocab_size: int) -> None:
        """Refuse what a model's vocabulary rules out (needs only its config)."""
        if self.vocab is not None and not 1 <= self.vocab < vocab_size:
            raise AdaInferError(
                f"check_vocab={self.vocab} must be below the model's vocabulary ({vocab_size} tokens): "
                "it is the number of tokens a pruned check keeps"
            )
        if self.clusters and self.clusters > vocab_size // 2:
            raise AdaInferError(f"check_clusters={self.clusters} must be between 2 and {vocab_size // 2} (half the vocabulary)")


def _check_arg(name: str, value) -> int | None:
    off = (None, "", "none", "None") if name == "check_probes" else (None, "", "none", "None", 0, "0")
    if not isinstance(value, bool) and value in off:
        return None
    least = 1 if name == "check_probes" else 2
    try:
        k = convert_arg(name, value, int)
    except AdaInferError:
        k = None
    if k is None or k < least:
        hint = "" if name == "check_probes" else ", or none"
        raise AdaInferError(f"{name}={value!r} must be an integer >= {least} ({CHECK_ARGS[name]}){hint}")
    return k


@dataclass
class SpeakerContinuation:
    """The speakers of one check, for the signals read off the continuation: this layer's
    states (their rows of the batch's) and, as host ints, their decision positions and margin
    offsets. The check fills in what it carried."""

    hidden: torch.Tensor  # [rows, T, d]: the pass's states at this layer
    rows: torch.Tensor  # [n]: the speakers' rows of ``hidden``
    decisions: list[int]
    margin_offsets: list[int]
    states: torch.Tensor | None = None  # [n, d] filled in: the last layer's states at the margin positions
    token_layers: list[int] | None = None  # filled in: per speaker, carried tokens x layers run
    tokens: list[int] | None = None  # filled in: per speaker, the tokens carried
    prompt_tokens: list[int] | None = None  # filled in: per speaker, the prompt tokens filled per layer run (filled carry)


class ExitChecks:
    """Checks for ``slots`` decision makers (groups, or generation rows) over one pass, computing
    the signals ``names`` (:mod:`.features`): the exit head over the vocabulary only when one of
    them reads it, the answer options' head rows (``options``, per slot) only when one reads them
    at the margin position or off the continuation (carried as ``carry`` says: simlens or filled)."""

    def __init__(self, stack, names: tuple[str, ...], vocab: int | None, slots: int, device, clusters=None,
                 options: AnswerOptions | None = None, carry: str = "simlens"):
        self.stack, self.names, self.carry = stack, names, carry
        reads = signal_reads(names)
        self.reads_vocab, self.reads_options = "vocab" in reads, "options" in reads
        self.reads_continuation = "continuation" in reads
        self.options = options
        self.vocab = None if vocab is None or vocab >= stack.vocab_size else int(vocab)
        self.clusters = clusters if self.vocab is not None else None  # a HeadClusters, or None
        if self.vocab is not None:
            self.candidates = torch.zeros(slots, self.vocab, dtype=torch.long, device=device)
            self.pruned = torch.zeros(slots, dtype=torch.bool, device=device)
        if self.reads_options:
            # the option distribution at each slot's last consulted layer (option_change, option_kl)
            self.previous_option_probs = torch.zeros(options.tokens.shape, device=device)
            self.has_previous_options = torch.zeros(slots, dtype=torch.bool, device=device)

    def consult(self, state, previous, layer: int, num_layers: int, slots: torch.Tensor, option_state=None,
                continuation: SpeakerContinuation | None = None):
        """(signals [n, len(names)], full-vocabulary logits or None, bool [n]: the check read
        K tokens of the vocabulary (pruned, or picked from head clusters), long [n]: head rows it
        multiplied).

        ``state``/``previous``: this and the previous layer's decision states [n, d];
        ``option_state``: the states at the slots' margin positions [n, d] (when options are read);
        ``continuation``: the slots' speakers (when the continuation is read; filled in here).
        The logits are returned only when every row of this call used the full head (so the
        caller may reuse them as exit logits).
        """
        n = len(state)
        inputs = SignalInputs(layer, num_layers, n, state.device, hidden=state, previous_hidden=previous)
        head_rows = torch.zeros(n, dtype=torch.long, device=state.device)
        if self.reads_options:
            head_rows += self._read_options(inputs, option_state, slots)
        if self.reads_continuation:
            head_rows += self._read_continuation(inputs, continuation, layer, slots)
        if not self.reads_vocab:
            with stage("check_features"):
                features = compute_signals(self.names, inputs)
            return features, None, torch.zeros(n, dtype=torch.bool, device=state.device), head_rows
        features, logits, over_k, vocab_rows = self._read_vocab(inputs, slots)
        return features, logits, over_k, head_rows + vocab_rows

    def _read_options(self, inputs: SignalInputs, option_state, slots) -> torch.Tensor:
        """Fill ``inputs``' option fields (one head row per option) and remember this layer's
        option distribution; the head rows multiplied per row."""
        tokens, valid = self.options.tokens[slots], self.options.valid[slots]
        with stage("check_head", len(option_state)):
            inputs.option_logits = self.stack.exit_logits_over(option_state, tokens)
        inputs.option_valid = valid
        inputs.previous_option_probs = self.previous_option_probs[slots]
        inputs.has_previous_options = self.has_previous_options[slots]
        self.previous_option_probs[slots] = inputs.option_probs
        self.has_previous_options[slots] = True
        return valid.sum(-1)

    def _read_continuation(self, inputs: SignalInputs, speakers: SpeakerContinuation, layer: int, slots) -> torch.Tensor:
        """Carry each speaker from ``layer`` to the last layer (token 0, decision..margin), fill
        ``inputs``' continuation option logits (one head row per option at the carried margin
        position) and ``speakers``' carried states and counts; the head rows multiplied per row."""
        last = [d + m for d, m in zip(speakers.decisions, speakers.margin_offsets)]
        with stage("check_continuation", len(last)):
            carried = continue_rows(self.stack, self.carry, layer, speakers.hidden, speakers.decisions, last, speakers.rows)
        steps = torch.tensor(speakers.margin_offsets, dtype=torch.long, device=carried.offsets.device)
        speakers.states = carried.at(steps)
        speakers.token_layers = carried.token_layers
        speakers.tokens = carried.tokens
        speakers.prompt_tokens = carried.prompt_tokens
        tokens, valid = self.options.tokens[slots], self.options.valid[slots]
        with stage("check_head", len(last)):
            inputs.continuation_option_logits = self.stack.exit_logits_over(speakers.states, tokens)
        inputs.option_valid = valid
        return valid.sum(-1)

    def _read_vocab(self, inputs: SignalInputs, slots):
        """The signals off the exit logits over the vocabulary (full, pruned to K, or picked from
        head clusters), with what :meth:`consult` returns about them."""
        stack, state = self.stack, inputs.hidden
        n = len(state)
        check_head_rows = torch.full((n,), stack.vocab_size, dtype=torch.long, device=state.device)
        if self.vocab is None:
            with stage("check_head", n):
                inputs.logits = stack.exit_logits(state)
            with stage("check_features"):
                features = compute_signals(self.names, inputs)
            return features, inputs.logits, torch.zeros(n, dtype=torch.bool, device=state.device), check_head_rows
        pruned = self.pruned[slots]
        features = torch.empty(n, len(self.names), device=state.device)
        full_logits = None
        for use_pruned in (False, True):
            pick = pruned if use_pruned else ~pruned
            if not bool(pick.any()):
                continue
            rows = inputs.select(pick)
            if use_pruned:
                with stage("check_head", rows.rows):
                    rows.logits = stack.exit_logits_over(rows.hidden, self.candidates[slots[pick]])
                check_head_rows[pick] = self.vocab
            elif self.clusters is not None:  # first check: candidates from the probed clusters
                with stage("check_head", rows.rows):
                    self.candidates[slots[pick]], rows.logits, check_head_rows[pick] = self.clusters.pick(stack, rows.hidden, self.vocab)
                self.pruned[slots[pick]] = True
            else:
                with stage("check_head", rows.rows):
                    rows.logits = stack.exit_logits(rows.hidden)
                self.candidates[slots[pick]] = rows.logits.topk(self.vocab, dim=-1).indices
                self.pruned[slots[pick]] = True
                full_logits = rows.logits if not bool(pruned.any()) else None
            with stage("check_features"):
                features[pick] = compute_signals(self.names, rows).to(features.dtype)
        over_k = torch.ones_like(pruned) if self.clusters is not None else pruned
        return features, full_logits, over_k, check_head_rows
