"""The adainfer backend against lm-eval's own ``hf`` backend, on the same requests."""

from __future__ import annotations

import pytest
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

import adainfer_lmeval  # noqa: F401  (registers the model)
from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.adapter.backend import AdaInferLM

CONTEXTS = [
    "the quick brown fox jumps over",
    "question : what is the answer ? answer :",
    "a film that is great ,",
    "the lazy dog",
]
CONTINUATIONS = [" the lazy dog", " yes", " no", " maybe", " positive negative", " ."]
TEXTS = [
    "the quick brown fox jumps over the lazy dog . " * 3,
    "a movie that is bad . a film that is great , question : what is the answer ?",
]


def _loglikelihood_requests():
    return [
        Instance("loglikelihood", {}, (ctx, cont), idx=i)
        for i, (ctx, cont) in enumerate((c, k) for c in CONTEXTS for k in CONTINUATIONS)
    ]


def _lm(cls, folder, **kwargs):
    return cls(pretrained=str(folder), device="cpu", **kwargs)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2", "opt"])
@pytest.mark.parametrize("batch_size", [1, 8])
def test_full_depth_matches_hf_backend(tiny_model_dirs, arch, batch_size):
    # max_length=24 forces left truncation and several rolling windows per text.
    hf = _lm(HFLM, tiny_model_dirs[arch], batch_size=batch_size, max_length=24)
    ada = _lm(AdaInferLM, tiny_model_dirs[arch], batch_size=batch_size, max_length=24, policy="full")

    reference = hf.loglikelihood(_loglikelihood_requests())
    ours = ada.loglikelihood(_loglikelihood_requests())
    assert [g for _, g in ours] == [g for _, g in reference]
    assert [lp for lp, _ in ours] == pytest.approx([lp for lp, _ in reference], abs=1e-4)
    assert all(r.exit.layers == ada.engine.num_layers for r in ours)

    rolling = [Instance("loglikelihood_rolling", {}, (t,), idx=0) for t in TEXTS]
    assert ada.loglikelihood_rolling(rolling) == pytest.approx(hf.loglikelihood_rolling(rolling), abs=1e-4)

    until = {"until": ["."], "max_gen_toks": 8, "do_sample": False}
    gen = [Instance("generate_until", {}, (ctx, dict(until)), idx=0) for ctx in CONTEXTS]
    texts = ada.generate_until(gen)
    assert texts == hf.generate_until(gen)
    for text in texts:  # per-token records, every token at full depth
        assert text.exit.tokens >= 1 and set(text.exit.token_layers) == {ada.engine.num_layers}
        assert not text.exit.full_depth_generation


def test_threshold_policy_saves_layers_and_shares_decisions(tiny_model_dirs):
    # A random tiny model is unsure of everything: find a top-prob threshold that splits it.
    for tau in (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08):
        ada = _lm(AdaInferLM, tiny_model_dirs["llama"], batch_size=4, policy="threshold", top_prob=tau)
        answers = ada.loglikelihood(_loglikelihood_requests())
        layers = [a.exit.layers for a in answers]
        if len(set(layers)) > 1:
            break
    assert len(set(layers)) > 1, "no threshold split the requests across layers"
    # The choices of one context share a decision.
    per_context = len(CONTINUATIONS)
    for start in range(0, len(layers), per_context):
        assert len(set(layers[start : start + per_context])) == 1
    for a in answers:
        if a.exit.layers <= 2:  # two of four layers skipped outweigh two exit-head checks
            assert a.exit.flops < a.exit.full_flops
        if a.exit.layers == ada.engine.num_layers:  # ran everything and paid for the checks
            assert a.exit.flops > a.exit.full_flops


def test_batch_size_does_not_change_answers(tiny_model_dirs):
    results = []
    for batch_size in (1, 3, 16):
        ada = _lm(AdaInferLM, tiny_model_dirs["qwen2"], batch_size=batch_size, policy="threshold", gap=0.01, min_layer=2)
        results.append(ada.loglikelihood(_loglikelihood_requests()))
    for other in results[1:]:
        assert [a.exit.layers for a in other] == [a.exit.layers for a in results[0]]
        assert [a[0] for a in other] == pytest.approx([a[0] for a in results[0]], abs=1e-4)


@pytest.mark.parametrize(
    "args, message",
    [
        ({"policy": "nope"}, "unknown policy 'nope'; choose one of: "),
        ({"policy": "threshold"}, "needs exactly one of gap"),
        ({"policy": "threshold", "gap": "high"}, "gap='high' is not a valid float"),
        ({"policy": "full", "gap": 0.5}, "policy=full does not take gap"),
        ({"policy": "static"}, "needs layer=K"),
        ({"policy": "full", "colour": "blue"}, "unknown model arg(s) colour; valid:"),
    ],
)
def test_bad_model_args_are_refused_in_one_line(tiny_model_dirs, args, message):
    with pytest.raises(AdaInferError) as error:
        _lm(AdaInferLM, tiny_model_dirs["llama"], **args)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_static_layer_beyond_depth_is_refused(tiny_model_dirs):
    with pytest.raises(AdaInferError, match="outside 1..4"):
        _lm(AdaInferLM, tiny_model_dirs["llama"], policy="static", layer=7)


def test_split_over_gpus_is_refused_in_one_line(tiny_model_dirs):
    with pytest.raises(AdaInferError, match="parallelize=True .* not supported"):
        _lm(AdaInferLM, tiny_model_dirs["llama"], parallelize=True)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_bfloat16_full_depth_matches_hf_backend(tiny_model_dirs, arch):
    hf = _lm(HFLM, tiny_model_dirs[arch], batch_size=4, dtype="bfloat16")
    ada = _lm(AdaInferLM, tiny_model_dirs[arch], batch_size=4, dtype="bfloat16", policy="full")
    assert ada.model.dtype == ada.engine.stack.head.weight.dtype == __import__("torch").bfloat16
    ours = [lp for lp, _ in ada.loglikelihood(_loglikelihood_requests())]
    reference = [lp for lp, _ in hf.loglikelihood(_loglikelihood_requests())]
    # bf16 keeps ~3 significant digits; the two paths differ only in where the head is applied.
    assert ours == pytest.approx(reference, rel=2e-2, abs=5e-2)


def test_identical_inputs_run_once_like_hflm_logits_cache(tiny_model_dirs):
    """Single-token choices of one context share one computed row (HFLM's logits cache does too)."""
    ada = _lm(AdaInferLM, tiny_model_dirs["llama"], batch_size=16, policy="full")
    rows_seen = []
    run = ada.engine.run
    ada.engine.run = lambda batch: rows_seen.append(batch.input_ids.shape[0]) or run(batch)
    contexts = CONTEXTS[:2]
    candidates = [" the", " a", " that", " is", " film", " dog", " yes", " no", " fox", " lazy"]
    choices = [c for c in candidates if len(ada.tok_encode(c)) == 1][:3]
    assert len(choices) == 3, "the tiny tokenizer should have single-token words"
    requests = [Instance("loglikelihood", {}, (ctx, ch), idx=0) for ctx in contexts for ch in choices]
    answers = ada.loglikelihood(requests)
    assert sum(rows_seen) == len(contexts)
    hf = _lm(HFLM, tiny_model_dirs["llama"], batch_size=16)
    assert [a[0] for a in answers] == pytest.approx([r[0] for r in hf.loglikelihood(requests)], abs=1e-4)
    # The shared row's cost is split among its requests.
    assert sum(a.exit.full_flops for a in answers) == pytest.approx(
        sum(ada.costs.request(len(ada.tok_encode(c)), 4, 1, 0).full_flops for c in contexts)
    )


def _generation_requests(max_gen_toks: int = 10):
    until = {"until": ["."], "max_gen_toks": max_gen_toks, "do_sample": False}
    return [Instance("generate_until", {}, (ctx, dict(until)), idx=i) for i, ctx in enumerate(CONTEXTS * 2)]


def test_generation_with_exits_is_batch_invariant_and_accounted_per_token(tiny_model_dirs):
    outputs = []
    for batch_size in (1, 4):
        ada = _lm(AdaInferLM, tiny_model_dirs["llama"], batch_size=batch_size, policy="threshold", top_prob=0.03, min_layer=1)
        outputs.append(ada.generate_until(_generation_requests()))
    single, batched = outputs
    assert batched == single, "rows leaving the batch early must not change the other rows' text"
    layers = [layer for text in batched for layer in text.exit.token_layers]
    assert len(set(layers)) > 1, "the threshold should spread token exits over layers"
    assert [t.exit.token_layers for t in batched] == [t.exit.token_layers for t in single]
    for text in batched:
        record = text.exit
        assert record.tokens == len(record.token_layers) >= 1
        assert record.layers == pytest.approx(sum(record.token_layers) / record.tokens)
        if max(record.token_layers) <= 2:  # every token skipped half the model
            assert record.flops < record.full_flops


def test_generation_stops_at_the_stop_string_and_max_gen_toks(tiny_model_dirs):
    ada = _lm(AdaInferLM, tiny_model_dirs["gpt2"], batch_size=4, policy="full")
    hf = _lm(HFLM, tiny_model_dirs["gpt2"], batch_size=4)
    for until in ([" the", "."], [","], []):
        requests = [
            Instance("generate_until", {}, (ctx, {"until": list(until), "max_gen_toks": 6, "do_sample": False}), idx=0)
            for ctx in CONTEXTS
        ]
        texts = ada.generate_until(requests)
        assert texts == hf.generate_until(requests)
        assert all(t.exit.tokens <= 6 for t in texts)


def test_sampling_falls_back_to_model_generate_and_says_so(tiny_model_dirs):
    ada = _lm(AdaInferLM, tiny_model_dirs["llama"], batch_size=2, policy="threshold", top_prob=0.03)
    requests = [
        Instance("generate_until", {}, (ctx, {"until": ["."], "max_gen_toks": 5, "do_sample": True, "temperature": 0.7}), idx=0)
        for ctx in CONTEXTS[:2]
    ]
    texts = ada.generate_until(requests)
    assert all(t.exit.full_depth_generation for t in texts)
    assert all(set(t.exit.token_layers) == {ada.engine.num_layers} for t in texts)
