"""``carry=filled`` in the engine: the continuation whose carried positions attend to the whole
prompt (its keys and values projected from the exit layer's states), for the check's margin and
for the exit answer, against references run by hand.

References: the model's own layers run over the whole row from layer l, the positions before the
decision reset to their layer-l states after every layer (what "the prompt held at the start
layer" means, tested against the core's batched fill in test_filled_continuation.py), and from
layer L-1 the full forward itself (policy=full). Costs: the semantics' formulas by hand.
"""

from __future__ import annotations

import pytest
import torch

from adainfer_lmeval.adapter import request_encoding
from adainfer_lmeval.core.architectures import DecoderStack
from adainfer_lmeval.core.engine import EarlyExitEngine
from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.policies import build_policy

from conftest import ARCHITECTURES
from test_signals import LAYERS, OPTIONS, Recorder, _batch, _group_index
from test_simlens import assert_batch_independent


def _held(stack, tokens: list[int], layer: int, decision: int) -> torch.Tensor:
    """Last-layer states [T - decision, d] of positions decision.. of ``tokens``, run on from
    ``layer`` over the whole row with the positions before ``decision`` held at layer ``layer``."""
    ids = torch.tensor([tokens])
    with torch.no_grad():
        hidden = stack.embed(ids)
        inputs = stack.layer_inputs(hidden)
        for index in range(layer):
            hidden = stack.run_layer(index, hidden, inputs)
        held = hidden
        for index in range(layer, stack.num_layers):
            out = stack.run_layer(index, hidden, inputs)
            hidden = held.clone()
            hidden[:, decision:] = out[:, decision:]
    return hidden[0, decision:]


def _reference_logits(stack, tokens, decision, layer):
    with torch.no_grad():
        return stack.exit_logits(_held(stack, tokens, layer, decision))


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("layer", [1, 3])
def test_filled_simlens_at_margin_zero_answers_off_the_filled_carry_and_counts_the_prompt(tiny_models, arch, layer):
    model = tiny_models[arch]
    stack = DecoderStack(model)
    batch, engine_batch, pairs = _batch(model.config.vocab_size, seed=5)
    out = EarlyExitEngine(model, build_policy("simlens", {"margin": 0.0, "min_layer": layer, "carry": "filled"})).run(batch)
    simlens = EarlyExitEngine(model, build_policy("simlens", {"margin": 0.0, "min_layer": layer})).run(batch)
    groups = [OPTIONS[i] for i in _group_index(engine_batch, pairs)]
    reused = 0
    for j, (row, g) in enumerate(zip(engine_batch.rows, engine_batch.row_groups)):
        _, offset, option_tokens = groups[g]
        choices = len(option_tokens) > 1  # a group with one option never stops
        exit_layer = layer if choices else LAYERS
        assert out.exit_layers[j] == exit_layer
        want = _reference_logits(stack, row.tokens, row.decision, exit_layer) if choices else simlens.logits[j]
        torch.testing.assert_close(out.logits[j], want, atol=1e-4, rtol=1e-4)
        if choices:  # the filled answer is another than SimLens's (token 0 alone)
            assert not torch.allclose(out.logits[j], simlens.logits[j], atol=1e-4)
        # one check per layer from min_layer to the exit, each carrying decision..margin over the prompt
        assert (out.check_carried_tokens[j], out.check_prompt_tokens[j]) == (offset + 1, row.decision)
        assert out.check_token_layers[j] == sum((offset + 1) * (LAYERS - l) for l in range(layer, min(exit_layer, LAYERS - 1) + 1))
        scored = len(row.tokens) - row.decision
        speaker = engine_batch.groups[g].rows[0] is row
        if not choices:
            want_exit = (0, 0, 0)
        elif speaker and scored == 1 and offset == 0:  # its check carried these very tokens
            want_exit, reused = (0, 0, 0), reused + 1
        else:
            want_exit = (scored * (LAYERS - layer), scored, row.decision)
        assert (out.exit_token_layers[j], out.exit_carried_tokens[j], out.exit_prompt_tokens[j]) == want_exit
    assert reused == 2, "the speakers scored at their decision position alone reuse their checks' continuations"
    assert simlens.check_prompt_tokens == simlens.exit_prompt_tokens == [0] * len(simlens.exit_layers)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2", "opt", "mistral"])
def test_the_filled_continuation_margin_equals_the_margin_carried_by_hand(tiny_models, arch):
    model = tiny_models[arch]
    stack = DecoderStack(model)
    batch, engine_batch, pairs = _batch(model.config.vocab_size, seed=4)
    recorder = Recorder(("continuation_margin",))
    recorder.continuation_carry = "filled"
    EarlyExitEngine(model, recorder).run(batch)
    for g, (group, index) in enumerate(zip(engine_batch.groups, _group_index(engine_batch, pairs))):
        _, offset, option_tokens = OPTIONS[index]
        row = group.rows[0]
        for layer in range(1, LAYERS):
            seen = float(recorder.seen[layer][g, 0])
            if len(option_tokens) < 2:
                assert seen != seen  # NaN: nothing to choose
                continue
            with torch.no_grad():
                logits = stack.exit_logits(_held(stack, row.tokens, layer, row.decision)[offset])[option_tokens].double()
            top = torch.softmax(logits, -1).sort(descending=True).values
            assert seen == pytest.approx(float(top[0] - top[1]), abs=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_filled_answer_from_layer_L_minus_1_is_full_depth(tiny_models, arch):
    """From the last layer but one the prompt's states are exact, so the filled carry is the full
    forward: the reference that owes nothing to this code's own fill."""
    model = tiny_models[arch]
    batch, _, _ = _batch(model.config.vocab_size, seed=2)
    filled = EarlyExitEngine(model, build_policy("static", {"layer": LAYERS - 1, "readout": "continuation",
                                                            "carry": "filled"})).run(batch)
    full = EarlyExitEngine(model, build_policy("full", {})).run(batch)
    assert filled.exit_layers == [LAYERS - 1] * len(full.exit_layers)
    for mine, theirs in zip(filled.logits, full.logits):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3_text"])
def test_filled_results_and_counts_do_not_depend_on_the_batch(tiny_models, arch):
    """Rows of different prompt lengths share one fill (prompts left-aligned in the cache; the
    sliding-window families' window of 6 is shorter than most prompts here)."""
    model = tiny_models[arch]
    batch, engine_batch, pairs = _batch(model.config.vocab_size, seed=6)
    recorder = Recorder(("continuation_margin",))
    recorder.continuation_carry = "filled"
    EarlyExitEngine(model, recorder).run(batch)
    margins = torch.stack([recorder.seen[layer][:, 0] for layer in range(1, LAYERS)], -1)
    best = sorted(float(m.max()) for m in margins if not m.isnan().all())
    tau = (best[len(best) // 2 - 1] + best[len(best) // 2]) / 2  # between two groups: a mixed batch
    assert_batch_independent(EarlyExitEngine(model, build_policy("simlens", {"margin": tau, "carry": "filled"})), batch,
                             engine_batch, pairs, model.config.vocab_size, seed=6)


def test_carry_is_described_and_checked_in_one_line():
    assert build_policy("simlens", {"carry": "filled"}).describe() == {
        "name": "simlens", "margin": 0.9, "min_layer": 1, "exit_readout": "continuation", "continuation_carry": "filled"}
    assert build_policy("margin", {"margin": 0.5, "readout": "continuation", "carry": "filled"}).continuation_carry == "filled"
    assert "continuation_carry" not in build_policy("simlens", {}).describe()
    for name, args, message in [
        ("simlens", {"carry": "whole"}, "carry='whole' for policy=simlens: choose one of simlens, filled"),
        ("static", {"layer": 2, "carry": "filled"},
         "carry=filled for policy=static carries a continuation, which readout=lens does not read; add readout=continuation"),
    ]:
        with pytest.raises(AdaInferError) as error:
            build_policy(name, args)
        assert str(error.value) == message


def test_filled_simlens_through_the_backend_charges_the_prompt_it_fills(tiny_model_dirs, tiny_models):
    """A request's FLOPs: its rows' layers and head, its part of the question's check (K option
    head rows and the check's filled carry) and its row's filled exit carry; a filled carry of
    c tokens over a prompt of p tokens from layer l costs, per remaining layer, c tokens' layer
    matrices and attention over c + p tokens, and p tokens' key/value projections."""
    from lm_eval.api.instance import Instance

    from adainfer_lmeval.adapter.backend import AdaInferLM
    from adainfer_lmeval.adapter.loglikelihood import tokenized_requests
    from test_simlens import BACKEND_QUESTIONS

    model = tiny_models["llama"]
    stack = DecoderStack(model)
    instances = [Instance("loglikelihood", {}, (context, option), idx=i)
                 for context, options in BACKEND_QUESTIONS.items() for i, option in enumerate(options)]
    ada = AdaInferLM(pretrained=str(tiny_model_dirs["llama"]), device="cpu", batch_size=4, policy="simlens",
                     margin=0.0, min_layer=2, carry="filled")
    requests = tokenized_requests(ada, instances)
    answers = ada.loglikelihood(instances)
    layer, remaining = 2, LAYERS - 2
    width, attention, kv = stack.layer_matmul_params(), stack.attention_width(), stack.kv_matmul_params()

    def filled(carried: int, prompt: int) -> float:
        return remaining * (carried * (2 * width + 4 * attention * (carried + prompt)) + prompt * 2 * kv)

    first = 0
    for options in BACKEND_QUESTIONS.values():
        question = range(first, first + len(options))
        first += len(options)
        offset = request_encoding.margin_offset([requests[i][2] for i in question])
        rows = [request_encoding.truncate(requests[i][1], requests[i][2], ada.max_length) for i in question]
        speaker, decision = rows[0]
        for i, (tokens, _) in zip(question, rows):
            continuation = requests[i][2]
            share = sum(other == tokens for other, _ in rows)
            with torch.no_grad():
                logprobs = torch.log_softmax(_reference_logits(stack, tokens, decision, layer), -1)
            want = float(logprobs.gather(1, torch.tensor(continuation)[:, None]).sum())
            assert answers[i].exit.layers == layer and answers[i][0] == pytest.approx(want, abs=1e-4)
            reused = tokens == speaker and len(continuation) == 1 and offset == 0
            extra = (2 * len(options) * stack.hidden_size + filled(offset + 1, decision)) / len(options)
            extra += 0 if reused else filled(len(continuation), decision) / share
            base = ada.costs.request(tokens=len(tokens), exit_layer=layer, scored=len(continuation), checks=0, share=share)
            assert answers[i].exit.flops == pytest.approx(base.flops + extra, rel=1e-9)


REAL_DOCS, FROM_LAYER = 8, 24


@pytest.mark.real
def test_the_backend_answers_and_exits_as_the_offline_filled_read_out_on_real_arc_easy():
    """Real SmolLM2 on ARC-Easy (four multi-token options): through lm-eval with
    ``readout=continuation,carry=filled``, each option's log-likelihood at a static exit is the
    offline read-out's (:func:`experiments.filled_continuation.trace_filled`, one row at a time),
    and ``policy=simlens,carry=filled`` exits where the offline margins say."""
    import lm_eval

    from adainfer_lmeval.adapter.backend import AdaInferLM
    from adainfer_lmeval.adapter.harness import task_manager
    from adainfer_lmeval.experiments.collect import build_examples
    from adainfer_lmeval.experiments.filled_continuation import trace_filled
    from adainfer_lmeval.experiments.task_documents import DEFAULT_FEWSHOT_SEED, load_tasks
    from adainfer_lmeval.offline.models.fetch import fetch_model

    model = str(fetch_model("smollm2-135m"))
    lm = AdaInferLM(pretrained=model, device="cpu", batch_size=8, policy="full")
    L = lm.engine.num_layers
    examples = build_examples(lm, load_tasks(["arc_easy"])["arc_easy"], "arc_easy", list(range(REAL_DOCS)), 0,
                              DEFAULT_FEWSHOT_SEED)
    assert len(examples) >= REAL_DOCS - 1
    offline = {e.doc_id: trace_filled(lm.engine.stack, e, FROM_LAYER, [None])[None] for e in examples}

    def run(spec: str):
        results = lm_eval.simple_evaluate(model="adainfer", model_args=f"pretrained={model},{spec}", tasks=["arc_easy"],
                                          limit=REAL_DOCS, device="cpu", batch_size=8, log_samples=True,
                                          bootstrap_iters=0, task_manager=task_manager())
        return {s["doc_id"]: s for s in results["samples"]["arc_easy"]}

    static = run(f"policy=static,layer={FROM_LAYER},readout=continuation,carry=filled")
    for doc_id, (_, lls) in offline.items():
        assert [r[0][0] for r in static[doc_id]["resps"]] == pytest.approx(lls[FROM_LAYER - 1], abs=2e-3)
        assert set(static[doc_id]["exit_layers"]) == {FROM_LAYER}
    tau = 0.5
    adaptive = run(f"policy=simlens,carry=filled,margin={tau},min_layer={FROM_LAYER}")
    exits = set()
    for doc_id, (logits, lls) in offline.items():
        top = [torch.softmax(torch.tensor(logits[l - 1], dtype=torch.float64), -1).sort(descending=True).values
               for l in range(FROM_LAYER, L)]
        margins = [float(t[0] - t[1]) for t in top]
        if min(abs(m - tau) for m in margins) < 1e-3:
            continue  # too close to τ for a batched and a one-row forward to agree on the side
        want = next((l for l, m in zip(range(FROM_LAYER, L), margins) if m >= tau), L)
        exits.add(want)
        assert set(adaptive[doc_id]["exit_layers"]) == {want}, doc_id
        assert [r[0][0] for r in adaptive[doc_id]["resps"]] == pytest.approx(lls[want - 1], abs=2e-3)
    assert len(exits) > 1, f"τ={tau} should exit some documents early and not others: {exits}"
