"""The oracle's scan from the last layer down gives the oracle layers of a full per-layer trace."""

from __future__ import annotations

import random

import pytest
import torch

from adainfer_lmeval.core.engine import EarlyExitEngine
from adainfer_lmeval.experiments import oracle
from adainfer_lmeval.experiments.collect import Example, trace_examples
from adainfer_lmeval.experiments.oracle import document_oracles, oracle_layer, scan_down
from adainfer_lmeval.policies.registry import build_policy


def test_scan_down_gives_oracle_layer_and_asks_no_layer_below_the_first_change():
    rng = random.Random(3)
    tables = [[rng.choice("ab") for _ in range(12)] for _ in range(200)]  # [item][layer]
    asked = []

    def answers_at(layer, items):
        asked.extend((i, layer) for i in items)
        return [tables[i][layer - 1] for i in items]

    layers = scan_down(len(tables), 12, answers_at)
    assert layers == [oracle_layer(table) for table in tables]
    # each item: the last layer, then down to its oracle layer, then the one below (where it differs)
    assert sorted(asked) == sorted((i, layer) for i, found in enumerate(layers)
                                   for layer in range(max(found - 1, 1), 13))
    assert len(asked) < 12 * len(tables)


def _examples(vocab: int, count: int, seed: int) -> list[Example]:
    """Documents with 2-4 options: multi-token continuations, and some with single-token ones
    (their rows are all the context, so they share one row)."""
    rng = random.Random(seed)
    examples = []
    for d in range(count):
        context = [rng.randrange(4, vocab) for _ in range(rng.randint(3, 12))]
        width = 1 if d % 3 == 0 else None
        continuations = [[rng.randrange(4, vocab) for _ in range(width or rng.randint(1, 4))]
                         for _ in range(rng.randint(2, 4))]
        rows = [(context + c)[:-1] for c in continuations]
        examples.append(Example("tiny", d, 0, rows, [len(context) - 1] * len(rows), continuations, gold=0))
    return examples


@pytest.mark.parametrize("architecture, head_rows, state_bytes", [
    ("llama", oracle.HEAD_ROWS, oracle.STATE_BYTES),  # one scan, one head call per layer
    ("gemma3_text", 7, 1),  # a scan after every batch, head calls split inside a row's positions
])
def test_document_oracles_match_the_full_trace(tiny_models, monkeypatch, architecture, head_rows, state_bytes):
    monkeypatch.setattr(oracle, "HEAD_ROWS", head_rows)
    monkeypatch.setattr(oracle, "STATE_BYTES", state_bytes)
    model = tiny_models[architecture]
    engine = EarlyExitEngine(model, build_policy("full", {}))
    examples = _examples(model.config.vocab_size, 40, seed=11)
    # small batches: several of them, and documents of different widths packed together
    oracles = document_oracles(engine, examples, "cpu", rows_per_batch=6, tokens_per_batch=64)
    trace_examples(engine, examples, "cpu", rows_per_batch=6, tokens_per_batch=64)
    layers = []
    for ex, found in zip(examples, oracles):
        choices = [max(range(len(lls)), key=lls.__getitem__) for lls in ex.option_ll]
        assert found.layer == oracle_layer(choices)
        assert found.choice == choices[-1]
        assert found.loglikelihoods == pytest.approx(ex.option_ll[found.layer - 1], rel=1e-5, abs=1e-5)
        layers.append(found.layer)
    assert len(set(layers)) > 1, "the tiny model's answers should settle at different layers"


def test_the_head_reads_only_the_layers_the_scan_needs(tiny_models):
    model = tiny_models["llama"]
    engine = EarlyExitEngine(model, build_policy("full", {}))
    examples = _examples(model.config.vocab_size, 30, seed=5)
    head_rows = []
    exit_logits = engine.stack.exit_logits

    def counting(hidden):
        head_rows.append(hidden.shape[0])
        return exit_logits(hidden)

    engine.stack.exit_logits = counting
    oracles = document_oracles(engine, examples, "cpu")
    num_layers = engine.num_layers
    # per document: its distinct rows' scored positions, at each layer from the last down to
    # the one below its oracle layer
    expected = 0
    for ex, found in zip(examples, oracles):
        positions = sum(len(row) - d for row, d in {tuple(r): d for r, d in zip(ex.rows, ex.decision)}.items())
        expected += positions * (num_layers - max(found.layer - 1, 1) + 1)
    assert sum(head_rows) == expected
    assert expected < num_layers * sum(len(r) - d for ex in examples for r, d in
                                       {tuple(r): d for r, d in zip(ex.rows, ex.decision)}.items())


def test_token_oracle_layers_match_top1_of_the_full_trace(tiny_models):
    from adainfer_lmeval.core.engine import ExitBatch
    from adainfer_lmeval.experiments.generation_oracle import token_oracle_layers

    model = tiny_models["qwen2"]
    engine = EarlyExitEngine(model, build_policy("full", {}))
    rng = random.Random(2)
    vocab = model.config.vocab_size
    prompts = [[rng.randrange(4, vocab) for _ in range(rng.randint(2, 9))] for _ in range(5)]
    generations = [[rng.randrange(4, vocab) for _ in range(rng.randint(1, 6))] for _ in range(5)]
    layers = token_oracle_layers(engine, prompts, generations, "cpu")
    rows = [p + g[:-1] for p, g in zip(prompts, generations)]
    tops = [[] for _ in rows]  # [row][layer] -> top-1 per scored position
    with torch.no_grad():
        for view in engine.trace(ExitBatch.from_rows(rows, [len(p) - 1 for p in prompts])):
            for i, logits in enumerate(view.logits):
                tops[i].append(logits.argmax(-1).tolist())
    seen = set()
    for per_token, per_layer, generated in zip(layers, tops, generations):
        assert len(per_token) == len(generated)
        for t in range(len(generated)):
            assert per_token[t] == oracle_layer([top[t] for top in per_layer])
            seen.add(per_token[t])
    assert len(seen) > 1


@pytest.mark.real
def test_oracle_layers_on_real_weights_match_the_full_trace():
    """SmolLM2 on ARC-Easy's first documents (the demo's task): the same oracle layers and answers."""
    import transformers

    from adainfer_lmeval.adapter.backend import AdaInferLM
    from adainfer_lmeval.experiments.collect import build_examples
    from adainfer_lmeval.experiments.task_documents import DEFAULT_FEWSHOT_SEED, load_tasks
    from adainfer_lmeval.offline.data.fetch import fetch_data
    from adainfer_lmeval.offline.models.fetch import fetch_model

    folder = str(fetch_model("smollm2-135m"))
    fetch_data()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    lm = AdaInferLM(pretrained=model, tokenizer=transformers.AutoTokenizer.from_pretrained(folder), policy="full", device="cpu")
    task = load_tasks(["arc_easy"])["arc_easy"]
    examples = build_examples(lm, task, "arc_easy", list(range(8)), 0, DEFAULT_FEWSHOT_SEED)
    oracles = document_oracles(lm.engine, examples, "cpu")
    trace_examples(lm.engine, examples, "cpu")
    for ex, found in zip(examples, oracles):
        choices = [max(range(len(lls)), key=lls.__getitem__) for lls in ex.option_ll]
        assert (found.layer, found.choice) == (oracle_layer(choices), choices[-1])
        assert found.loglikelihoods == pytest.approx(ex.option_ll[found.layer - 1], abs=1e-3)
    assert len({found.layer for found in oracles}) > 1
