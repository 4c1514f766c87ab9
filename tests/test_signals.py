"""Exit signals as named features: the registry, the answer-option signals and ``policy=margin``,
against references built from the model's own hidden states, norm and head."""

from __future__ import annotations

import math

import pytest
import torch

from adainfer_lmeval.adapter import request_encoding
from adainfer_lmeval.core import features as signals
from adainfer_lmeval.core.accounting import CostModel
from adainfer_lmeval.core.architectures import DecoderStack
from adainfer_lmeval.core.engine import EarlyExitEngine, ExitBatch
from adainfer_lmeval.core.exit_checks import ExitCheckConfig
from adainfer_lmeval.core.features import FEATURE_NAMES, compute_features, signal
from adainfer_lmeval.core.generation import EarlyExitGenerator
from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.policies import ExitPolicy, build_policy

LAYERS = 4  # the tiny models' depth (conftest)

# Per group: its answer options (continuation tokens), where they first differ and their tokens there.
OPTIONS = [
    ([[7, 8], [7, 9, 10], [7, 11]], 1, [8, 9, 11]),  # share their first token
    ([[12], [13, 14], [15, 16, 17]], 0, [12, 13, 15]),  # differ at once, multi-token
    ([[20, 21, 22], [20, 21, 23]], 2, [22, 23]),  # share two tokens
    ([[30, 31]], 0, [30]),  # one option: nothing to choose
    ([[40], [41]], 0, [40, 41]),  # single-token options: one shared row
]


def _pairs(vocab: int, seed: int = 0):
    """(context, continuation) pairs: one random context per group of OPTIONS, and each group's key."""
    g = torch.Generator().manual_seed(seed)
    pairs, keys = [], []
    for key, (options, _, _) in enumerate(OPTIONS):
        context = torch.randint(50, vocab, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
        for option in options:
            pairs.append((context, option))
            keys.append(key)
    return pairs, keys


def _batch(vocab: int, seed: int = 0):
    """The engine batch of :func:`_pairs` (one group per OPTIONS entry) and its EngineBatch."""
    pairs, keys = _pairs(vocab, seed)
    encoded = request_encoding.encode(pairs, max_length=64, keys=keys)
    (engine_batch,) = list(encoded.batches(rows_per_batch=64))
    batch = ExitBatch.from_rows(engine_batch.tokens, engine_batch.decisions, engine_batch.row_groups,
                                options=engine_batch.option_tokens, margin_offsets=engine_batch.margin_offsets)
    return batch, engine_batch, pairs


def _group_index(engine_batch, pairs):
    """Per group of the batch: its index in OPTIONS (found by its first request's continuation)."""
    firsts = [options[0] for options, _, _ in OPTIONS]
    return [firsts.index(pairs[group.rows[0].requests[0]][1]) for group in engine_batch.groups]


def _reference_option_logits(model, row: list[int], position: int, tokens: list[int]) -> torch.Tensor:
    """[LAYERS - 1, K] float64: each option token's logit at ``position`` from the hidden states of
    layers 1..L-1, through the model's own final norm and lm_head (and Gemma's soft-capping)."""
    with torch.no_grad():
        hidden = model(torch.tensor([row]), output_hidden_states=True).hidden_states
        out = []
        for layer in range(1, LAYERS):
            logits = model.lm_head(model.model.norm(hidden[layer][0, position]))
            cap = getattr(model.config, "final_logit_softcapping", None)
            if cap is not None:
                logits = torch.tanh(logits / cap) * cap
            out.append(logits[tokens].double())
    return torch.stack(out)


def _reference_signals(logits: torch.Tensor):
    """(margin, option_change, option_kl) [LAYERS - 1] over consecutive layers' option logits."""
    probs = torch.softmax(logits, dim=-1)
    top = probs.sort(dim=-1, descending=True).values
    if logits.shape[1] < 2:
        nan = torch.full((len(logits),), math.nan, dtype=torch.float64)
        return nan, nan, nan
    margin = top[:, 0] - top[:, 1]
    change = torch.full_like(margin, math.nan)
    kl = torch.full_like(margin, math.nan)
    change[1:] = (probs[1:].argmax(-1) != probs[:-1].argmax(-1)).double()
    kl[1:] = (probs[:-1] * (probs[:-1].log() - probs[1:].log())).sum(-1)
    return margin, change, kl


class Recorder(ExitPolicy):
    """Consults every layer, never stops, and keeps the signals it saw."""

    def __init__(self, features=("margin", "option_change", "option_kl"), min_layer: int = 1):
        self.features, self.min_layer = tuple(features), min_layer
        self.seen = {}

    def decide(self, layer, num_layers, history):
        self.seen[layer] = history[:, layer].clone()
        return torch.zeros(history.shape[0], dtype=torch.bool)


def _reference_per_group(model, engine_batch, pairs):
    """Per group of the batch: (margin, option_change, option_kl) over layers 1..L-1, from the model."""
    out = []
    for group, index in zip(engine_batch.groups, _group_index(engine_batch, pairs)):
        _, offset, tokens = OPTIONS[index]
        row = group.rows[0]
        out.append(_reference_signals(_reference_option_logits(model, row.tokens, row.decision + offset, tokens)))
    return out


def _never_reached(model, engine_batch, pairs) -> float:
    """A margin threshold above every group's margin at every layer."""
    best = max(float(m.max()) for m, _, _ in _reference_per_group(model, engine_batch, pairs) if not m.isnan().all())
    assert best < 1.0, "some margin saturates at 1: no threshold stays above it"
    return (best + 1.0) / 2


# ---- the option signals against the model's own forward ----------------------------------------


def test_groups_carry_their_options_at_the_margin_position(tiny_models):
    batch, engine_batch, pairs = _batch(tiny_models["llama"].config.vocab_size)
    expected = [OPTIONS[i] for i in _group_index(engine_batch, pairs)]
    assert engine_batch.margin_offsets == [offset for _, offset, _ in expected]
    assert engine_batch.option_tokens == [tokens for _, _, tokens in expected]
    assert batch.options.valid.sum(-1).tolist() == [len(tokens) for _, _, tokens in expected]
    # without continuations (group_rows alone) there are no options, and the batch has none
    bare = request_encoding.EngineBatch(request_encoding.group_rows(engine_batch.tokens, engine_batch.decisions))
    assert bare.option_tokens is None and bare.margin_offsets is None


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_option_signals_equal_the_models_own_head_at_the_margin_position(tiny_models, arch):
    model = tiny_models[arch]
    batch, engine_batch, pairs = _batch(model.config.vocab_size)
    recorder = Recorder()
    EarlyExitEngine(model, recorder).run(batch)
    for g, reference in enumerate(_reference_per_group(model, engine_batch, pairs)):
        seen = torch.stack([recorder.seen[layer][g] for layer in range(1, LAYERS)]).double()  # [layers, 3]
        for column, values in enumerate(reference):
            torch.testing.assert_close(seen[:, column], values, atol=1e-5, rtol=1e-4, equal_nan=True)
    margins = torch.stack([recorder.seen[layer][:, 0] for layer in range(1, LAYERS)])
    single = _group_index(engine_batch, pairs).index(3)
    assert bool(margins[:, single].isnan().all()), "a one-option group has no margin"
    assert not bool(margins[:, [g for g in range(len(OPTIONS)) if g != single]].isnan().any())


def test_option_changes_compare_with_the_previous_consulted_layer(tiny_models):
    model = tiny_models["llama"]
    batch, engine_batch, pairs = _batch(model.config.vocab_size)
    every, late = Recorder(), Recorder(min_layer=2)
    EarlyExitEngine(model, every).run(batch)
    EarlyExitEngine(model, late).run(batch)
    assert sorted(late.seen) == [2, 3]
    assert bool(late.seen[2][:, 1:].isnan().all()), "no layer was consulted before min_layer"
    torch.testing.assert_close(late.seen[3], every.seen[3], equal_nan=True)


def test_a_margin_only_policy_runs_no_vocabulary_head_and_pays_k_rows(tiny_models):
    model = tiny_models["llama"]
    batch, engine_batch, pairs = _batch(model.config.vocab_size)
    engine = EarlyExitEngine(model, build_policy("margin", {"margin": _never_reached(model, engine_batch, pairs)}))
    head_calls = []
    hook = engine.stack.head.register_forward_hook(lambda module, args, out: head_calls.append(args[0].shape[:-1].numel()))
    try:
        out = engine.run(batch)
    finally:
        hook.remove()
    scored = sum(length - decision for length, decision in zip(batch.lengths.tolist(), batch.decision_positions.tolist()))
    assert head_calls == [scored], "the head over the vocabulary runs once: for the answers at the last layer"
    ks = [len(engine_batch.option_tokens[g]) for g in engine_batch.row_groups]
    assert out.checks == [LAYERS - 1] * len(ks) and out.vocab_free_checks == out.checks
    assert out.check_rows == [k * (LAYERS - 1) for k in ks] and out.pruned_checks == [0] * len(ks)
    # FLOPs: each check charges its K head rows (2·K·d), no vocabulary and no softmax over it
    costs = CostModel.from_stack(engine.stack)
    for row, k, checks, head_rows in zip(engine_batch.rows, ks, out.checks, out.check_rows):
        args = dict(tokens=len(row.tokens), exit_layer=LAYERS, scored=len(row.tokens) - row.decision)
        charged = costs.request(**args, checks=checks, head_rows=head_rows, vocab_free=checks).flops
        assert charged - costs.request(**args, checks=0).flops == 2 * k * checks * engine.stack.hidden_size


def test_signals_over_vocabulary_and_options_pay_for_both(tiny_models):
    model = tiny_models["llama"]
    batch, engine_batch, pairs = _batch(model.config.vocab_size)
    recorder, paper = Recorder(("gap", "margin")), Recorder(("gap",))
    out = EarlyExitEngine(model, recorder).run(batch)
    EarlyExitEngine(model, paper).run(batch)
    vocab = model.config.vocab_size
    ks = [len(engine_batch.option_tokens[g]) for g in engine_batch.row_groups]
    assert out.check_rows == [(vocab + k) * (LAYERS - 1) for k in ks] and out.vocab_free_checks == [0] * len(ks)
    for layer in range(1, LAYERS):  # the gap is the paper's, whatever else is read beside it
        torch.testing.assert_close(recorder.seen[layer][:, 0], paper.seen[layer][:, 0])
    # with check_vocab=8 the later checks read 8 vocabulary rows; the margin is the same
    pruned = Recorder(("gap", "margin"))
    out = EarlyExitEngine(model, pruned, checks=ExitCheckConfig(vocab=8)).run(batch)
    assert out.check_rows == [vocab + 8 * (LAYERS - 2) + k * (LAYERS - 1) for k in ks]
    for layer in range(1, LAYERS):
        torch.testing.assert_close(pruned.seen[layer][:, 1], recorder.seen[layer][:, 1], equal_nan=True)


# ---- policy=margin -------------------------------------------------------------------------------


def test_margin_that_never_stops_is_full_depth_exactly(tiny_models):
    model = tiny_models["gemma3_text"]
    batch, engine_batch, pairs = _batch(model.config.vocab_size, seed=1)
    never = EarlyExitEngine(model, build_policy("margin", {"margin": _never_reached(model, engine_batch, pairs)})).run(batch)
    full = EarlyExitEngine(model, build_policy("full", {})).run(batch)
    assert never.exit_layers == full.exit_layers == [LAYERS] * len(full.exit_layers)
    for mine, theirs in zip(never.logits, full.logits):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_margin_stops_at_the_first_layer_from_min_layer_that_reaches_tau(tiny_models, arch):
    model = tiny_models[arch]
    batch, engine_batch, pairs = _batch(model.config.vocab_size, seed=2)
    reference = [m for m, _, _ in _reference_per_group(model, engine_batch, pairs)]
    min_layer = 2
    best = sorted(float(m[min_layer - 1 :].max()) for m in reference if not m.isnan().all())
    tau = (best[len(best) // 2 - 1] + best[len(best) // 2]) / 2  # between two groups: a mixed batch
    out = EarlyExitEngine(model, build_policy("margin", {"margin": tau, "min_layer": min_layer})).run(batch)
    expected = []
    for m in reference:
        reached = [layer for layer in range(min_layer, LAYERS) if m[layer - 1] >= tau]
        expected.append(reached[0] if reached else LAYERS)
    assert out.exit_layers == [expected[g] for g in engine_batch.row_groups]
    assert len(set(expected)) > 1, "tau should split the groups across layers"
    stack = DecoderStack(model)
    for row, layer, logits in zip(engine_batch.rows, out.exit_layers, out.logits):
        with torch.no_grad():
            if layer == LAYERS:
                want = model(torch.tensor([row.tokens])).logits[0, row.decision :]
            else:
                hidden = model(torch.tensor([row.tokens]), output_hidden_states=True).hidden_states[layer][0]
                want = stack.exit_logits(hidden[row.decision :])
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)


# ---- the paper's features and the registry -------------------------------------------------------


def test_paper_features_from_the_registry_equal_their_definitions():
    g = torch.Generator().manual_seed(3)
    logits, hidden, previous = torch.randn(4, 50, generator=g) * 3, torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    got = compute_features(FEATURE_NAMES, logits, hidden, previous, 2, 8)
    probs = torch.softmax(logits.double(), -1)
    top = probs.sort(-1, descending=True).values
    want = torch.stack([
        top[:, 0], top[:, 0] - top[:, 1], -(probs * probs.log()).sum(-1),
        torch.nn.functional.cosine_similarity(hidden.double(), previous.double(), dim=-1), torch.full((4,), 2 / 8),
    ], dim=-1)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert FEATURE_NAMES == ("p1", "gap", "entropy", "cosine", "depth")


def test_a_new_signal_is_one_function_and_one_name(tiny_models, monkeypatch):
    monkeypatch.setattr(signals, "SIGNALS", dict(signals.SIGNALS))  # registered for this test only

    @signal("second_prob", reads="vocab")
    def second_prob(inputs):
        return inputs.top2_probs[:, 1]

    model = tiny_models["llama"]
    batch, _, _ = _batch(model.config.vocab_size)
    recorder, paper = Recorder(("second_prob",)), Recorder(("p1", "gap"))
    EarlyExitEngine(model, recorder).run(batch)
    EarlyExitEngine(model, paper).run(batch)
    for layer in range(1, LAYERS):
        torch.testing.assert_close(recorder.seen[layer][:, 0], paper.seen[layer][:, 0] - paper.seen[layer][:, 1])


# ---- one-line errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        ({}, "policy=margin needs margin=τ"),
        ({"margin": 1.5}, "margin=1.5 is outside 0..1"),
        ({"margin": -0.1}, "margin=-0.1 is outside 0..1"),
        ({"margin": "wide"}, "margin='wide' is not a valid float"),
        ({"margin": 0.5, "min_layer": 0}, "min_layer=0 must be >= 1"),
        ({"margin": 0.5, "gap": 0.5}, "policy=margin does not take gap"),
    ],
)
def test_bad_margin_policies_are_refused_in_one_line(args, message):
    with pytest.raises(AdaInferError) as error:
        build_policy("margin", args)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_option_signals_are_refused_where_there_are_no_options(tiny_models):
    model = tiny_models["llama"]
    engine = EarlyExitEngine(model, build_policy("margin", {"margin": 0.5}))
    with pytest.raises(AdaInferError) as error:
        engine.run(ExitBatch.from_rows([[5, 6, 7, 8]], [2]))
    assert "policy=margin reads answer options (margin); this batch has none" in str(error.value)
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(AdaInferError) as generating:
        EarlyExitGenerator(engine).generate(ids, torch.ones_like(ids), 3)
    assert str(generating.value) == ("policy=margin reads answer options (margin); generate_until tasks have none: "
                                     "use threshold or static")
    with pytest.raises(AdaInferError, match="margin_offsets\\[0\\]=2 lies past the end"):
        ExitBatch.from_rows([[5, 6, 7, 8]], [2], options=[[9]], margin_offsets=[2])
    with pytest.raises(AdaInferError, match="one entry per group"):
        ExitBatch.from_rows([[5, 6, 7, 8]], [2], options=[[9]])
    with pytest.raises(AdaInferError, match="unknown exit signal\\(s\\) nope; known: p1, gap"):
        EarlyExitEngine(model, Recorder(("nope",))).run(ExitBatch.from_rows([[5, 6, 7, 8]], [2]))


# ---- through the lm-eval backend -------------------------------------------------------------------

BACKEND_QUESTIONS = {  # options sharing their first word, and options that differ at once
    "the quick brown fox jumps over": [" the lazy dog", " the film", " the answer"],
    "question : what is the answer ? answer :": [" yes", " no", " maybe"],
    "a film that is great ,": [" a movie that is bad", " a dog"],
}


def test_margin_policy_through_the_backend(tiny_model_dirs, tiny_models):
    from lm_eval.api.instance import Instance

    from adainfer_lmeval.adapter.backend import AdaInferLM
    from adainfer_lmeval.adapter.loglikelihood import tokenized_requests

    model = tiny_models["llama"]
    instances = [Instance("loglikelihood", {}, (context, option), idx=i)
                 for context, options in BACKEND_QUESTIONS.items() for i, option in enumerate(options)]
    plain = AdaInferLM(pretrained=str(tiny_model_dirs["llama"]), device="cpu", batch_size=4, policy="full")
    requests = tokenized_requests(plain, instances)
    # per question: its requests' rows, the position where its options differ, their tokens there
    questions = []
    starts = [0]
    for options in BACKEND_QUESTIONS.values():
        starts.append(starts[-1] + len(options))
    for first, end in zip(starts, starts[1:]):
        continuations = [requests[i][2] for i in range(first, end)]
        offset = request_encoding.margin_offset(continuations)
        row, decision = request_encoding.truncate(requests[first][1], continuations[0], plain.max_length)
        margin = _reference_signals(_reference_option_logits(model, row, decision + offset, [c[offset] for c in continuations]))[0]
        questions.append((range(first, end), offset, margin))
    assert sorted(offset for _, offset, _ in questions)[0] == 0 and max(offset for _, offset, _ in questions) >= 1, \
        "the tiny tokenizer should give one question whose options share their first token"
    best = sorted(float(margin.max()) for _, _, margin in questions)
    tau = (best[0] + best[1]) / 2  # one question stays below: exits differ
    ada = AdaInferLM(pretrained=str(tiny_model_dirs["llama"]), device="cpu", batch_size=4, policy="margin", margin=tau)
    answers = ada.loglikelihood(instances)
    full = plain.loglikelihood(instances)
    stack = DecoderStack(model)
    layers_seen = set()
    for requests_of_question, _, margin in questions:
        reached = [layer for layer in range(1, LAYERS) if margin[layer - 1] >= tau]
        layer = reached[0] if reached else LAYERS
        layers_seen.add(layer)
        extra = []
        for i in requests_of_question:
            assert answers[i].exit.layers == layer
            assert answers[i].exit.checks * len(requests_of_question) == pytest.approx(min(layer, LAYERS - 1))
            _, context_enc, continuation_enc = requests[i]
            row, decision = request_encoding.truncate(context_enc, continuation_enc, ada.max_length)
            if layer == LAYERS:
                assert answers[i][0] == pytest.approx(full[i][0], abs=1e-5)
            else:
                with torch.no_grad():
                    hidden = model(torch.tensor([row]), output_hidden_states=True).hidden_states[layer][0, decision:]
                    logprobs = torch.log_softmax(stack.exit_logits(hidden), -1)
                want = float(logprobs.gather(1, torch.tensor(continuation_enc)[:, None]).sum())
                assert answers[i][0] == pytest.approx(want, abs=1e-4)
            args = dict(tokens=len(row), exit_layer=layer, scored=len(continuation_enc))
            extra.append(answers[i].exit.flops - ada.costs.request(**args, checks=0).flops)
        # the question's checks charged K head rows each (2·K·d), shared by its K requests
        checks = min(layer, LAYERS - 1)
        assert sum(extra) == pytest.approx(2 * len(requests_of_question) * checks * stack.hidden_size)
    assert len(layers_seen) > 1
    with pytest.raises(AdaInferError, match="generate_until tasks have none"):
        ada.generate_until([Instance("generate_until", {}, ("the lazy dog", {"until": ["."], "max_gen_toks": 4}), idx=0)])
