"""The SimLens continuation in the study: what the collector records per layer, and the policies
that answer with it (exit layers, answers and costs).

The recorded read-out is checked against the model read directly (its own forward's hidden
states carried on by ``DecoderStack.continue_from``, one option row at a time); the policies
against a hand computation of the semantics: stop at the first layer >= min_layer whose score
reaches the threshold, answer with the continuation there (at full depth as usual), pay for the
checks at every consulted layer and the exit carry, in tokens x remaining layers over the
group's computed rows' tokens.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adainfer_lmeval.adapter import request_encoding
from adainfer_lmeval.core.architectures import DecoderStack
from adainfer_lmeval.core.engine import EarlyExitEngine
from adainfer_lmeval.core.features import FEATURE_NAMES
from adainfer_lmeval.experiments import study_policies as sp
from adainfer_lmeval.experiments import study_tasks as stt
from adainfer_lmeval.experiments.calibration import calibrate
from adainfer_lmeval.experiments.collect import Example, examples_table, trace_examples
from adainfer_lmeval.experiments.collect_continuation import (
    carried_tokens, continuation_path, continuation_table, similar_widths, trace_continuations,
)
from adainfer_lmeval.experiments.study_evaluation import run_study
from adainfer_lmeval.experiments.training_data import ContinuationReadout, Data
from adainfer_lmeval.policies import build_policy

# Per document: its answer options; they first differ at 1, 0, 2, 0, 0 (one a prefix of another).
DOCUMENTS = [[[7, 8], [7, 9, 10], [7, 11]], [[12], [13, 14], [15, 16, 17]], [[20, 21, 22], [20, 21, 23]], [[40], [41]],
             [[50, 51], [50, 51, 52]]]
CONTEXT_LENGTHS = [5, 9, 4, 7, 6]


def _examples(vocab: int) -> list[Example]:
    g = torch.Generator().manual_seed(5)
    examples = []
    for doc, (options, length) in enumerate(zip(DOCUMENTS, CONTEXT_LENGTHS)):
        context = torch.randint(70, vocab, (length,), generator=g).tolist()
        encoded = request_encoding.encode([(context, option) for option in options], max_length=64)
        examples.append(Example("toy", doc, 0, encoded.rows, encoded.decisions, encoded.continuations, 0))
    return examples


def _direct(model, stack: DecoderStack, ex: Example, j: int) -> tuple[list[float], list[float]]:
    """Option ``j``'s (margin logit, summed loglikelihood) per layer, from its own row alone: the
    model's forward, its layer-l states carried on by continue_from (layer L: the model's logits)."""
    row, decision = ex.rows[j], ex.decision[j]
    ids = torch.tensor([row])
    start = [0] if decision > 0 else []
    scored = start + list(range(decision, len(row)))
    margin = start + list(range(decision, decision + ex.margin_offset + 1))
    continuation = torch.tensor(ex.continuations[j])
    out = model(ids, output_hidden_states=True)
    logits_at, lls = [], []
    for layer in range(1, stack.num_layers + 1):
        if layer == stack.num_layers:  # hidden_states[L] is already through the final norm
            row_logits = out.logits[0, decision:].float()
            margin_logits = row_logits[ex.margin_offset]
        else:
            hidden = out.hidden_states[layer]
            carried = stack.continue_from(layer, hidden[:, scored], torch.tensor([scored]))
            row_logits = stack.exit_logits(carried[0, len(start):]).float()
            short = stack.continue_from(layer, hidden[:, margin], torch.tensor([margin]))
            margin_logits = stack.exit_logits(short[0, -1]).float()
        logits_at.append(float(margin_logits[ex.continuations[j][ex.margin_offset]]))
        lls.append(float(F.log_softmax(row_logits, -1).gather(1, continuation[:, None]).sum()))
    return logits_at, lls


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral"])
def test_the_recorded_continuation_is_the_models_own(tiny_models, arch):
    model = tiny_models[arch]
    stack = DecoderStack(model)
    examples = _examples(stack.vocab_size)
    assert [ex.margin_offset for ex in examples] == [1, 0, 2, 0, 0]
    reads = trace_continuations(stack, examples, "cpu", rows_per_batch=5)  # several batches
    with torch.no_grad():
        for ex in examples:
            logits, lls = reads[id(ex)]
            assert len(logits) == len(lls) == stack.num_layers
            for j in range(len(ex.rows)):
                direct_logits, direct_lls = _direct(model, stack, ex, j)
                np.testing.assert_allclose([layer[j] for layer in logits], direct_logits, atol=1e-4, rtol=1e-4)
                np.testing.assert_allclose([layer[j] for layer in lls], direct_lls, atol=1e-4, rtol=1e-4)


def test_rows_are_carried_in_chunks_of_similar_widths():
    # widest first; a row joins a chunk while padding to the chunk's widest adds at most 25%
    assert similar_widths([2, 10, 9, 3]) == [[1, 2], [3, 0]]
    assert similar_widths([2, 2, 2]) == [[0, 1, 2]]
    assert similar_widths([40, 4]) == [[0], [1]]


def test_the_continuation_from_the_last_layer_is_the_lens(tiny_models):
    model = tiny_models["qwen2"]
    stack = DecoderStack(model)
    examples = _examples(stack.vocab_size)
    reads = trace_continuations(stack, examples, "cpu")
    trace_examples(EarlyExitEngine(model, build_policy("full", {})), examples, "cpu")
    for ex in examples:
        logits, lls = reads[id(ex)]
        np.testing.assert_allclose(logits[-1], ex.option_logits[-1], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(lls[-1], ex.option_ll[-1], atol=1e-5, rtol=1e-5)
        # below the last layer the continuation is not the lens (the tiny model's layers do something)
        assert not np.allclose(lls[0], ex.option_ll[0], atol=1e-3)


def test_carried_tokens_by_hand():
    examples = _examples(300)
    c = CONTEXT_LENGTHS
    costs = [carried_tokens(ex) for ex in examples]
    # doc 0: options [7,8] and [7,11] share the row context+[7] (2 scored), [7,9,10] has context+[7,9] (3 scored)
    assert costs[0] == {"check_tokens": 1 + 1 + 1, "exit_tokens": (1 + 2) + (1 + 3), "reused_tokens": 0,
                        "row_tokens": (c[0] + 1) + (c[0] + 2)}
    # doc 1: the speaker [12] is scored at its decision alone and the options differ at once: reused
    assert costs[1] == {"check_tokens": 2, "exit_tokens": 2 + 3 + 4, "reused_tokens": 2,
                        "row_tokens": c[1] + (c[1] + 1) + (c[1] + 2)}
    # doc 2: [20,21,22] and [20,21,23] differ only in their last token: one row, context+[20,21]
    assert costs[2] == {"check_tokens": 1 + 2 + 1, "exit_tokens": 1 + 3, "reused_tokens": 0, "row_tokens": c[2] + 2}
    # doc 3: single-token options share one row (the context): the check's carry is the exit's
    assert costs[3] == {"check_tokens": 2, "exit_tokens": 2, "reused_tokens": 2, "row_tokens": c[3]}
    # doc 4: one option a prefix of the other: margin at the decision, the speaker has 2 scored positions
    assert costs[4] == {"check_tokens": 2, "exit_tokens": 3 + 4, "reused_tokens": 0, "row_tokens": (c[4] + 1) + (c[4] + 2)}


def test_schema_2_collections_load_with_and_without_the_continuation(tiny_models, tmp_path):
    import json

    import pyarrow.parquet as pq

    model = tiny_models["llama"]
    examples = _examples(model.config.vocab_size)
    trace_examples(EarlyExitEngine(model, build_policy("full", {})), examples, "cpu")
    for ex in examples:
        ex.source = "sst2"
    task = stt.StudyTask.parse("sst2")
    path = stt.collection_path(tmp_path, "toy", task, "test")
    path.parent.mkdir(parents=True)
    meta = {"schema_version": 2, "feature_names": list(FEATURE_NAMES), "data_sha256": "abc", "model": {"num_layers": 4}}
    pq.write_table(examples_table(examples).replace_schema_metadata({b"adainfer": json.dumps(meta).encode()}), path)
    for role in stt.ROLES:  # load_collections reads both roles
        if role != "test":
            stt.collection_path(tmp_path, "toy", task, role).write_bytes(path.read_bytes())
    old = stt.load_collections(tmp_path, [stt.StudyModel("toy", 4, (task,))])[("toy", "sst2@0", "test")]
    assert old.continuation is None and old.num_layers == 4
    assert not sp.has_readout("simlens", old) and sp.has_readout("margin", old)

    reads = trace_continuations(DecoderStack(model), examples, "cpu")
    written = {"continuation_schema_version": 1, "data_sha256": "abc"}
    table = continuation_table(examples, reads).replace_schema_metadata({b"adainfer": json.dumps(written).encode()})
    pq.write_table(table, continuation_path(path))
    new = stt.load_collections(tmp_path, [stt.StudyModel("toy", 4, (task,))])
    loaded = new[("toy", "sst2@0", "test")]
    assert new[("toy", "sst2@0", "train")].continuation is None  # no read-out beside that one
    np.testing.assert_array_equal(loaded.feats, old.feats)  # the collection itself is read as before
    readout = loaded.continuation
    assert readout.choice.tolist() == [[int(np.argmax(layer)) for layer in reads[id(ex)][1]] for ex in examples]
    assert readout.row_tokens.tolist() == [carried_tokens(ex)["row_tokens"] for ex in examples]
    probs = torch.softmax(torch.tensor(reads[id(examples[2])][0][1]), -1)  # doc 2 at layer 2: two options
    assert readout.margin[2, 1] == pytest.approx(float(probs.max() - probs.min()), abs=1e-6)

    meta["data_sha256"] = "another collection"
    pq.write_table(examples_table(examples).replace_schema_metadata({b"adainfer": json.dumps(meta).encode()}), path)
    assert stt.load_collections(tmp_path, [stt.StudyModel("toy", 4, (task,))])[("toy", "sst2@0", "test")].continuation is None


# ---- the policies, on synthetic read-outs -------------------------------------------------------

SIGNAL_NAMES = FEATURE_NAMES + ("margin",)


def synthetic(source: str, n: int, L: int, seed: int) -> Data:
    """Documents whose lens answer settles late and whose continuation answer settles earlier."""
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 2, n)
    final = np.where(rng.random(n) < 0.85, gold, 1 - gold)
    lens_settles = rng.integers(2, L + 1, n)
    continuation_settles = np.maximum(1, lens_settles - rng.integers(0, 3, n))
    layers = np.arange(1, L + 1)
    noise = rng.integers(0, 2, (n, L))
    choice = np.where(layers >= lens_settles[:, None], final[:, None], noise)
    continuation_choice = np.where(layers >= continuation_settles[:, None], final[:, None], 1 - noise)
    feats = rng.random((n, L, len(SIGNAL_NAMES)))
    feats[:, :, -1] = np.where(layers >= lens_settles[:, None], 0.6, 0.1) + 0.3 * rng.random((n, L))
    continuation_margin = np.where(layers >= continuation_settles[:, None], 0.6, 0.1) + 0.3 * rng.random((n, L))
    row_tokens = rng.integers(20, 200, n).astype(float)
    check = rng.integers(2, 4, n).astype(float)
    exit_tokens = check + rng.integers(0, 6, n)
    reused = np.where(exit_tokens == check, check, 0.0)
    readout = ContinuationReadout(continuation_margin, continuation_choice, check, exit_tokens, reused, row_tokens)
    meta = {"model": {"name": "toy", "num_layers": L}, "parts": []}
    return Data(feats, choice, choice, gold, gold, [f"{source}:{i}" for i in range(n)], [source] * n, np.zeros(n, dtype=int),
                np.full(n, 2), meta, SIGNAL_NAMES, readout)


def hand_outcome(policy: str, data: Data, threshold: float, min_layer: int):
    """(exit layers, answers, read-out cost in layer equivalents) by the semantics, one document at a time."""
    c, L = data.continuation, data.num_layers
    exits, answers, costs = [], [], []

    def runs(i, layer):  # the layers a carry from `layer` runs through
        return L - layer if c.carry_layers is None else c.carry_layers[i, layer - 1]

    for i in range(len(data.keys)):
        score = {"simlens": c.margin[i], "margin_simlens": data.feats[i, :, -1], "simlens_static": np.ones(L)}[policy]
        exit_layer = next((layer for layer in range(min_layer, L) if score[layer - 1] >= threshold), L)
        tokens = 0.0
        # a check at every consulted layer, up to and with the exit layer (from min_layer = L,
        # the never-exit point, none: the backend runs it as policy=full)
        if policy == "simlens":
            tokens += sum(c.check_tokens[i] * runs(i, layer) for layer in range(min_layer, min(exit_layer, L - 1) + 1))
        if exit_layer < L:
            tokens += (c.exit_tokens[i] - (c.reused_tokens[i] if policy == "simlens" else 0)) * runs(i, exit_layer)
        exits.append(exit_layer)
        answers.append(c.choice[i, exit_layer - 1] if exit_layer < L else data.choice[i, L - 1])
        costs.append(tokens / c.row_tokens[i])
    return np.array(exits), np.array(answers), np.array(costs)


@pytest.mark.parametrize("last_layers", [None, 2])
@pytest.mark.parametrize("policy", sp.CONTINUATION_POLICIES)
def test_document_outcomes_by_hand(policy, last_layers):
    data = synthetic("sst2", 40, 7, 1)
    if last_layers is not None:  # a read-out that carries through the model's last layers only
        L = data.num_layers
        runs = np.minimum(last_layers, L - np.arange(1, L + 1)).astype(float)
        data = replace(data, continuation=replace(data.continuation, carry_layers=np.tile(runs, (len(data.keys), 1))))
    for threshold, min_layer in ((0.5, 1), (0.65, 3), (0.85, 2), (0.0, data.num_layers)):
        point = {"threshold": threshold, "min_layer": min_layer}
        outcome = sp.document_outcomes(policy, None, data, point)
        exits, answers, costs = hand_outcome(policy, data, threshold, min_layer)
        assert outcome.exits.tolist() == exits.tolist()
        assert outcome.answers.tolist() == answers.tolist()
        np.testing.assert_allclose(outcome.extra_layers, costs, rtol=1e-12)
        if min_layer == data.num_layers:  # even at threshold 0: full depth, read as usual, nothing consulted
            assert (outcome.exits == data.num_layers).all() and (outcome.answers == data.choice[:, -1]).all()
            assert (outcome.extra_layers == 0).all()


def test_calibration_compares_the_continuations_answers_and_counts_its_cost():
    # every lens answer below layer L differs from full depth, every continuation answer agrees
    data = synthetic("sst2", 60, 6, 2)
    L = data.num_layers
    data.choice[:, : L - 1] = 1 - data.choice[:, [L - 1]]
    data.continuation.choice[:] = data.choice[:, [L - 1]]
    scores = np.ones((60, L - 1))
    lens = calibrate(data, scores, criterion="agreement", tolerance=0.0)
    assert lens["min_layer"] == L and lens["mean_exit_layer"] == L  # the lens never agrees: the never-exit point
    cheap = calibrate(data, scores, criterion="agreement", tolerance=0.0, readout=sp.policy_readout("simlens_static", data))
    assert cheap["min_layer"] == 1 and cheap["changed_rate"] == 0.0
    expected = np.mean(data.continuation.exit_tokens / data.continuation.row_tokens) * (L - 1)
    assert cheap["continuation_layers"] == pytest.approx(expected)
    # a continuation that carries the whole document costs what the layers it skips cost: no saving
    data.continuation.exit_tokens[:] = data.continuation.row_tokens
    costly = calibrate(data, scores, criterion="agreement", tolerance=0.0, readout=sp.policy_readout("simlens_static", data))
    assert costly["mean_exit_layer"] == L and costly["continuation_layers"] == 0.0


def test_run_study_continuation_rows_by_hand():
    tasks = [stt.StudyTask.parse(t) for t in ("sst2", "arc_easy")]
    collections = {("toy", task.label, role): synthetic(task.source(role), 50, 8, 10 * t + r)
                   for t, task in enumerate(tasks) for r, role in enumerate(stt.ROLES)}
    # one training collection without the read-out: the fits that train on it are left out
    collections[("toy", "arc_easy@0", "train")].continuation = None
    result = run_study(collections, [stt.StudyModel("toy", 50, tuple(tasks))], sp.CalibrationRules(inner_folds=2),
                       policies=("margin", *sp.CONTINUATION_POLICIES), log=lambda m: None)
    rows = [r for r in result["rows"] if r["policy"] in sp.CONTINUATION_POLICIES]
    assert {(r["task"], r["setting"]) for r in rows} == {("sst2", "intra"), ("arc_easy", "inter-task")}
    assert {(r["task"], r["setting"]) for r in result["rows"] if r["policy"] == "margin"} == {
        ("sst2", "intra"), ("sst2", "inter-task"), ("arc_easy", "intra"), ("arc_easy", "inter-task")}
    L = 8
    assert any(r["mean_exit_layer"] < L for r in rows)
    for r in rows:
        test = collections[("toy", f"{r['task']}@0", "test")]
        exits, answers, costs = hand_outcome(r["policy"], test, r["threshold"], r["min_layer"])
        assert r["mean_exit_layer"] == pytest.approx(exits.mean())
        assert r["acc"] == pytest.approx((answers == test.gold).mean())
        assert r["agreement"] == pytest.approx((answers == test.choice[:, -1]).mean())
        assert r["layers_saved"] == pytest.approx(1 - (exits + costs).mean() / L)
        assert r["continuation_share"] == pytest.approx(costs.mean() / L)
        assert r["layers_saved_se"] == pytest.approx(np.std(1 - (exits + costs) / L, ddof=1) / np.sqrt(len(exits)))
    margin = [r for r in result["rows"] if r["policy"] == "margin"]
    assert all(r["continuation_layers"] == 0.0 for r in margin)
