"""``policy=simlens``: the answer-option margin read off the SimLens continuation, and the answer
read off it, against references carried by hand from the model's own hidden states.

References: the HF forward's ``hidden_states[l]`` of a row, token 0 and the positions a
continuation carries taken out and run on with ``DecoderStack.continue_from`` (tested against the
model in test_continuation.py), then the final norm and head. Costs: the semantics' formulas,
computed here from the rows' decision positions, margin offsets and exit layers.
"""

from __future__ import annotations

import pytest
import torch

from adainfer_lmeval.adapter import request_encoding
from adainfer_lmeval.core.architectures import DecoderStack
from adainfer_lmeval.core.engine import EarlyExitEngine, ExitBatch
from adainfer_lmeval.core.generation import EarlyExitGenerator
from adainfer_lmeval.core.stages import StageClock
from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.policies import build_policy

from conftest import ARCHITECTURES
from test_signals import BACKEND_QUESTIONS as SIGNALS_QUESTIONS, LAYERS, OPTIONS, Recorder, _batch, _group_index, _pairs


def _carried(model, stack, tokens: list[int], layer: int, first: int, last: int) -> torch.Tensor:
    """Last-layer states [last - first + 1, d] of positions first..last of ``tokens``, carried on
    from ``layer`` with token 0 (not twice when first is 0), off the HF forward's hidden states."""
    positions = ([0] if first > 0 else []) + list(range(first, last + 1))
    with torch.no_grad():
        hidden = model(torch.tensor([tokens]), output_hidden_states=True).hidden_states[layer][0]
        states = stack.continue_from(layer, hidden[positions].unsqueeze(0), torch.tensor([positions]))[0]
    return states[len(positions) - (last - first + 1) :]


def _reference_logits(model, stack, tokens: list[int], decision: int, layer: int) -> torch.Tensor:
    """The scored logits of a row read off the continuation from ``layer`` (the model's own at L)."""
    with torch.no_grad():
        if layer == LAYERS:
            return model(torch.tensor([tokens])).logits[0, decision:]
        return stack.exit_logits(_carried(model, stack, tokens, layer, decision, len(tokens) - 1))


def _reference_margin(model, stack, tokens: list[int], decision: int, offset: int, option_tokens: list[int], layer: int):
    """continuation_margin by hand: the full head at the carried margin position, the options'
    entries of it, their softmax in float64, top minus second (NaN with one option)."""
    if len(option_tokens) < 2:
        return float("nan")
    with torch.no_grad():
        state = _carried(model, stack, tokens, layer, decision, decision + offset)[-1]
        logits = stack.exit_logits(state)[option_tokens].double()
    top = torch.softmax(logits, -1).sort(descending=True).values
    return float(top[0] - top[1])


def _carried_tokens(decision: int, positions: int) -> int:
    """Tokens a continuation carries: token 0 (when not itself carried) and ``positions`` positions."""
    return (1 if decision > 0 else 0) + positions


def _speakers(engine_batch):
    """Per group: its first row (the speaker) and its index among the batch's rows."""
    first, index = [], 0
    for group in engine_batch.groups:
        first.append((group.rows[0], index))
        index += len(group.rows)
    return first


# ---- the signal ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2", "opt", "mistral"])
def test_continuation_margin_equals_the_margin_carried_by_hand(tiny_models, arch):
    model = tiny_models[arch]
    stack = DecoderStack(model)
    batch, engine_batch, pairs = _batch(model.config.vocab_size, seed=4)
    recorder = Recorder(("continuation_margin",))
    out = EarlyExitEngine(model, recorder).run(batch)
    assert out.exit_layers == [LAYERS] * len(out.exit_layers)
    for g, ((row, _), index) in enumerate(zip(_speakers(engine_batch), _group_index(engine_batch, pairs))):
        _, offset, option_tokens = OPTIONS[index]
        want = [_reference_margin(model, stack, row.tokens, row.decision, offset, option_tokens, layer)
                for layer in range(1, LAYERS)]
        seen = [float(recorder.seen[layer][g, 0]) for layer in range(1, LAYERS)]
        assert seen == pytest.approx(want, abs=1e-5, nan_ok=True)
    # the lens margin at the same layers is another number: the continuation is what is read
    lens = Recorder(("margin",))
    EarlyExitEngine(model, lens).run(batch)
    assert not torch.allclose(lens.seen[1], recorder.seen[1], equal_nan=True)


# ---- the exit read-out -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("layer", [1, 3])
def test_simlens_at_margin_zero_stops_at_min_layer_and_reads_the_continuation(tiny_models, arch, layer):
    model = tiny_models[arch]
    stack = DecoderStack(model)
    batch, engine_batch, pairs = _batch(model.config.vocab_size, seed=5)
    out = EarlyExitEngine(model, build_policy("simlens", {"margin": 0.0, "min_layer": layer})).run(batch)
    groups = [OPTIONS[i] for i in _group_index(engine_batch, pairs)]
    reused = 0
    for j, (row, g) in enumerate(zip(engine_batch.rows, engine_batch.row_groups)):
        _, offset, option_tokens = groups[g]
        choices = len(option_tokens) > 1  # a group with one option never stops
        exit_layer = layer if choices else LAYERS
        assert out.exit_layers[j] == exit_layer
        torch.testing.assert_close(out.logits[j], _reference_logits(model, stack, row.tokens, row.decision, exit_layer),
                                   atol=1e-4, rtol=1e-4)
        # one check per layer from min_layer to the exit, each carrying decision..margin with token 0
        check_tokens = _carried_tokens(row.decision, offset + 1)
        assert out.check_carried_tokens[j] == check_tokens
        assert out.check_token_layers[j] == sum(check_tokens * (LAYERS - l) for l in range(layer, min(exit_layer, LAYERS - 1) + 1))
        scored = len(row.tokens) - row.decision
        speaker = engine_batch.groups[g].rows[0] is row
        if not choices:
            want = (0, 0)
        elif speaker and scored == 1 and offset == 0:  # its check carried these very tokens
            want, reused = (0, 0), reused + 1
        else:
            want = (_carried_tokens(row.decision, scored) * (LAYERS - layer), _carried_tokens(row.decision, scored))
        assert (out.exit_token_layers[j], out.exit_carried_tokens[j]) == want
    assert reused == 2, "the speakers scored at their decision position alone reuse their checks' continuations"


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("spec", [("margin", {"margin": 0.0, "min_layer": 2}), ("static", {"layer": 2})])
def test_a_lens_rule_reading_the_continuation_exits_where_it_did_and_answers_off_the_carry(tiny_models, arch, spec):
    """readout=continuation (the study's margin_simlens, simlens_static): the rule's own checks,
    the same exit layers as through the lens, the answer carried on from the exit layer, and no
    check carry (only the exit's read-out carries)."""
    model = tiny_models[arch]
    stack = DecoderStack(model)
    name, args = spec
    batch, engine_batch, pairs = _batch(model.config.vocab_size, seed=5)
    lens = EarlyExitEngine(model, build_policy(name, args)).run(batch)
    with StageClock() as clock:
        out = EarlyExitEngine(model, build_policy(name, {**args, "readout": "continuation"})).run(batch)
    assert "check_continuation" not in clock.calls and clock.calls["exit_continuation"] >= 1
    assert out.exit_layers == lens.exit_layers and out.checks == lens.checks and out.check_rows == lens.check_rows
    assert out.check_token_layers == out.check_carried_tokens == [0] * len(out.exit_layers)
    assert set(out.exit_layers) == ({2, LAYERS} if name == "margin" else {2})  # margin: one-option groups go on
    for j, row in enumerate(engine_batch.rows):
        layer = out.exit_layers[j]
        torch.testing.assert_close(out.logits[j], _reference_logits(model, stack, row.tokens, row.decision, layer),
                                   atol=1e-4, rtol=1e-4)
        carried = _carried_tokens(row.decision, len(row.tokens) - row.decision)
        want = (0, 0) if layer == LAYERS else (carried * (LAYERS - layer), carried)
        assert (out.exit_token_layers[j], out.exit_carried_tokens[j]) == want
        if layer < LAYERS:  # through the lens the same layer reads another answer
            assert not torch.allclose(out.logits[j], lens.logits[j], atol=1e-4)


def test_the_readout_is_named_in_the_results_and_checked_in_one_line():
    assert build_policy("margin", {"margin": 0.5, "readout": "continuation"}).describe() == {
        "name": "margin", "margin": 0.5, "min_layer": 1, "exit_readout": "continuation"}
    assert build_policy("static", {"layer": 3, "readout": "lens"}).describe() == {"name": "static", "layer": 3}
    assert build_policy("threshold", {"gap": 0.5, "readout": "continuation"}).exit_readout == "continuation"
    with pytest.raises(AdaInferError) as error:
        build_policy("static", {"layer": 3, "readout": "carry"})
    assert str(error.value) == "readout='carry' for policy=static: choose one of lens, continuation"
    with pytest.raises(AdaInferError, match="policy=simlens does not take readout"):
        build_policy("simlens", {"readout": "lens"})  # it always answers off the continuation


def test_generation_refuses_an_answer_off_the_continuation_in_one_line(tiny_models):
    engine = EarlyExitEngine(tiny_models["llama"], build_policy("static", {"layer": 2, "readout": "continuation"}))
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(AdaInferError) as error:
        EarlyExitGenerator(engine).generate(ids, torch.ones_like(ids), 3)
    assert str(error.value) == (
        "policy=static answers off the SimLens continuation (readout=continuation), which carries a loglikelihood "
        "request's scored positions, not generated tokens: generate_until tasks cannot use it; drop readout=continuation")


def test_simlens_that_never_stops_is_full_depth_exactly(tiny_models):
    model = tiny_models["gemma3_text"]
    stack = DecoderStack(model)
    batch, engine_batch, pairs = _batch(model.config.vocab_size, seed=1)
    groups = [OPTIONS[i] for i in _group_index(engine_batch, pairs)]
    margins = [_reference_margin(model, stack, row.tokens, row.decision, groups[g][1], groups[g][2], layer)
               for g, (row, _) in enumerate(_speakers(engine_batch)) for layer in range(1, LAYERS)]
    assert max(m for m in margins if m == m) < 1.0, "some continuation margin saturates at 1"
    with StageClock() as clock:
        never = EarlyExitEngine(model, build_policy("simlens", {"margin": 1.0})).run(batch)
    assert clock.calls["check_continuation"] == LAYERS - 1 and "exit_continuation" not in clock.calls
    full = EarlyExitEngine(model, build_policy("full", {})).run(batch)
    assert never.exit_layers == full.exit_layers == [LAYERS] * len(full.exit_layers)
    for mine, theirs in zip(never.logits, full.logits):
        assert torch.equal(mine, theirs)
    assert never.exit_token_layers == [0] * len(full.logits) and min(never.check_token_layers) > 0
    assert full.check_token_layers == full.exit_token_layers == [0] * len(full.logits)


def test_results_and_counts_do_not_depend_on_the_batch(tiny_models):
    model = tiny_models["llama"]
    batch, engine_batch, pairs = _batch(model.config.vocab_size, seed=6)
    recorder = Recorder(("continuation_margin",))
    EarlyExitEngine(model, recorder).run(batch)
    margins = torch.stack([recorder.seen[layer][:, 0] for layer in range(1, LAYERS)], -1)  # [groups, layers]
    best = sorted(float(m.max()) for m in margins if not m.isnan().all())
    tau = (best[len(best) // 2 - 1] + best[len(best) // 2]) / 2  # between two groups: a mixed batch
    assert_batch_independent(EarlyExitEngine(model, build_policy("simlens", {"margin": tau})), batch, engine_batch, pairs,
                             model.config.vocab_size, seed=6)


def assert_batch_independent(engine, batch, engine_batch, pairs, vocab: int, seed: int) -> None:
    """``engine`` gives each group alone (one group per batch) what it gives it in ``batch`` (of
    ``_batch(vocab, seed)``): every count of the result and the logits; the batch mixes exit layers."""
    together = engine.run(batch)
    assert len(set(together.exit_layers)) > 1
    fields = ("exit_layers", "checks", "check_rows", "vocab_free_checks", "check_token_layers", "check_carried_tokens",
              "check_prompt_tokens", "exit_token_layers", "exit_carried_tokens", "exit_prompt_tokens")
    offset = 0
    _, keys = _pairs(vocab, seed=seed)
    encoded = request_encoding.encode(pairs, max_length=64, keys=keys)
    for alone in encoded.batches(rows_per_batch=1):  # one group per batch
        out = engine.run(ExitBatch.from_rows(alone.tokens, alone.decisions, alone.row_groups,
                                             options=alone.option_tokens, margin_offsets=alone.margin_offsets))
        rows = slice(offset, offset + len(alone.rows))
        assert alone.tokens == engine_batch.tokens[rows]
        for name in fields:
            assert getattr(out, name) == getattr(together, name)[rows], name
        for mine, theirs in zip(out.logits, together.logits[rows]):
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
        offset += len(alone.rows)
    assert offset == len(engine_batch.rows)


# ---- the policy --------------------------------------------------------------------------------------


def test_simlens_describes_itself_and_refuses_bad_args_in_one_line():
    policy = build_policy("simlens", {})
    assert policy.describe() == {"name": "simlens", "margin": 0.9, "min_layer": 1, "exit_readout": "continuation"}
    assert policy.features == ("continuation_margin",) and build_policy("margin", {"margin": 0.5}).exit_readout == "lens"
    for args, message in [({"margin": 1.5}, "margin=1.5 is outside 0..1"), ({"min_layer": 0}, "min_layer=0 must be >= 1"),
                          ({"gap": 0.5}, "policy=simlens does not take gap")]:
        with pytest.raises(AdaInferError) as error:
            build_policy("simlens", args)
        assert message in str(error.value) and "\n" not in str(error.value)


def test_simlens_is_refused_without_options_and_in_generation(tiny_models):
    engine = EarlyExitEngine(tiny_models["llama"], build_policy("simlens", {}))
    with pytest.raises(AdaInferError, match="policy=simlens reads answer options \\(continuation_margin\\); this batch has none"):
        engine.run(ExitBatch.from_rows([[5, 6, 7, 8]], [2]))
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(AdaInferError) as generating:
        EarlyExitGenerator(engine).generate(ids, torch.ones_like(ids), 3)
    assert str(generating.value) == SIMLENS_GENERATION_ERROR


SIMLENS_GENERATION_ERROR = (
    "policy=simlens reads the SimLens continuation (continuation_margin), defined over a loglikelihood group's "
    "answer options, not per generated token: generate_until tasks cannot use it; use threshold or static"
)


# ---- through the lm-eval backend ---------------------------------------------------------------------


# test_signals' questions, and one of single-token options (one row for the three requests)
BACKEND_QUESTIONS = {**SIGNALS_QUESTIONS, "a film that is great , question :": [" the", " a", " answer"]}


def test_simlens_through_the_backend_scores_and_charges_the_continuation(tiny_model_dirs, tiny_models):
    from lm_eval.api.instance import Instance

    from adainfer_lmeval.adapter.backend import AdaInferLM
    from adainfer_lmeval.adapter.loglikelihood import tokenized_requests

    model = tiny_models["llama"]
    stack = DecoderStack(model)
    instances = [Instance("loglikelihood", {}, (context, option), idx=i)
                 for context, options in BACKEND_QUESTIONS.items() for i, option in enumerate(options)]
    ada = AdaInferLM(pretrained=str(tiny_model_dirs["llama"]), device="cpu", batch_size=4, policy="simlens",
                     margin=0.0, min_layer=2)
    requests = tokenized_requests(ada, instances)
    answers = ada.loglikelihood(instances)
    layer, width = 2, stack.layer_matmul_params()
    per_token_layer = lambda carried: 2 * width + 4 * stack.attention_width() * carried  # noqa: E731
    first, shares = 0, set()
    for options in BACKEND_QUESTIONS.values():
        question = range(first, first + len(options))
        first += len(options)
        continuations = [requests[i][2] for i in question]
        offset = request_encoding.margin_offset(continuations)
        rows = [request_encoding.truncate(requests[i][1], requests[i][2], ada.max_length) for i in question]
        speaker, decision = rows[0]
        check_carried = _carried_tokens(decision, offset + 1)
        check = check_carried * (LAYERS - layer)  # one check, at min_layer, where margin 0 stops
        for i, (tokens, _) in zip(question, rows):
            continuation = requests[i][2]
            share = sum(other == tokens for other, _ in rows)
            shares.add(share)
            with torch.no_grad():
                logprobs = torch.log_softmax(_reference_logits(model, stack, tokens, decision, layer), -1)
            want = float(logprobs.gather(1, torch.tensor(continuation)[:, None]).sum())
            assert answers[i].exit.layers == layer and answers[i][0] == pytest.approx(want, abs=1e-4)
            exit_carried = _carried_tokens(decision, len(continuation))
            reused = tokens == speaker and len(continuation) == 1 and offset == 0
            exit_tl = 0 if reused else exit_carried * (LAYERS - layer)
            # this request's part: the question's check (K option head rows, its continuation) over
            # its requests, the row's exit continuation over the requests sharing the row
            extra = (2 * len(options) * stack.hidden_size + check * per_token_layer(check_carried)) / len(options)
            extra += exit_tl * per_token_layer(exit_carried) / share
            base = ada.costs.request(tokens=len(tokens), exit_layer=layer, scored=len(continuation), checks=0, share=share)
            assert answers[i].exit.flops == pytest.approx(base.flops + extra, rel=1e-9)
            assert answers[i].exit.continuation_token_layers == pytest.approx(check / len(options) + exit_tl / share)
            assert answers[i].exit.full_flops == base.full_flops
    assert shares == {1, 3}, "the tiny tokenizer should give one question of single-token options (one shared row)"
    with pytest.raises(AdaInferError) as error:
        ada.generate_until([Instance("generate_until", {}, ("the lazy dog", {"until": ["."], "max_gen_toks": 4}), idx=0)])
    assert str(error.value) == SIMLENS_GENERATION_ERROR
