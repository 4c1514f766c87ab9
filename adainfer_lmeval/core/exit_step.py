"""The per-layer exit step shared by the loglikelihood engine and generation.

One pass (an engine batch, or one generated token of a batch) has ``slots`` decision makers:
the engine's row groups, or generation's rows. At a layer where the policy is consulted, the
slots still running hand in their decision-position hidden states (and, for a policy reading
answer options, their margin-position ones; for one reading the continuation, their speakers'
rows); the step runs the exit checks on them (:mod:`.exit_checks`), writes the signals into
each slot's history, counts the checks, the pruned ones, the head rows they multiplied, those
that read no vocabulary and the token-layers their continuations carried, and returns the
policy's stop mask.
What leaving means (emitting scored logits, filling skipped layers' keys and values) is the
caller's business.

Everything stays on the device: the counts come back to the host once per pass (:meth:`counts`).
"""

from __future__ import annotations

import torch

from adainfer_lmeval.core.exit_checks import ExitChecks, SpeakerContinuation
from adainfer_lmeval.core.features import continuation_signals, option_signals, signal_reads
from adainfer_lmeval.errors import AdaInferError


class ExitStep:
    """``options``: the slots' answer options (:class:`.options.AnswerOptions`), needed when
    the policy reads an option or continuation signal."""

    def __init__(self, stack, policy, vocab: int | None, clusters, slots: int, device, options=None):
        self.policy, self.num_layers = policy, stack.num_layers
        self.features = policy.features
        reads = signal_reads(self.features)
        self.reads_options = "options" in reads
        self.reads_continuation = "continuation" in reads
        if (self.reads_options or self.reads_continuation) and options is None:
            names = option_signals(self.features) + continuation_signals(self.features)
            raise AdaInferError(
                f"policy={policy.name} reads answer options ({', '.join(names)}); "
                "this batch has none: build it with options= and margin_offsets= (loglikelihood groups)"
            )
        self.exit_checks = ExitChecks(stack, self.features, vocab, slots, device, clusters, options,
                                      carry=policy.continuation_carry)
        self.history = torch.full((slots, self.num_layers + 1, len(self.features)), float("nan"), device=device)
        self.checks = torch.zeros(slots, dtype=torch.long, device=device)
        self.pruned_checks = torch.zeros(slots, dtype=torch.long, device=device)  # of those, over K tokens only
        self.check_head_rows = torch.zeros(slots, dtype=torch.long, device=device)  # head rows they multiplied
        # of the checks, those that ran no head over the vocabulary (no signal of the policy reads it)
        self.vocab_free_checks = torch.zeros(slots, dtype=torch.long, device=device)
        self.vocab_free = bool(self.features) and "vocab" not in reads
        # continuation signals: token-layers their checks carried, the tokens each carried and the
        # prompt tokens each filled per layer run (a filled carry's; 0 for SimLens)
        self.check_token_layers = torch.zeros(slots, dtype=torch.long, device=device)
        self.check_carried_tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self.check_prompt_tokens = torch.zeros(slots, dtype=torch.long, device=device)
        # A signal over the hidden states ("cosine") compares a slot's state with the one a
        # layer before, so with it every layer's state is kept, consulted or not.
        self.tracks_state = "hidden" in reads
        self.previous: torch.Tensor | None = None  # [slots, d]: the last state remembered per slot

    def consults_at(self, layer: int) -> bool:
        return self.policy.consults_at(layer, self.num_layers)

    def remember(self, state: torch.Tensor, slots: torch.Tensor) -> None:
        """Keep ``state`` [n, d] as the layer-before state of ``slots`` (when a feature needs it)."""
        if not self.tracks_state:
            return
        if self.previous is None:
            self.previous = state.new_zeros((len(self.history), state.shape[-1]))
        self.previous[slots] = state

    def decide(self, layer: int, state: torch.Tensor, slots: torch.Tensor, option_state: torch.Tensor | None = None,
               continuation: SpeakerContinuation | None = None):
        """At a consulted ``layer``: (bool [n], which of ``slots`` stop; the full-vocabulary
        check logits [n, vocab] where every row's check computed them, else None).

        ``option_state`` [n, d]: the slots' states at their margin positions (when the policy
        reads answer options); ``continuation``: the slots' speakers (when it reads the
        continuation; the check fills in what it carried)."""
        check_logits = None
        if self.features:  # a policy without features (static) needs no exit head
            previous = self.previous[slots] if self.previous is not None else None
            feats, check_logits, over_k, head_rows = self.exit_checks.consult(
                state, previous, layer, self.num_layers, slots, option_state, continuation)
            self.history[slots, layer] = feats.to(self.history.dtype)
            self.checks[slots] += 1
            self.pruned_checks[slots] += over_k.long()
            self.check_head_rows[slots] += head_rows
            if self.vocab_free:
                self.vocab_free_checks[slots] += 1
            if self.reads_continuation:  # host counts, copied over without reading the device
                self.check_token_layers[slots] += torch.tensor(continuation.token_layers, device=slots.device)
                self.check_carried_tokens[slots] = torch.tensor(continuation.tokens, device=slots.device)
                self.check_prompt_tokens[slots] = torch.tensor(continuation.prompt_tokens, device=slots.device)
        self.remember(state, slots)
        stop = self.policy.decide(layer, self.num_layers, self.history[slots, : layer + 1])
        return stop.to(slots.device), check_logits

    def counts(self, slots: torch.Tensor | None = None) -> list[list[int]]:
        """(checks, pruned checks, check head rows, vocab-free checks, check continuation
        token-layers, tokens each check's continuation carried, prompt tokens each filled per layer
        run) per entry of ``slots`` (default: every slot), in one host copy."""
        counts = torch.stack([self.checks, self.pruned_checks, self.check_head_rows, self.vocab_free_checks,
                              self.check_token_layers, self.check_carried_tokens, self.check_prompt_tokens])
        return (counts if slots is None else counts[:, slots]).tolist()
