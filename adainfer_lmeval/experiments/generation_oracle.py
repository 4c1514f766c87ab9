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
from adainfer_lmeval.experiments.oracle import oracle_layer


def token_oracle_layers(engine, prompts: list[list[int]], generations: list[list[int]], device) -> list[list[int]]:
    """Per sequence, per generated token: its oracle layer (teacher-forced trace, one batch per call)."""
    rows, decisions = [], []
    for prompt, generated in zip(prompts, generations):
        rows.append(prompt + generated[:-1])
        decisions.append(len(prompt) - 1)
    per_layer_top1: list[list[torch.Tensor]] = [[] for _ in rows]
    for view in engine.trace(ExitBatch.from_rows(rows, decisions, device=device)):
        for i, logits in enumerate(view.logits):
            per_layer_top1[i].append(logits.argmax(-1).cpu())
    layers = []
    for generated, tops in zip(generations, per_layer_top1):
        table = torch.stack(tops)  # [L, tokens]
        layers.append([oracle_layer(table[:, t].tolist()) for t in range(len(generated))])
    return layers


def generation_oracle_run(backend, task_name: str, limit, num_fewshot, task_manager) -> dict:
    """A run record (like :mod:`.suite` writes) for the per-token oracle of a generation task."""
    import lm_eval

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
        results = lm_eval.simple_evaluate(
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
