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

Knows nothing of lm-eval or policies' internals: it gets the feature names to compute.
"""

from __future__ import annotations

import torch

from .features import compute_features


class ExitChecks:
    """Checks for ``slots`` decision makers (groups, or generation rows) over one pass."""

    def __init__(self, stack, vocab: int | None, slots: int, device, clusters=None):
        self.stack = stack
        self.vocab = None if vocab is None or vocab >= stack.vocab_size else int(vocab)
        self.clusters = clusters if self.vocab is not None else None  # a HeadClusters, or None
        if self.vocab is not None:
            self.candidates = torch.zeros(slots, self.vocab, dtype=torch.long, device=device)
            self.pruned = torch.zeros(slots, dtype=torch.bool, device=device)

    def consult(self, names, state, previous, layer: int, num_layers: int, slots: torch.Tensor):
        """(features [n, len(names)], full-vocabulary logits or None, bool [n]: the check read
        K tokens (pruned, or picked from head clusters), long [n]: head rows it multiplied).

        The logits are returned only when every row of this call used the full head (so the
        caller may reuse them as exit logits).
        """
        stack = self.stack
        n = len(state)
        head_rows = torch.full((n,), stack.vocab_size, dtype=torch.long, device=state.device)
        if self.vocab is None:
            logits = stack.exit_logits(state)
            features = compute_features(names, logits, state, previous, layer, num_layers)
            return features, logits, torch.zeros(n, dtype=torch.bool, device=state.device), head_rows
        pruned = self.pruned[slots]
        features = torch.empty(n, len(names), device=state.device)
        full_logits = None
        for use_pruned in (False, True):
            pick = pruned if use_pruned else ~pruned
            if not bool(pick.any()):
                continue
            rows_state = state[pick]
            rows_previous = previous[pick] if previous is not None else None
            if use_pruned:
                logits = stack.exit_logits_over(rows_state, self.candidates[slots[pick]])
                head_rows[pick] = self.vocab
            elif self.clusters is not None:  # first check: candidates from the probed clusters
                self.candidates[slots[pick]], logits, head_rows[pick] = self.clusters.pick(stack, rows_state, self.vocab)
                self.pruned[slots[pick]] = True
            else:
                logits = stack.exit_logits(rows_state)
                self.candidates[slots[pick]] = logits.topk(self.vocab, dim=-1).indices
                self.pruned[slots[pick]] = True
                full_logits = logits if not bool(pruned.any()) else None
            features[pick] = compute_features(names, logits, rows_state, rows_previous, layer, num_layers).to(features.dtype)
        over_k = torch.ones_like(pruned) if self.clusters is not None else pruned
        return features, full_logits, over_k, head_rows
