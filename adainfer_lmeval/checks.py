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

Knows nothing of lm-eval or policies' internals: it gets the feature names to compute.
"""

from __future__ import annotations

import torch

from .features import compute_features


class ExitChecks:
    """Checks for ``slots`` decision makers (groups, or generation rows) over one pass."""

    def __init__(self, stack, vocab: int | None, slots: int, device):
        self.stack = stack
        self.vocab = None if vocab is None or vocab >= stack.vocab_size else int(vocab)
        if self.vocab is not None:
            self.candidates = torch.zeros(slots, self.vocab, dtype=torch.long, device=device)
            self.pruned = torch.zeros(slots, dtype=torch.bool, device=device)

    def consult(self, names, state, previous, layer: int, num_layers: int, slots: torch.Tensor):
        """(features [n, len(names)], full-vocabulary logits or None, bool [n]: pruned check).

        The logits are returned only when every row of this call used the full head (so the
        caller may reuse them as exit logits).
        """
        stack = self.stack
        if self.vocab is None:
            logits = stack.exit_logits(state)
            return compute_features(names, logits, state, previous, layer, num_layers), logits, torch.zeros(
                len(state), dtype=torch.bool, device=state.device
            )
        pruned = self.pruned[slots]
        features = torch.empty(len(state), len(names), device=state.device)
        full_logits = None
        for use_pruned in (False, True):
            pick = pruned if use_pruned else ~pruned
            if not bool(pick.any()):
                continue
            rows_state = state[pick]
            rows_previous = previous[pick] if previous is not None else None
            if use_pruned:
                logits = stack.exit_logits_over(rows_state, self.candidates[slots[pick]])
            else:
                logits = stack.exit_logits(rows_state)
                self.candidates[slots[pick]] = logits.topk(self.vocab, dim=-1).indices
                self.pruned[slots[pick]] = True
                full_logits = logits if not bool(pruned.any()) else None
            features[pick] = compute_features(names, logits, rows_state, rows_previous, layer, num_layers).to(features.dtype)
        return features, full_logits, pruned
