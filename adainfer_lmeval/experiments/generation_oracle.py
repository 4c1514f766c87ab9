"""The oracle for generation tasks: per generated token, the earliest layer that already has it.

The task runs at full depth (greedy, lm-eval's prompts and metric). Every generated sequence
is then traced with teacher forcing: at each layer, the exit head's top-1 token at each
position that predicted a generated token. A token's oracle layer is the earliest layer after
which that top-1 equals the generated token and never changes again (the same rule as
:func:`.oracle.oracle_layer`). Exiting every token there gives the full-depth text, if the
later tokens' keys and values were exact; with CALM's propagated keys/values they are not,
so this is a bound, computed in hindsight and not timed. Token-layers saved at the oracle is
what any per-token policy could at best save on the task without changing its answers.
"""

from __future__ import annotations

import torch

from adainfer_lmeval.core.accounting import summarize
from adainfer_lmeval.core.engine import ExitBatch
from adainfer_lmeval.experiments.oracle import exit_logits_blocks, scan_down, scored_states


@torch.no_grad()
def token_oracle_layers(engine, prompts: list[list[int]], generations: list[list[int]], device) -> list[list[int]]:
    """Per sequence, per generated token: its oracle layer (teacher-forced, one batch per call).

    The head reads each token's position from the last layer down and stops at the first layer
    whose top-1 differs from the last layer's (:func:`.oracle.scan_down`)."""
    rows, decisions = [], []
    for prompt, generated in zip(prompts, generations):
        rows.append(prompt + generated[:-1])
        decisions.append(len(prompt) - 1)
    # one scored position per generated token (an empty generation: one unused), sequence after sequence
    states = scored_states(engine.stack, ExitBatch.from_rows(rows, decisions, device=device))

    def top1_at(layer: int, positions: list[int]) -> list[int]:
        hidden = states[layer - 1, torch.tensor(positions, device=states.device)]
        return [token for _, logits in exit_logits_blocks(engine.stack, hidden) for token in logits.argmax(-1).tolist()]

    layers = scan_down(states.shape[1], engine.num_layers, top1_at)
    per_sequence, start = [], 0
    for generated, row, decision in zip(generations, rows, decisions):
        per_sequence.append(layers[start : start + len(generated)])
        start += len(row) - decision
    return per_sequence


def generation_oracle_run(backend, task_name: str, limit, num_fewshot, task_manager) -> dict:
    """A run record (like :mod:`.suite` writes) for the per-token oracle of a generation task."""
    from adainfer_lmeval.adapter.harness import evaluate

    captured = []  # (context string, prompt tokens, generated tokens) of every generated row
    generate = backend.generator.generate

    def capturing(input_ids, attention_mask, *args, **kwargs):
        out = generate(input_ids, attention_mask, *args, **kwargs)
        width = input_ids.shape[1]
        contexts = backend._batch_contexts or [None] * input_ids.shape[0]
        for row in range(input_ids.shape[0]):
            prompt = input_ids[row][attention_mask[row].bool()].tolist()
            tokens = out.sequences[row, width : width + len(out.exit_layers[row])].tolist()
            captured.append((contexts[row], prompt, tokens))
        return out

    backend.generator.generate = capturing
    try:
        results = evaluate(
            model=backend, tasks=[task_name], limit=limit, num_fewshot=num_fewshot, log_samples=True,
            task_manager=task_manager, bootstrap_iters=1000,
        )
    finally:
        backend.generator.generate = generate
    records, by_context = [], {}
    for start in range(0, len(captured), 8):
        chunk = captured[start : start + 8]
        layers = token_oracle_layers(backend.engine, [p for _, p, _ in chunk], [g for _, _, g in chunk], backend.device)
        for (context, prompt, _), per_token in zip(chunk, layers):
            records.append(backend.costs.generation(len(prompt), per_token, [0] * len(per_token)))
            by_context.setdefault(context, []).append(per_token)
    for samples in results.get("samples", {}).values():
        for sample in samples:
            context = sample["arguments"][0][0]  # (context, generation kwargs) of its one request
            sample["exit_layers"] = [by_context[context].pop(0)] if by_context.get(context) else []
    stats = summarize(records)
    return {
        "results": results["results"],
        "adainfer": {"policy": {"name": "oracle"}, "num_layers": backend.engine.num_layers, "seconds": None,
                     "tasks": {task_name: stats}},
        "samples": results.get("samples", {}),
    }
