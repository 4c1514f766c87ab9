"""What one exit decision costs against one decoder layer, and how well head clusters pick a check's candidates."""

from __future__ import annotations

import torch

from adainfer_lmeval.core.continuation import carry
from adainfer_lmeval.core.features import SignalInputs, compute_features, compute_signals
from adainfer_lmeval.experiments.bench.requests import encoded
from adainfer_lmeval.experiments.bench.timing import median_seconds
from adainfer_lmeval.experiments.bench.variants import DEFAULT_CHECK_VOCAB


@torch.no_grad()
def decision_cost(stack, costs, tokens: int = 128, min_run_time: float = 1.0, batch_rows: int = 16,
                  check_vocab: int = DEFAULT_CHECK_VOCAB, options: int = 4) -> dict:
    """One exit decision (norm + head + p1/gap features at one position) vs one layer at ``tokens``,
    a pruned decision (K head rows), an answer-option margin decision (``options`` head rows:
    what ``policy=margin`` runs) and a SimLens decision at the middle layer (``policy=simlens``:
    token 0 and the decision position carried through the remaining layers, then the options'
    head rows; it costs more the earlier it runs). A pick from head clusters is timed by
    :func:`picker_recall` on real states: its cost depends on the state.
    """
    g = torch.Generator().manual_seed(0)
    device = stack.head.weight.device
    ids = torch.randint(0, stack.vocab_size, (1, tokens), generator=g).to(device)
    hidden = stack.embed(ids)
    inputs = stack.layer_inputs(hidden)
    middle = stack.num_layers // 2
    for index in range(middle):  # a hidden state from where policies decide
        hidden = stack.run_layer(index, hidden, inputs)
    state1 = hidden[:, -1].contiguous()  # [1, H]
    state_b = hidden[0, -batch_rows:].contiguous() if tokens >= batch_rows else hidden[0].repeat(batch_rows, 1)

    # The decision as the engine makes it: the head, then the policy's features (p1, gap).
    def decide(state):
        return compute_features(("p1", "gap"), stack.exit_logits(state), state, None, middle, stack.num_layers)

    candidates = torch.randint(0, stack.vocab_size, (1, check_vocab), generator=g).to(device)

    def decide_pruned(state):  # a later check under check_vocab=K: K head rows only
        return compute_features(("p1", "gap"), stack.exit_logits_over(state, candidates), state, None, middle,
                                stack.num_layers)

    option_tokens = torch.randint(0, stack.vocab_size, (1, options), generator=g).to(device)
    option_valid = torch.ones(1, options, dtype=torch.bool, device=device)

    def decide_margin(state):  # policy=margin: the options' head rows and their softmax
        logits = stack.exit_logits_over(state, option_tokens)
        return compute_signals(("margin",), SignalInputs(middle, stack.num_layers, 1, device, option_logits=logits,
                                                         option_valid=option_valid))

    def decide_simlens(states):  # policy=simlens: carry token 0 and the decision position on, then the margin
        carried = carry(stack, middle, states, [tokens - 1], [tokens - 1])
        logits = stack.exit_logits_over(carried.at(torch.zeros(1, dtype=torch.long, device=device)), option_tokens)
        return compute_signals(("continuation_margin",), SignalInputs(
            middle, stack.num_layers, 1, device, continuation_option_logits=logits, option_valid=option_valid))

    layer_s = median_seconds(lambda: stack.run_layer(middle, hidden, inputs), min_run_time)
    simlens_s = median_seconds(lambda: decide_simlens(hidden), min_run_time)
    margin_s = median_seconds(lambda: decide_margin(state1), min_run_time)
    decide1_s = median_seconds(lambda: decide(state1), min_run_time)
    decide_b_s = median_seconds(lambda: decide(state_b), min_run_time)
    pruned_s = median_seconds(lambda: decide_pruned(state1), min_run_time)
    ideal_pct = 100 * costs.head_flops(1, with_softmax=True) / costs.layer_flops(tokens)
    return {
        "check_vocab": check_vocab,
        "pruned_decision_ms": 1000 * pruned_s,
        "pruned_decision_pct_of_layer": 100 * pruned_s / layer_s,
        "options": options,
        "margin_decision_ms": 1000 * margin_s,
        "margin_decision_pct_of_layer": 100 * margin_s / layer_s,
        "simlens_layer": middle,
        "simlens_decision_ms": 1000 * simlens_s,
        "simlens_decision_pct_of_layer": 100 * simlens_s / layer_s,
        "simlens_flops_pct_of_layer": 100 * (stack.num_layers - middle) * costs.layer_flops(2) / costs.layer_flops(tokens),
        "tokens": tokens,
        "layer_ms": 1000 * layer_s,
        "decision_ms": 1000 * decide1_s,
        "decision_pct_of_layer": 100 * decide1_s / layer_s,
        f"decision_{batch_rows}rows_ms": 1000 * decide_b_s,
        f"decision_{batch_rows}rows_pct_of_layer": 100 * decide_b_s / layer_s,
        "flops_pct_of_layer": ideal_pct,
    }


def _gap(logits: torch.Tensor) -> float:
    """p1 - p2 over ``logits`` (one row), as the exit features read it."""
    return float(compute_features(("gap",), logits[None], logits[None], None, 1, 1)[0, 0])


@torch.no_grad()
def picker_recall(stack, head_clusters, requests: list, first_layer: int, k: int = DEFAULT_CHECK_VOCAB,
                  max_length: int = 2048, min_run_time: float = 1.0) -> dict:
    """How well the head clusters pick a first check's candidates, on real requests.

    Each distinct context runs at full depth once; at every layer from ``first_layer`` (where
    the policy starts consulting) to L-1, at the decision position (the context's last token),
    the picked K candidates are compared with the full head: is its top-1 among them, and how
    far the gap (p1 - p2 over K tokens) read off the picked candidates is from the one read
    off the full head's top K (what ``check_vocab`` alone computes). The picks are then timed
    again on those same states (how many rows a pick multiplies depends on the state).
    """
    groups = encoded(requests, max_length).groups
    contexts = sorted({tuple(g.rows[0].tokens[: g.rows[0].decision + 1]) for g in groups})
    hits, gap_errors, rows, states = [], [], [], []
    for ctx in contexts:
        hidden = stack.embed(torch.tensor([list(ctx)], device=stack.head.weight.device))
        inputs = stack.layer_inputs(hidden)
        for layer in range(1, stack.num_layers):
            hidden = stack.run_layer(layer - 1, hidden, inputs)
            if layer < first_layer:
                continue
            state = hidden[:, -1].contiguous()
            states.append(state)
            top = stack.exit_logits(state)[0].topk(k)
            ids, logits, used = head_clusters.pick(stack, state, k)
            hits.append(int(top.indices[0]) in set(ids[0].tolist()))
            gap_errors.append(abs(_gap(logits[0]) - _gap(top.values)))
            rows.append(int(used[0]))
    pick_s = median_seconds(lambda: [head_clusters.pick(stack, state, k) for state in states], min_run_time) / len(states)
    return {"clusters": head_clusters.clusters, "probes": head_clusters.probes,
            "first_layer": first_layer, "checks": len(hits), "contexts": len(contexts), "pick_ms": 1000 * pick_s,
            "top1_recall": sum(hits) / len(hits), "mean_abs_gap_error": sum(gap_errors) / len(gap_errors),
            "gap_error_over_0.05": sum(e > 0.05 for e in gap_errors) / len(gap_errors),
            "mean_head_rows": sum(rows) / len(rows), "head_rows_pct_of_vocab": 100 * sum(rows) / len(rows) / stack.vocab_size}
