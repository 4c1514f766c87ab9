"""The early-exit forward pass (AdaInfer): run decoder layers one at a time, let a policy stop.

Knows nothing of lm-eval. Input is a right-padded batch of token rows; for each row, one
*decision position* (the position whose prediction the policy judges) and the *scored
positions* (decision position up to the row's end) whose logits the caller needs. After each
layer the policy may stop a row: the row's scored logits then come from that layer (final
norm + head applied to its hidden states) and the row leaves the batch, so no later layer
runs for it. Rows that share a *group* (the answer choices of one question: same tokens up to
the decision position) share one decision, read once off the group's first row; a policy that
reads the answer-option signals also reads that row at the group's margin position (where the
options first differ, :mod:`.options`), over one head row per option.

A policy whose ``exit_readout`` is ``"continuation"`` (SimLens, :mod:`.continuation`) reads a
stopping group's answer off the continuation instead: each of its rows carries token 0 and its
scored positions from the exit layer through the remaining layers alone (or, with the policy's
``continuation_carry`` "filled", its scored positions attending to the whole prompt, whose keys and
values are projected from the exit layer's states), and the final norm and head read the carried
states. A speaker scored at its decision position alone whose options
differ there (margin offset 0) already has that state from its check's continuation. Rows that
run to the last layer are read there as ever.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adainfer_lmeval.core.architectures import DecoderStack
from adainfer_lmeval.core.continuation import continue_rows
from adainfer_lmeval.core.exit_checks import ExitCheckConfig, SpeakerContinuation
from adainfer_lmeval.core.exit_step import ExitStep
from adainfer_lmeval.core.features import FEATURE_NAMES, compute_features
from adainfer_lmeval.core.head_clusters import HeadClusters
from adainfer_lmeval.core.exit_policy import CONTINUATION_CARRIES, EXIT_READOUTS, ExitPolicy
from adainfer_lmeval.core.options import AnswerOptions
from adainfer_lmeval.core.stages import stage
from adainfer_lmeval.errors import AdaInferError


@dataclass
class ExitBatch:
    input_ids: torch.Tensor  # [rows, T] long, right-padded
    lengths: torch.Tensor  # [rows] real tokens per row
    decision_positions: torch.Tensor  # [rows]; scored positions are decision .. length-1
    groups: torch.Tensor  # [rows] group index 0..G-1; a group's rows share the decision
    options: AnswerOptions | None = None  # per group: its answer options (for the option signals)

    @classmethod
    def from_rows(cls, rows: list[list[int]], decision_positions: list[int], groups: list[int] | None = None, pad_id: int = 0,
                  device=None, options: list[list[int]] | None = None, margin_offsets: list[int] | None = None):
        """Right-pad token lists into a batch (groups default to one row each).

        ``options`` (per group: each option's token at the margin position) and ``margin_offsets``
        (per group: the margin position minus the decision position) come together, or not at all.
        """
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        groups = list(range(len(rows))) if groups is None else groups
        as_tensor = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
        answer_options = None
        if options is not None or margin_offsets is not None:
            _check_options(rows, decision_positions, groups, options, margin_offsets)
            answer_options = AnswerOptions.from_lists(options, margin_offsets, device)
        return cls(ids.to(device), as_tensor([len(r) for r in rows]), as_tensor(decision_positions), as_tensor(groups),
                   answer_options)


def _check_options(rows, decisions, groups, options, margin_offsets) -> None:
    """Refuse answer options that do not fit the batch's groups, in one line."""
    n_groups = max(groups) + 1
    if options is None or margin_offsets is None or len(options) != n_groups or len(margin_offsets) != n_groups:
        raise AdaInferError(f"ExitBatch options and margin_offsets need one entry per group ({n_groups} groups), both or neither")
    first_row = {}
    for row, group in enumerate(groups):
        first_row.setdefault(group, row)
    for group, row in first_row.items():
        if not 0 <= margin_offsets[group] < len(rows[row]) - decisions[row]:
            raise AdaInferError(f"margin_offsets[{group}]={margin_offsets[group]} lies past the end of the group's row")


@dataclass
class ExitResult:
    exit_layers: list[int]  # per row: the layer whose hidden states gave its logits
    logits: list[torch.Tensor]  # per row: [n_scored, vocab] exit logits at the scored positions
    checks: list[int]  # per row: exit-head evaluations made for its group's decision
    pruned_checks: list[int]  # per row: how many of those read K tokens only (check_vocab)
    check_rows: list[int]  # per row: head rows its group's checks multiplied (check head rows)
    vocab_free_checks: list[int]  # per row: how many of those ran no head over the vocabulary (option signals only)
    # The continuation's token-layers (carried tokens x layers run, padding not counted), the
    # tokens each carry took and the prompt tokens each filled per layer run (a filled carry's; 0
    # for SimLens): those of its group's checks (continuation signals), and its own exit
    # read-out's (exit_readout "continuation"); 0 where none ran.
    check_token_layers: list[int]  # per row: its group's checks', summed over them
    check_carried_tokens: list[int]  # per row: tokens each of its group's checks carried
    exit_token_layers: list[int]  # per row: its exit read-out's
    exit_carried_tokens: list[int]  # per row: tokens its exit read-out carried
    check_prompt_tokens: list[int]  # per row: prompt tokens each of its group's checks filled per layer
    exit_prompt_tokens: list[int]  # per row: prompt tokens its exit read-out filled per layer


@dataclass
class LayerView:
    layer: int
    features: torch.Tensor  # [rows, len(FEATURE_NAMES)] at the decision positions
    logits: list[torch.Tensor]  # per row: [n_scored, vocab] exit logits at the scored positions


class EarlyExitEngine:
    """``checks``: how exit checks read the head (:class:`.exit_checks.ExitCheckConfig`; default: the
    full head at every check)."""

    def __init__(self, model, policy: ExitPolicy, checks: ExitCheckConfig | None = None):
        self.stack = DecoderStack(model)
        self.policy = policy
        self.checks = ExitCheckConfig() if checks is None else checks
        self.checks.check_against(self.stack.vocab_size)
        if policy.exit_readout not in EXIT_READOUTS:
            raise AdaInferError(f"policy={policy.name} has exit_readout={policy.exit_readout!r}; "
                                f"choose one of {', '.join(EXIT_READOUTS)}")
        if policy.continuation_carry not in CONTINUATION_CARRIES:
            raise AdaInferError(f"policy={policy.name} has continuation_carry={policy.continuation_carry!r}; "
                                f"choose one of {', '.join(CONTINUATION_CARRIES)}")
        self.head_clusters = None  # built once from the head's weight, when the config asks for them
        if self.checks.clusters:
            self.head_clusters = HeadClusters.for_head(self.stack.head.weight, self.checks.clusters, self.checks.probes)
        policy.bind(self.stack.identity())

    def exit_step(self, slots: int, device, options: AnswerOptions | None = None) -> ExitStep:
        """The exit step of one pass with ``slots`` decision makers (groups, or generation rows),
        with their answer options where they have them."""
        return ExitStep(self.stack, self.policy, self.checks.vocab, self.head_clusters, slots, device, options)

    @property
    def num_layers(self) -> int:
        return self.stack.num_layers

    @torch.no_grad()
    def run(self, batch: ExitBatch) -> ExitResult:
        stack, num_layers = self.stack, self.stack.num_layers
        rows = batch.input_ids.shape[0]
        lengths, decision = batch.lengths, batch.decision_positions
        groups = batch.groups
        n_groups = int(groups.max()) + 1
        # The first row of each group speaks for the group.
        first_row = torch.full((n_groups,), rows, dtype=torch.long, device=groups.device)
        first_row.scatter_reduce_(0, groups, torch.arange(rows, device=groups.device), reduce="amin")

        step = self.exit_step(n_groups, groups.device, batch.options)
        # Python copies of the spans: reading tensors element by element would sync a GPU.
        spans = list(zip(decision.tolist(), lengths.tolist()))
        continued = self.policy.exit_readout == "continuation"
        if step.reads_continuation:  # host copies for the checks' continuations
            row_groups, margin_offsets = groups.tolist(), batch.options.offsets.tolist()
        exit_token_layers, exit_carried_tokens, exit_prompt_tokens = [0] * rows, [0] * rows, [0] * rows

        width = int(lengths.max())
        with stage("embed"):
            hidden = stack.embed(batch.input_ids[:, :width])
        active = torch.arange(rows, device=groups.device)  # batch row of each hidden row
        with stage("layer_inputs"):
            inputs = stack.layer_inputs(hidden)
        if step.tracks_state:  # layer 1 compares against the embeddings (layer 0)
            speaker_idx, speaker_groups = self._speakers(active, groups, first_row)
            step.remember(hidden[speaker_idx, decision[speaker_idx]], speaker_groups)
        exit_layers = [num_layers] * rows
        logits_out: list[torch.Tensor | None] = [None] * rows

        for layer in range(1, num_layers):
            with stage("layers"):
                hidden = stack.run_layer(layer - 1, hidden, inputs)
            consult = step.consults_at(layer)
            if not consult and not step.tracks_state:
                continue
            speaker_idx, speaker_groups = self._speakers(active, groups, first_row)
            speaker_rows = active[speaker_idx]
            state = hidden[speaker_idx, decision[speaker_rows]]
            if not consult:
                step.remember(state, speaker_groups)
                continue
            option_state = None
            if step.reads_options:  # the group's options first differ at its margin position
                option_state = hidden[speaker_idx, decision[speaker_rows] + batch.options.offsets[speaker_groups]]
            continuation = None
            if step.reads_continuation:
                speakers = speaker_rows.tolist()
                continuation = SpeakerContinuation(hidden, speaker_idx, [spans[r][0] for r in speakers],
                                                   [margin_offsets[row_groups[r]] for r in speakers])
            stop, check_logits = step.decide(layer, state, speaker_groups, option_state, continuation)
            stopped = speaker_groups[stop]
            if stopped.numel() == 0:
                continue
            leaving = torch.isin(groups[active], stopped)
            if continued:
                # A speaker scored at its decision position alone, its options differing there,
                # has its state at the last layer: its check carried the same tokens.
                reused = {}
                if continuation is not None:
                    reused = {r: continuation.states[k : k + 1] for k, r in enumerate(speakers)
                              if spans[r][1] - spans[r][0] == 1 and margin_offsets[row_groups[r]] == 0}
                self._emit_continued(hidden, torch.nonzero(leaving, as_tuple=True)[0], active[leaving], layer, spans,
                                     exit_layers, logits_out, reused, (exit_token_layers, exit_carried_tokens, exit_prompt_tokens))
            else:
                # A speaker scored at its decision position alone (single-token answers) already
                # has its exit logits: the check computed them.
                known = {}
                if check_logits is not None:
                    speakers = speaker_rows.tolist()
                    known = {r: check_logits[k : k + 1] for k, r in enumerate(speakers) if spans[r][1] - spans[r][0] == 1}
                with stage("emit"):
                    self._emit(hidden[leaving], active[leaving], layer, spans, exit_layers, logits_out, known)
            hidden, active = hidden[~leaving], active[~leaving]
            if active.numel() == 0:
                break
            # Trailing padding that no remaining row needs is not computed any further.
            width = int(lengths[active].max())
            hidden = hidden[:, :width]
            with stage("layer_inputs"):
                inputs = stack.layer_inputs(hidden)
        else:
            with stage("layers"):
                hidden = stack.run_layer(num_layers - 1, hidden, inputs)
            with stage("emit"):
                self._emit(hidden, active, num_layers, spans, exit_layers, logits_out)

        (checks, pruned_checks, check_head_rows, vocab_free, check_token_layers, check_carried_tokens,
         check_prompt_tokens) = step.counts(groups)
        return ExitResult(exit_layers, logits_out, checks, pruned_checks, check_head_rows, vocab_free,  # type: ignore[arg-type]
                          check_token_layers, check_carried_tokens, exit_token_layers, exit_carried_tokens,
                          check_prompt_tokens, exit_prompt_tokens)

    @torch.no_grad()
    def trace(self, batch: ExitBatch):
        """Every layer's view of every row, with no exits: for collecting training features.

        Yields a :class:`LayerView` per layer 1..num_layers, holding all of
        :data:`FEATURE_NAMES` at each row's decision position and the exit logits at its
        scored positions. Consume each view before asking for the next (they are large).
        """
        stack, num_layers = self.stack, self.stack.num_layers
        width = int(batch.lengths.max())
        hidden = stack.embed(batch.input_ids[:, :width])
        inputs = stack.layer_inputs(hidden)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        previous = hidden[rows, batch.decision_positions]
        spans = [(int(d), int(n)) for d, n in zip(batch.decision_positions, batch.lengths)]
        for layer in range(1, num_layers + 1):
            hidden = stack.run_layer(layer - 1, hidden, inputs)
            gathered = torch.cat([hidden[i, start:end] for i, (start, end) in enumerate(spans)])
            logits = stack.exit_logits(gathered)
            per_row, offset = [], 0
            for start, end in spans:
                per_row.append(logits[offset : offset + end - start])
                offset += end - start
            state = hidden[rows, batch.decision_positions]
            decision_logits = torch.stack([row_logits[0] for row_logits in per_row])
            feats = compute_features(FEATURE_NAMES, decision_logits, state, previous, layer, num_layers)
            previous = state
            yield LayerView(layer, feats, per_row)

    # ---- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _speakers(active, groups, first_row):
        """Indices (into the active rows) of each active group's first row, and their groups."""
        active_groups = groups[active]
        is_speaker = first_row[active_groups] == active
        idx = torch.nonzero(is_speaker, as_tuple=True)[0]
        return idx, active_groups[idx]

    def _emit(self, hidden, rows, layer, spans, exit_layers, logits_out, known=None):
        """Exit logits at the scored positions of ``rows``, in one head call (``known``: already computed)."""
        rows = rows.tolist()
        known = known or {}
        for r in rows:
            exit_layers[r] = layer
            if r in known:
                logits_out[r] = known[r]
        scored = {r: hidden[i, spans[r][0] : spans[r][1]] for i, r in enumerate(rows) if r not in known}
        self._read_out(scored, logits_out)

    def _emit_continued(self, hidden, hidden_idx, rows, layer, spans, exit_layers, logits_out, reused, counts):
        """Exit logits of batch rows ``rows`` (``hidden_idx``: their rows of ``hidden``) off the
        continuation from ``layer``: the scored positions of each row carried to the last layer
        (with token 0, or attending to the filled prompt: the policy's ``continuation_carry``;
        ``reused``: a speaker's carried state its check left), then one head call; writes each
        row's token-layers, carried tokens and filled prompt tokens into ``counts``' three lists."""
        token_layers, carried_tokens, prompt_tokens = counts
        rows = rows.tolist()
        todo = [(i, r) for i, r in enumerate(rows) if r not in reused]
        scored = {}
        if todo:
            with stage("exit_continuation", len(todo)):
                index = hidden_idx[torch.tensor([i for i, _ in todo], dtype=torch.long, device=hidden.device)]
                states = continue_rows(self.stack, self.policy.continuation_carry, layer, hidden,
                                       [spans[r][0] for _, r in todo], [spans[r][1] - 1 for _, r in todo], index)
            for k, (_, r) in enumerate(todo):
                scored[r] = states.span(k, spans[r][1] - spans[r][0])
                token_layers[r] = states.token_layers[k]
                carried_tokens[r] = states.tokens[k]
                prompt_tokens[r] = states.prompt_tokens[k]
        for r in rows:
            exit_layers[r] = layer
            if r in reused:
                scored[r] = reused[r]
        with stage("emit"):
            self._read_out(scored, logits_out)

    def _read_out(self, scored: dict, logits_out) -> None:
        """Final norm and head over each row's scored states (``scored``: row -> [n, d]), in one call."""
        if not scored:
            return
        logits = self.stack.exit_logits(torch.cat(list(scored.values())))
        offset = 0
        for r, states in scored.items():
            logits_out[r] = logits[offset : offset + len(states)]
            offset += len(states)
