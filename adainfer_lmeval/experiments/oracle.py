"""The oracle exit: the earliest layer after which a document's answer never changes.

No policy can do better without changing answers, so it bounds what early exit can save on a
task at full-depth accuracy. It needs hindsight (every layer's answer), so it is computed from
a forward pass over the same documents and prompts the evaluation used (the first ``limit``
documents, as lm-eval's ``--limit`` takes them), not by the engine's exit pass. The answer at a
layer is the option with the highest loglikelihood there (lm-eval's ``acc``).

The forward pass keeps every layer's hidden states at the scored positions; the head then reads
them from the last layer down, and a document's scan ends at the first layer whose answer
differs from the last layer's: layers below it cannot move its oracle layer, so the head (the
largest matmul of a small model, applied per scored position) runs at a few layers per
document instead of at all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from adainfer_lmeval.adapter import request_encoding
from adainfer_lmeval.core.accounting import summarize
from adainfer_lmeval.core.engine import ExitBatch
from adainfer_lmeval.experiments.collect import Example, build_examples
from adainfer_lmeval.experiments.task_documents import DEFAULT_FEWSHOT_SEED, load_tasks

HEAD_ROWS = 256  # positions per head call: a matmul that is not bound by reading the head, a bounded logits block
STATE_BYTES = 256 << 20  # every-layer hidden states kept at once: documents wait for the head in sets this big


def oracle_layer(choices_per_layer: list[int]) -> int:
    """1-based layer after which the choice equals the last layer's and never changes again."""
    final = choices_per_layer[-1]
    layer = len(choices_per_layer)
    while layer > 1 and choices_per_layer[layer - 2] == final:
        layer -= 1
    return layer


def scan_down(count: int, num_layers: int, answers_at: Callable[[int, list[int]], Sequence]) -> list[int]:
    """Each of ``count`` items' :func:`oracle_layer`, asking for answers from the last layer down.

    ``answers_at(layer, items)`` gives the answers (any comparable values) of ``items`` (indices)
    at ``layer``. An item is asked about no layer below the first one where its answer differs
    from the last layer's.
    """
    final = list(answers_at(num_layers, list(range(count))))
    layers = [num_layers] * count
    scanning = list(range(count))
    for layer in range(num_layers - 1, 0, -1):
        if not scanning:
            break
        answers = answers_at(layer, scanning)
        scanning = [i for i, answer in zip(scanning, answers) if answer == final[i]]
        for i in scanning:
            layers[i] = layer
    return layers


@torch.no_grad()
def scored_states(stack, batch: ExitBatch) -> torch.Tensor:
    """[layers, scored positions, hidden]: every layer's hidden states at the rows' scored
    positions (row after row, each from its decision position to its end), the head not applied."""
    width = int(batch.lengths.max())
    hidden = stack.embed(batch.input_ids[:, :width])
    inputs = stack.layer_inputs(hidden)
    spans = list(zip(batch.decision_positions.tolist(), batch.lengths.tolist()))
    per_layer = []
    for layer in range(stack.num_layers):
        hidden = stack.run_layer(layer, hidden, inputs)
        per_layer.append(torch.cat([hidden[i, start:end] for i, (start, end) in enumerate(spans)]))
    return torch.stack(per_layer)


def exit_logits_blocks(stack, hidden: torch.Tensor):
    """(first position, float32 exit logits) of ``hidden`` [positions, hidden], HEAD_ROWS at a time."""
    for start in range(0, hidden.shape[0], HEAD_ROWS):
        yield start, stack.exit_logits(hidden[start : start + HEAD_ROWS]).float()


def token_logprobs(stack, hidden: torch.Tensor, at: list[int], tokens: list[int]) -> torch.Tensor:
    """[pairs]: log p(``tokens[k]``) under the exit head at position ``at[k]`` of ``hidden``:
    the token's logit minus the logsumexp of the position's logits, nothing else kept."""
    at_t = torch.tensor(at, device=hidden.device)
    tokens_t = torch.tensor(tokens, device=hidden.device)
    normalizer = torch.empty(hidden.shape[0], device=hidden.device)
    token_logits = torch.empty(len(at), device=hidden.device)
    for start, logits in exit_logits_blocks(stack, hidden):
        normalizer[start : start + logits.shape[0]] = torch.logsumexp(logits, dim=-1)
        inside = (at_t >= start) & (at_t < start + logits.shape[0])
        token_logits[inside] = logits[at_t[inside] - start, tokens_t[inside]]
    return token_logits - normalizer[at_t]


@dataclass
class DocumentOracle:
    layer: int  # the oracle layer (1-based)
    loglikelihoods: list[float]  # per option, at the oracle layer
    choice: int  # the last layer's (full depth's) chosen option


def _choice(loglikelihoods: list[float]) -> int:
    return max(range(len(loglikelihoods)), key=loglikelihoods.__getitem__)


class _WaitingDocuments:
    """Documents whose every-layer hidden states are kept until the head scans them, and where
    their rows' scored positions lie among those states."""

    def __init__(self):
        self.examples: list[Example] = []
        self.row_spans: list[list[tuple[int, int]]] = []  # per document, per distinct row: (first position, count)
        self.option_rows: list[list[int]] = []  # per document, per option: its row among the document's
        self.states: list[torch.Tensor] = []  # per packed batch: [layers, positions, hidden]
        self.positions = 0

    @property
    def bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.states)

    def add(self, engine_batch, options: list[tuple[Example, int]], states: torch.Tensor) -> None:
        """A packed batch (one group per document) and its :func:`scored_states`."""
        for group in engine_batch.groups:  # rows in batch order, so their positions follow on
            spans, row_of = [], {}
            for row in group.rows:
                for i in row.requests:
                    row_of[options[i][1]] = len(spans)
                spans.append((self.positions, len(row.tokens) - row.decision))
                self.positions += spans[-1][1]
            example = options[group.rows[0].requests[0]][0]
            self.examples.append(example)
            self.row_spans.append(spans)
            self.option_rows.append([row_of[j] for j in range(len(example.rows))])
        self.states.append(states)

    def loglikelihoods(self, stack, states: torch.Tensor, documents: list[int]) -> list[list[float]]:
        """Per document, per option: its continuation's summed loglikelihood given ``states`` (one
        layer's [positions, hidden]), the head applied once per distinct row of these documents."""
        positions, firsts = [], []  # firsts: per document, per row, its first index in ``positions``
        for d in documents:
            firsts.append([])
            for start, count in self.row_spans[d]:
                firsts[-1].append(len(positions))
                positions.extend(range(start, start + count))
        at, tokens, lengths = [], [], []
        for d, first in zip(documents, firsts):
            for continuation, r in zip(self.examples[d].continuations, self.option_rows[d]):
                at.extend(range(first[r], first[r] + len(continuation)))
                tokens.extend(continuation)
                lengths.append(len(continuation))
        hidden = states[torch.tensor(positions, device=states.device)]
        sums = iter(float(s.sum()) for s in token_logprobs(stack, hidden, at, tokens).split(lengths))
        return [[next(sums) for _ in self.option_rows[d]] for d in documents]

    def scan(self, stack) -> dict[int, DocumentOracle]:
        """{id(example): its oracle}, the head reading from the last layer down (:func:`scan_down`)."""
        states = torch.cat(self.states, dim=1)
        seen: dict[tuple[int, int], list[float]] = {}  # (document, layer) -> its options' loglikelihoods

        def choices_at(layer: int, documents: list[int]) -> list[int]:
            for d, lls in zip(documents, self.loglikelihoods(stack, states[layer - 1], documents)):
                seen[(d, layer)] = lls
            return [_choice(seen[(d, layer)]) for d in documents]

        last = stack.num_layers
        layers = scan_down(len(self.examples), last, choices_at)
        return {id(example): DocumentOracle(layer, seen[(d, layer)], _choice(seen[(d, last)]))
                for d, (example, layer) in enumerate(zip(self.examples, layers))}


@torch.no_grad()
def document_oracles(engine, examples: list[Example], device, rows_per_batch=16, tokens_per_batch=4096) -> list[DocumentOracle]:
    """Each example's oracle layer, its options' loglikelihoods there and full depth's choice.

    The forward pass packs batches as :func:`.collect.trace_examples` does (one group per
    document; identical rows, e.g. single-token options, run once), so its hidden states are
    the trace's. The head scans the documents of several batches together (up to STATE_BYTES of
    kept states), so that each of its calls multiplies many positions at once.
    """
    stack = engine.stack
    options = [(ex, j) for ex in examples for j in range(len(ex.rows))]
    groups = request_encoding.group_rows([ex.rows[j] for ex, j in options], [ex.decision[j] for ex, j in options],
                                         keys=[id(ex) for ex, _ in options])
    found: dict[int, DocumentOracle] = {}
    waiting = _WaitingDocuments()
    for engine_batch in request_encoding.pack(groups, rows_per_batch, tokens_per_batch, count=lambda g: g.requests):
        batch = ExitBatch.from_rows(engine_batch.tokens, engine_batch.decisions, engine_batch.row_groups, device=device)
        waiting.add(engine_batch, options, scored_states(stack, batch))
        if waiting.bytes >= STATE_BYTES:
            found.update(waiting.scan(stack))
            waiting = _WaitingDocuments()
    if waiting.examples:
        found.update(waiting.scan(stack))
    return [found[id(ex)] for ex in examples]


def oracle_run(backend, task_name: str, limit: float | None, num_fewshot: int | None) -> dict:
    """A run record (like :mod:`.suite` writes) for the oracle on this task's first documents."""
    leaves = load_tasks([task_name])
    results, samples, records_by_task = {}, {}, {}
    every = []
    for name, task in leaves.items():
        total = len(task.eval_docs)
        count = total if limit is None else (math.ceil(total * limit) if limit < 1 else min(int(limit), total))
        shots = num_fewshot if num_fewshot is not None else (task.get_config("num_fewshot") or 0)
        examples = build_examples(backend, task, name, list(range(count)), shots, DEFAULT_FEWSHOT_SEED)
        records, rows = [], []
        for ex, oracle in zip(examples, document_oracles(backend.engine, examples, backend.device)):
            for row, cont in zip(ex.rows, ex.continuations):
                records.append(backend.costs.request(tokens=len(row), exit_layer=oracle.layer, scored=len(cont), checks=0))
            rows.append({"doc_id": ex.doc_id, "target": ex.gold, "loglikelihoods": oracle.loglikelihoods,
                         "exit_layers": [oracle.layer] * len(ex.rows), "acc": float(oracle.choice == ex.gold)})
        accuracy = sum(r["acc"] for r in rows) / max(len(rows), 1)
        results[name] = {"acc,none": accuracy}
        samples[name] = rows
        records_by_task[name] = records
        every.extend(records)
    if task_name not in results:  # a group: pooled over its subtasks
        pooled = [r for rows in samples.values() for r in rows]
        results[task_name] = {"acc,none": sum(r["acc"] for r in pooled) / max(len(pooled), 1)}
    stats = {name: summarize(found) for name, found in records_by_task.items()}
    stats[task_name] = summarize(every)
    return {
        "results": results,
        "adainfer": {"policy": {"name": "oracle"}, "num_layers": backend.engine.num_layers, "seconds": None, "tasks": stats},
        "samples": samples,
    }
