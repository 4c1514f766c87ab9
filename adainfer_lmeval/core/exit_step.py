"""The per-layer exit step shared by the loglikelihood engine and generation.

One pass (an engine batch, or one generated token of a batch) has ``slots`` decision makers:
the engine's row groups, or generation's rows. At a layer where the policy is consulted, the
slots still running hand in their decision-position hidden states; the step runs the exit
checks on them (:mod:`.exit_checks`), writes the features into each slot's history, counts the
checks, the pruned ones and the head rows they multiplied, and returns the policy's stop mask.
What leaving means (emitting scored logits, filling skipped layers' keys and values) is the
caller's business.

Everything stays on the device: the counts come back to the host once per pass (:meth:`counts`).
"""

from __future__ import annotations

import torch

from adainfer_lmeval.core.exit_checks import ExitChecks


class ExitStep:
    def __init__(self, stack, policy, vocab: int | None, clusters, slots: int, device):
        self.policy, self.num_layers = policy, stack.num_layers
        self.features = policy.features
        self.exit_checks = ExitChecks(stack, vocab, slots, device, clusters)
        self.history = torch.full((slots, self.num_layers + 1, len(self.features)), float("nan"), device=device)
        self.checks = torch.zeros(slots, dtype=torch.long, device=device)
        self.pruned_checks = torch.zeros(slots, dtype=torch.long, device=device)  # of those, over K tokens only
        self.check_head_rows = torch.zeros(slots, dtype=torch.long, device=device)  # head rows they multiplied
        # The "cosine" feature compares a slot's state with the one a layer before, so with it
        # every layer's state is kept, consulted or not.
        self.tracks_state = "cosine" in self.features
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

    def decide(self, layer: int, state: torch.Tensor, slots: torch.Tensor):
        """At a consulted ``layer``: (bool [n], which of ``slots`` stop; the full-vocabulary
        check logits [n, vocab] where every row's check computed them, else None)."""
        check_logits = None
        if self.features:  # a policy without features (static) needs no exit head
            previous = self.previous[slots] if self.previous is not None else None
            feats, check_logits, over_k, head_rows = self.exit_checks.consult(
                self.features, state, previous, layer, self.num_layers, slots)
            self.history[slots, layer] = feats.to(self.history.dtype)
            self.checks[slots] += 1
            self.pruned_checks[slots] += over_k.long()
            self.check_head_rows[slots] += head_rows
        self.remember(state, slots)
        stop = self.policy.decide(layer, self.num_layers, self.history[slots, : layer + 1])
        return stop.to(slots.device), check_logits

    def counts(self, slots: torch.Tensor | None = None) -> tuple[list[int], list[int], list[int]]:
        """(checks, pruned checks, check head rows) per entry of ``slots`` (default: every slot),
        in one host copy."""
        counts = torch.stack([self.checks, self.pruned_checks, self.check_head_rows])
        checks, pruned, head_rows = (counts if slots is None else counts[:, slots]).tolist()
        return checks, pruned, head_rows
