"""One device run that answers: is early exit right on a GPU, and do skipped layers save seconds there?

``python -m adainfer_lmeval.experiments.gpu_check`` (on a CUDA machine, within ``--budget_s``; ``--smoke --device
cpu`` runs the same code on tiny shapes in seconds, and ``tests/test_gpu_check.py`` runs that):

1. **Parity**, on tiny random models of every supported family, in fp32 and bf16, on ``--device``:
   ``policy=full`` against ``model(...)`` logits and against lm-eval's ``hf`` backend
   (loglikelihood, rolling, generate_until); static exits against the hidden-state lens (final
   norm + head on ``hidden_states[k]``); the early-exit generator against ``model.generate`` (full
   depth) and against the truncated model's ``generate`` (a static exit).
2. **Timing**, on random-weight models of real shapes in bf16 (timing does not depend on the
   weights' values): lm-eval's ``hf`` backend, ``policy=full``, a static exit at half depth and
   per-row mixed exits (each row leaves the batch at its own drawn layer; without and with exit
   checks), at each batch size, with synchronised timers, a warm-up pass and interleaved repeats
   (medians). Per row: mean layers, the ideal speedup (full-depth FLOPs over executed FLOPs, from
   the responses' ExitRecords), the measured one against ``policy=full`` and their ratio; one exit
   decision against one layer (:func:`.benchmark.decision_cost`); generation tokens/s; and one
   profiled pass per variant (kernel launches, host syncs, GPU busy time against wall-clock).
3. **Report**: ``report.json`` and ``report.md`` in ``--output_dir`` (default ``$OUT``), rewritten
   after every section so that a run cut short still leaves what it measured.

Without lm-eval (a bare GPU machine) the package still imports; the comparisons that need lm-eval
are skipped with one line, and timing falls back to the engine itself against a plain forward.
The exit status is 1 when a parity check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import importlib.util
import io
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from adainfer_lmeval.core.accounting import CostModel
from adainfer_lmeval.core.architectures import DecoderStack
from adainfer_lmeval.experiments.benchmark import Variant, _ideal, _records, decision_cost, make_backend
from adainfer_lmeval.core.exit_checks import ExitCheckConfig
from adainfer_lmeval.core.engine import EarlyExitEngine, ExitBatch
from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.core.generation import EarlyExitGenerator
from adainfer_lmeval.policies import ExitPolicy, build_policy

PARITY_ARCHS = ("llama", "qwen2", "mistral", "gemma3_text", "gpt2", "opt")
SMOKE_ARCHS = ("llama", "gemma3_text", "gpt2", "opt")  # one of each code path in architectures.py
#: (atol, rtol) per element, |ours - reference| <= atol + rtol * |reference|. bf16 keeps ~3
#: significant digits and the two paths apply the head to differently shaped tensors.
TOLERANCE = {"float32": (1e-4, 1e-4), "bfloat16": (6e-2, 2e-2)}
#: lm-eval's summed log-probabilities (test_backend.py's tolerances)
LOGPROB_TOLERANCE = {"float32": (1e-4, 0.0), "bfloat16": (5e-2, 2e-2)}

#: Real model shapes for timing (random weights). Llama-3.2-1B: 16 layers of 2048 with GQA and a
#: tied 128k head; Llama-2-7B: 32 layers of 4096, 32k head.
SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0, max_position_embeddings=4096),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False,
                       max_position_embeddings=4096),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False, max_position_embeddings=512),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CHECK_VOCAB = 64  # K of the mixed-exit variant that pays for pruned checks (adainfer_lmeval/core/exit_checks.py)

CONTEXTS = ["the quick brown fox jumps over", "question : what is the answer ? answer :", "a film that is great ,",
            "the lazy dog"]
CONTINUATIONS = [" the lazy dog", " yes", " no", " positive negative", " ."]
TEXTS = ["the quick brown fox jumps over the lazy dog . " * 3,
         "a movie that is bad . a film that is great , question : what is the answer ?"]


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def log(message: str) -> None:
    print(f"[gpu_check] {message}", flush=True)


def has_lm_eval() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---- tiny models (the families of tests/conftest.py) -------------------------------------------


def tiny_tokenizer():
    """A 300-word byte-level BPE trained on the spot (the tokenizer of tests/conftest.py)."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = ["the quick brown fox jumps over the lazy dog . a film that is great , a movie that is bad .",
              "question : what is the answer ? answer : yes no maybe positive negative"] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>")


def tiny_config(arch: str, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    tiny = dict(num_hidden_layers=4, num_attention_heads=4, **common)
    rotary = dict(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **tiny)
    if arch == "llama":
        return tf.LlamaConfig(**rotary)
    if arch == "qwen2":
        return tf.Qwen2Config(**rotary)
    if arch == "mistral":
        return tf.MistralConfig(sliding_window=6, **rotary)
    if arch == "gemma3_text":
        return tf.Gemma3TextConfig(head_dim=8, sliding_window=6, final_logit_softcapping=5.0, **rotary)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=128, **common)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=32, ffn_dim=64, max_position_embeddings=128, word_embed_proj_dim=16, **tiny)
    raise AdaInferError(f"no tiny config for {arch!r}; choose from {', '.join(PARITY_ARCHS)}")


def tiny_model(arch: str, vocab: int, dtype: torch.dtype, device, seed: int = 1000):
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(arch, vocab))
    # A sharpened head spreads predictions (random init is near-uniform), as in tests/conftest.py.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.to(device=device, dtype=dtype).eval()


def _rows(seed: int, count: int, vocab: int, low: int = 5, high: int = 20) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=g).tolist()
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]


# ---- parity checks: each returns {"max_abs_diff", "passed", ...} --------------------------------


def _compare(ours: list[torch.Tensor], reference: list[torch.Tensor], atol: float, rtol: float) -> dict:
    worst, excess = 0.0, float("-inf")
    for a, b in zip(ours, reference):
        a, b = a.float(), b.float()
        if a.shape != b.shape:
            return {"max_abs_diff": float("inf"), "passed": False, "detail": f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"}
        diff = (a - b).abs()
        worst = max(worst, float(diff.max()))
        excess = max(excess, float((diff - (atol + rtol * b.abs())).max()))
    return {"max_abs_diff": worst, "tolerance": {"atol": atol, "rtol": rtol}, "passed": excess <= 0.0}


@torch.no_grad()
def parity_full_vs_forward(model, rows: list[list[int]], atol: float, rtol: float) -> dict:
    """``policy=full`` through the engine (one right-padded batch) against ``model(row).logits``."""
    device = model.device
    engine = EarlyExitEngine(model, build_policy("full", {}))
    out = engine.run(ExitBatch.from_rows(rows, [0] * len(rows), device=device))
    reference = [model(torch.tensor([row], device=device)).logits[0] for row in rows]
    result = _compare(out.logits, reference, atol, rtol)
    result["passed"] = result["passed"] and out.exit_layers == [engine.num_layers] * len(rows)
    return result


@torch.no_grad()
def parity_static_vs_lens(model, rows: list[list[int]], atol: float, rtol: float) -> dict:
    """A static exit at every layer 1..L-1 against final norm + head on ``hidden_states[k]``."""
    device = model.device
    decisions = [max(0, len(r) - 3) for r in rows]
    batch = ExitBatch.from_rows(rows, decisions, device=device)
    stack = DecoderStack(model)
    hidden = [model(torch.tensor([row], device=device), output_hidden_states=True).hidden_states for row in rows]
    results = []
    for layer in range(1, stack.num_layers):
        out = EarlyExitEngine(model, build_policy("static", {"layer": layer})).run(batch)
        reference = [stack.exit_logits(h[layer][0, d:len(row)]) for h, d, row in zip(hidden, decisions, rows)]
        res = _compare(out.logits, reference, atol, rtol)
        res["passed"] = res["passed"] and out.exit_layers == [layer] * len(rows)
        results.append(res)
    return {"max_abs_diff": max(r["max_abs_diff"] for r in results), "tolerance": results[0]["tolerance"],
            "passed": all(r["passed"] for r in results), "detail": f"layers 1..{stack.num_layers - 1}"}


def _left_padded(vocab: int, device, seed: int = 0, rows: int = 3, width: int = 9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, rows):
        mask[row, : 2 * row + 1] = 0  # rows of different lengths, padded on the left
    return ids.masked_fill(mask == 0, 0).to(device), mask.to(device)


def _truncated(model, layers: int):
    """The model with its first ``layers`` decoder layers only (its own norm and head on top)."""
    short = copy.deepcopy(model)
    del DecoderStack(short).layers[layers:]
    short.config.num_hidden_layers = layers
    if getattr(short.config, "layer_types", None):
        short.config.layer_types = short.config.layer_types[:layers]
    return short


def generation_agreement(ours: torch.Tensor, reference, width: int, atol: float, rtol: float) -> dict:
    """Greedy tokens against ``model.generate``'s (``reference``: sequences and raw per-step logits).

    Identical tokens pass. At the first step where a row's token differs the texts part ways, so
    nothing after it is compared: the divergence passes only when it is a tie, i.e. the
    reference's logits of its token and of ours are within the tolerance (bf16 has ~3 digits, and
    exact bf16 ties do occur on small logits). ``max_abs_diff`` is that logit gap (0: no divergence).
    """
    expected = reference.sequences
    if ours.shape != expected.shape:
        return {"max_abs_diff": float("inf"), "passed": False, "detail": f"shapes {tuple(ours.shape)} vs {tuple(expected.shape)}"}
    differ = ours[:, width:] != expected[:, width:]
    total = f"{differ.numel()} generated tokens"
    if not bool(differ.any()):
        return {"max_abs_diff": 0.0, "passed": True, "detail": total}
    step = int(differ.any(0).nonzero()[0])
    logits = reference.logits[step].float()
    gaps, ties = [], []
    for row in differ[:, step].nonzero().flatten().tolist():
        theirs, mine = logits[row, expected[row, width + step]], logits[row, ours[row, width + step]]
        gaps.append(float(theirs - mine))
        ties.append(float(theirs - mine) <= atol + rtol * abs(float(theirs)))
    return {"max_abs_diff": max(gaps), "passed": all(ties),
            "detail": f"{total}; first differs at step {step} ({'a tie within tolerance' if all(ties) else 'NOT a tie'}: "
                      f"reference logit gap {max(gaps):.3g})"}


def _reference_generate(model, ids, mask, new_tokens: int):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                          eos_token_id=None, output_logits=True, return_dict_in_generate=True)


@torch.no_grad()
def parity_generation(model, atol: float, rtol: float, new_tokens: int = 12) -> dict:
    """Greedy tokens of the early-exit generator at full depth against ``model.generate`` (left-padded
    rows of different lengths)."""
    ids, mask = _left_padded(model.config.vocab_size, model.device)
    out = EarlyExitGenerator(EarlyExitEngine(model, build_policy("full", {}))).generate(ids, mask, new_tokens, pad_token_id=0)
    return generation_agreement(out.sequences, _reference_generate(model, ids, mask, new_tokens), ids.shape[1], atol, rtol)


@torch.no_grad()
def parity_generation_static(model, atol: float, rtol: float, layer: int = 2, new_tokens: int = 10) -> dict:
    """Every token exits at ``layer``: the text must be the ``layer``-layer model's greedy text."""
    ids, mask = _left_padded(model.config.vocab_size, model.device, seed=2)
    out = EarlyExitGenerator(EarlyExitEngine(model, build_policy("static", {"layer": layer}))).generate(
        ids, mask, new_tokens, pad_token_id=0)
    reference = _reference_generate(_truncated(model, layer), ids, mask, new_tokens)
    result = generation_agreement(out.sequences, reference, ids.shape[1], atol, rtol)
    result["passed"] = result["passed"] and all(set(layers) == {layer} for layers in out.exit_layers)
    return result


def parity_backend(model, tokenizer, dtype_name: str, batch_size: int = 4) -> dict:
    """``adainfer`` with ``policy=full`` against lm-eval's ``hf`` backend on the same requests:
    loglikelihood (log-probs and greedy flags), rolling loglikelihood (max_length=24 forces
    truncation and several windows) and generate_until texts."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from adainfer_lmeval.adapter.backend import AdaInferLM

    common = dict(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=24)
    with contextlib.redirect_stderr(io.StringIO()):  # lm-eval's progress bars, not all of which can be switched off
        return _parity_backend(HFLM(**common), AdaInferLM(policy="full", **common), dtype_name, Instance)


def _parity_backend(hf, ada, dtype_name: str, Instance) -> dict:
    requests = [Instance("loglikelihood", {}, (c, k), idx=i) for i, (c, k) in
                enumerate((c, k) for c in CONTEXTS for k in CONTINUATIONS)]
    ours, reference = ada.loglikelihood(requests, disable_tqdm=True), hf.loglikelihood(requests, disable_tqdm=True)
    rolling = [Instance("loglikelihood_rolling", {}, (t,), idx=0) for t in TEXTS]
    ours_rolling = ada.loglikelihood_rolling(rolling, disable_tqdm=True)
    reference_rolling = hf.loglikelihood_rolling(rolling, disable_tqdm=True)
    until = {"until": ["."], "max_gen_toks": 8, "do_sample": False}
    gen = [Instance("generate_until", {}, (c, dict(until)), idx=0) for c in CONTEXTS]
    texts = [str(t) for t in ada.generate_until(gen, disable_tqdm=True)]
    differing = [c for c, a, b in zip(CONTEXTS, texts, hf.generate_until(gen, disable_tqdm=True)) if a != b]
    ties = []
    for context in differing:  # token by token, as generate_until fed it (left-truncated to max_length - max_gen_toks)
        ids = torch.tensor([ada.tok_encode(context)[-(ada.max_length - until["max_gen_toks"]):]], device=ada.device)
        mask = torch.ones_like(ids)
        tokens = ada.generator.generate(ids, mask, until["max_gen_toks"], pad_token_id=0).sequences
        ties.append(generation_agreement(tokens, _reference_generate(ada.model, ids, mask, until["max_gen_toks"]),
                                         ids.shape[1], *TOLERANCE[dtype_name]))
    atol, rtol = LOGPROB_TOLERANCE[dtype_name]
    pairs = [(float(o[0]), float(r[0])) for o, r in zip(ours, reference)] + \
            [(float(o), float(r)) for o, r in zip(ours_rolling, reference_rolling)]
    diff = max(abs(a - b) for a, b in pairs)
    within = all(abs(a - b) <= atol + rtol * abs(b) for a, b in pairs)
    greedy_equal = [g for _, g in ours] == [g for _, g in reference]
    # Texts must match in fp32; in bf16 a greedy tie may part them, so a differing text passes
    # there when its tokens part at a tie (see generation_agreement).
    texts_ok = not differing or (dtype_name != "float32" and all(t["passed"] for t in ties))
    same_texts = len(gen) - len(differing)
    return {"max_abs_diff": diff, "tolerance": {"atol": atol, "rtol": rtol}, "passed": within and greedy_equal and texts_ok,
            "detail": f"{len(requests)} loglikelihood + {len(rolling)} rolling log-probs; greedy flags "
                      f"{'equal' if greedy_equal else 'DIFFER'}; generate_until texts {same_texts}/{len(gen)} equal"
                      + "".join(f"; a differing text: {t['detail']}" for t in ties)}


def run_parity(device, dtypes: list[str], archs: list[str], use_lm_eval: bool, report) -> list[dict]:
    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    rows = _rows(0, 5, vocab)
    results = []
    for dtype_name in dtypes:
        atol, rtol = TOLERANCE[dtype_name]
        for arch in archs:  # the seeds of tests/conftest.py
            seed = 1000 + PARITY_ARCHS.index(arch) if arch in PARITY_ARCHS else 1000
            model = tiny_model(arch, vocab, DTYPES[dtype_name], device, seed=seed)
            checks = {
                "full vs model(...)": lambda: parity_full_vs_forward(model, rows, atol, rtol),
                "static exits vs hidden-state lens": lambda: parity_static_vs_lens(model, rows, atol, rtol),
                "generation full vs model.generate": lambda: parity_generation(model, atol, rtol),
                "generation static@2 vs truncated generate": lambda: parity_generation_static(model, atol, rtol),
            }
            if use_lm_eval:
                checks["full vs lm-eval hf backend"] = lambda: parity_backend(model, tokenizer, dtype_name)
            for name, check in checks.items():
                started = time.perf_counter()
                try:
                    res = check()
                except Exception as exc:  # a crash is a failed check, reported in one line
                    res = {"max_abs_diff": None, "passed": False, "detail": f"{type(exc).__name__}: {exc}"[:300]}
                res = {"arch": arch, "dtype": dtype_name, "check": name, **res,
                       "seconds": round(time.perf_counter() - started, 3)}
                results.append(res)
                log(f"parity {dtype_name} {arch:12s} {name}: {'ok' if res['passed'] else 'FAILED'} "
                    f"(max diff {res['max_abs_diff']}{'; ' + res['detail'] if res.get('detail') else ''})")
            del model
        report()
    return results


# ---- timing on real shapes ----------------------------------------------------------------------


class RowDrawnExits(ExitPolicy):
    """Exit each row at its own layer, drawn uniformly from ``min_layer``..L (seeded, per row).

    Knows nothing of the model's outputs: the rows leave the batch at different layers, as under
    a real policy, so the time of shrinking batches is measured on its own. With ``features``
    the engine also pays for the exit checks at every consulted layer (the decisions ignore them).
    """

    name = "row_drawn"

    def __init__(self, min_layer: int, seed: int = 0, features: tuple[str, ...] = ()):
        self.min_layer = int(min_layer)
        self.seed = seed
        self.features = tuple(features)
        self.reset()

    def reset(self) -> None:
        """Start the draws again: every pass then exits the same rows at the same layers."""
        self.generator = torch.Generator().manual_seed(self.seed)

    def decide(self, layer, num_layers, history):
        # Of the layers layer..L still open to a surviving row, this one with equal chance.
        draw = torch.rand(history.shape[0], generator=self.generator) < 1.0 / (num_layers - layer + 1)
        return draw.to(history.device)

    def describe(self) -> dict:
        return {"name": self.name, "min_layer": self.min_layer, "features": list(self.features)}


def shape_model(name: str, device, dtype: torch.dtype):
    """A random-weight LlamaConfig model of a real shape, built directly on ``device``."""
    import transformers as tf

    config = tf.LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, **SHAPES[name])
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def timing_requests(count: int, seq_len: int, vocab: int, seed: int = 0) -> list:
    """Distinct random contexts of ``seq_len``·3/4 .. ``seq_len`` tokens, a one-token continuation
    each: one computed row per request, as lm-eval's multiple-choice requests of one question are
    not (they would share a row)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        length = int(torch.randint(max(2, 3 * seq_len // 4), seq_len + 1, (1,), generator=g))
        context = torch.randint(4, vocab, (length,), generator=g).tolist()
        out.append(((f"doc{i}", "x"), context, [int(torch.randint(4, vocab, (1,), generator=g))]))
    return out


def _variant_specs(num_layers: int) -> list[dict]:
    """hf, full, static at half depth, mixed exits (no checks), mixed exits paying pruned checks."""
    half, low = max(1, num_layers // 2), max(1, num_layers // 4)
    return [
        {"label": "hf", "variant": Variant("hf")},
        {"label": "full", "variant": Variant("full")},
        {"label": f"static(layer={half})", "variant": Variant("static", {"layer": half})},
        {"label": f"mixed({low}..{num_layers})", "variant": Variant("full"), "policy": RowDrawnExits(low)},
        {"label": f"mixed({low}..{num_layers})+checks(K={CHECK_VOCAB})",
         "variant": Variant("full", {"check_vocab": CHECK_VOCAB}), "policy": RowDrawnExits(low, features=("gap",))},
    ]


def _set_policy(engine, policy: ExitPolicy) -> None:
    policy.bind(engine.stack.identity())
    engine.policy = policy  # the generator reads its policy from the engine


class LmEvalRunner:
    """One variant through lm-eval's request path (``_loglikelihood_tokens``) at one batch size."""

    def __init__(self, spec: dict, model, tokenizer, batch_size: int, device):
        self.label, self.policy = spec["label"], spec.get("policy")
        self.lm = make_backend(spec["variant"], model, tokenizer, batch_size, str(device))
        if self.policy is not None:
            _set_policy(self.lm.engine, self.policy)

    def __call__(self, requests) -> list:
        if self.policy is not None:
            self.policy.reset()
        return _records(self.lm._loglikelihood_tokens(requests, disable_tqdm=True))


class EngineRunner:
    """Without lm-eval: the engine itself (``hf`` becomes a plain right-padded ``model(...)`` forward)."""

    def __init__(self, spec: dict, model, tokenizer, batch_size: int, device):
        self.label, self.policy, self.model, self.batch_size, self.device = spec["label"], spec.get("policy"), model, batch_size, device
        variant = spec["variant"]
        self.engine = None
        if not variant.is_hf:
            args = dict(variant.policy_args)
            checks = ExitCheckConfig(vocab=args.pop("check_vocab", None))
            self.engine = EarlyExitEngine(model, self.policy or build_policy(variant.name, args), checks=checks)
            self.costs = CostModel.from_stack(self.engine.stack, check_vocab=checks.vocab)

    @torch.no_grad()
    def __call__(self, requests) -> list:
        if self.policy is not None:
            self.policy.reset()
        rows = sorted(((c + k)[:-1] for _, c, k in requests), key=len, reverse=True)
        records = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            batch = ExitBatch.from_rows(chunk, [len(r) - 1 for r in chunk], device=self.device)
            if self.engine is None:
                logits = self.model(batch.input_ids).logits
                torch.log_softmax(logits.float(), -1).amax(-1).sum().item()  # score like a backend, one sync
                continue
            out = self.engine.run(batch)
            for j, row in enumerate(chunk):
                torch.log_softmax(out.logits[j].float(), -1)
                records.append(self.costs.request(len(row), out.exit_layers[j], 1, out.checks[j], 1,
                                                  out.pruned_checks[j], out.check_rows[j]))
        return records


def _timed(fn, device):
    synchronize(device)
    started = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - started, out


def time_loglikelihood(model, tokenizer, device, batch_sizes: list[int], seq_len: int, repeats: int,
                       use_lm_eval: bool, deadline: float, notes: list, min_requests: int = 24) -> list[dict]:
    """Every variant at every batch size, interleaved (the order rotates per repeat), medians."""
    num_layers = DecoderStack(model).num_layers
    specs = _variant_specs(num_layers)
    runner_cls = LmEvalRunner if use_lm_eval else EngineRunner
    hf_label = "hf" if use_lm_eval else "forward"
    rows = []
    for bs in batch_sizes:
        if time.time() > deadline:
            notes.append(f"batch {bs}: skipped, out of time budget")
            log(notes[-1])
            continue
        requests = timing_requests(max(min_requests, 2 * bs), seq_len, model.config.vocab_size, seed=bs)
        runners = [runner_cls(spec, model, tokenizer, bs, device) for spec in specs]
        for runner in runners:  # warm-up: allocator, kernels, cuBLAS heuristics for these shapes
            _timed(lambda: runner(requests), device)
        times = {r.label: [] for r in runners}
        records = {}
        for rep in range(repeats):
            k = rep % len(runners)
            for runner in runners[k:] + runners[:k]:
                seconds, out = _timed(lambda: runner(requests), device)
                times[runner.label].append(seconds)
                records.setdefault(runner.label, out)
        log(f"batch {bs}: " + ", ".join(f"{hf_label if label == 'hf' else label} {statistics.median(t):.3f}s"
                                         for label, t in times.items()))
        for runner in runners:
            t = times[runner.label]
            label = hf_label if runner.label == "hf" else runner.label
            row = {"batch": bs, "variant": label, "requests": len(requests), "times_s": t, "median_s": statistics.median(t)}
            if runner.label == "hf":
                row.update(mean_layers=None, ideal_speedup=None, measured_speedup=None, measured_over_ideal=None)
            else:
                row["mean_layers"], row["ideal_speedup"] = _ideal(records[runner.label])
                row["measured_speedup"] = statistics.median(f / x for f, x in zip(times["full"], t))
                row["measured_over_ideal"] = row["measured_speedup"] / row["ideal_speedup"]
            row["time_vs_hf"] = statistics.median(x / h for x, h in zip(t, times["hf"]))
            rows.append(row)
        del runners
    return rows


@torch.no_grad()
def time_generation(model, device, batch_sizes: list[int], prompt_len: int, new_tokens: int, repeats: int,
                    deadline: float, notes: list) -> list[dict]:
    """Greedy generation tokens/s: ``model.generate``, and the early-exit generator at full depth,
    with a static exit at half depth and with mixed per-token exits."""
    stack = DecoderStack(model)
    num_layers = stack.num_layers
    costs = CostModel.from_stack(stack)
    half, low = max(1, num_layers // 2), max(1, num_layers // 4)
    mixed = RowDrawnExits(low)
    generators = {
        "full": EarlyExitGenerator(EarlyExitEngine(model, build_policy("full", {}))),
        f"static(layer={half})": EarlyExitGenerator(EarlyExitEngine(model, build_policy("static", {"layer": half}))),
        f"mixed({low}..{num_layers})": EarlyExitGenerator(EarlyExitEngine(model, mixed)),
    }
    rows = []
    for bs in batch_sizes:
        if time.time() > deadline:
            notes.append(f"generation at batch {bs}: skipped, out of time budget")
            log(notes[-1])
            continue
        g = torch.Generator().manual_seed(bs)
        ids = torch.randint(4, model.config.vocab_size, (bs, prompt_len), generator=g).to(device)
        mask = torch.ones_like(ids)

        def run_generate():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=0, eos_token_id=None)

        runs = {"model.generate": run_generate}
        for label, gen in generators.items():
            def run(gen=gen):
                mixed.reset()
                return gen.generate(ids, mask, new_tokens, pad_token_id=0)
            runs[label] = run
        for fn in runs.values():
            _timed(fn, device)
        times = {label: [] for label in runs}
        outputs = {}
        for rep in range(repeats):
            labels = list(runs)
            k = rep % len(labels)
            for label in labels[k:] + labels[:k]:
                seconds, out = _timed(runs[label], device)
                times[label].append(seconds)
                outputs.setdefault(label, out)
        for label, t in times.items():
            median = statistics.median(t)
            row = {"batch": bs, "variant": label, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
                   "median_s": median, "tokens_per_s": bs * new_tokens / median,
                   "time_vs_full": statistics.median(x / f for x, f in zip(t, times["full"]))}
            out = outputs[label]
            if label != "model.generate":
                records = [costs.generation(prompt_len, layers, checks) for layers, checks in zip(out.exit_layers, out.checks)]
                row["mean_layers"] = sum(sum(r.token_layers) for r in records) / sum(r.tokens for r in records)
                row["ideal_speedup"] = sum(r.full_flops for r in records) / sum(r.flops for r in records)
                row["measured_speedup"] = statistics.median(f / x for f, x in zip(times["full"], t))
                row["measured_over_ideal"] = row["measured_speedup"] / row["ideal_speedup"]
            rows.append(row)
        log(f"generation batch {bs}: " + ", ".join(f"{r['variant']} {r['tokens_per_s']:.1f} tok/s" for r in rows if r["batch"] == bs))
    return rows


def profile_pass(runner, requests, device) -> dict:
    """One pass under torch.profiler: how many kernels it launched, how often the host waited for
    the device, and how busy the device was over the pass (a host-bound pass keeps it idle)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    synchronize(device)
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        runner(requests)
        synchronize(device)
    wall = time.perf_counter() - started
    kernels = copies_to_host = syncs = scalar_reads = ops = 0
    device_us = 0.0
    for event in prof.events():
        name = event.name
        if event.device_type == torch.autograd.DeviceType.CUDA:  # work on the device itself
            device_us += event.time_range.elapsed_us()
            if "DtoH" in name or "Device -> Pageable" in name or "Device -> Pinned" in name:
                copies_to_host += 1
            elif not name.startswith(("Memcpy", "Memset")):
                kernels += 1
            continue
        if name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"):
            syncs += 1
        if name == "aten::_local_scalar_dense":  # .item(), int(t), bool(t): a host sync on a GPU
            scalar_reads += 1
        if name.startswith("aten::"):
            ops += 1
    n = len(requests)
    on_gpu = activities[-1] != ProfilerActivity.CPU
    return {"variant": runner.label, "requests": n, "wall_s": wall, "aten_ops_per_request": ops / n,
            "kernels_per_request": kernels / n if on_gpu else None,
            "copies_to_host_per_request": copies_to_host / n if on_gpu else None,
            "host_syncs_per_request": syncs / n if on_gpu else None, "scalar_reads_per_request": scalar_reads / n,
            "device_busy_pct": 100 * device_us / 1e6 / wall if on_gpu else None}


def run_timing(shape: str, args, use_lm_eval: bool, deadline: float, tokenizer, notes: list, result: dict, report) -> None:
    device, dtype = args.device, DTYPES[args.timing_dtype]
    started = time.perf_counter()
    model = shape_model(shape, device, dtype)
    stack = DecoderStack(model)
    costs = CostModel.from_stack(stack)
    result.update(num_layers=stack.num_layers, params=sum(p.numel() for p in model.parameters()),
                  build_s=round(time.perf_counter() - started, 2), dtype=args.timing_dtype)
    log(f"{shape}: {_params(result['params'])} parameters, {stack.num_layers} layers, built in {result['build_s']} s")
    result["loglikelihood"] = time_loglikelihood(model, tokenizer, device, args.batch_sizes, args.seq_len, args.repeats,
                                                 use_lm_eval, deadline, notes, args.min_requests)
    report()

    def in_time(section: str) -> bool:
        if time.time() < deadline:
            return True
        notes.append(f"{shape}: {section} skipped, out of time budget")
        log(notes[-1])
        return False

    if in_time("decision cost"):
        result["decision_cost"] = decision_cost(stack, costs, tokens=args.seq_len, min_run_time=args.min_run_time,
                                                check_vocab=CHECK_VOCAB)
        d = result["decision_cost"]
        log(f"{shape}: one exit decision (1 position, full head) = {d['decision_pct_of_layer']:.1f}% of one layer at "
            f"{d['tokens']} tokens; pruned (K={CHECK_VOCAB}) {d['pruned_decision_pct_of_layer']:.2f}%")
        report()
    if in_time("generation"):
        result["generation"] = time_generation(model, device, args.gen_batch_sizes, args.gen_prompt, args.gen_tokens,
                                               max(1, args.repeats - 2), deadline, notes)
        report()
    if args.profile and in_time("profile"):
        bs = args.batch_sizes[0]
        requests = timing_requests(max(args.min_requests // 2, 2 * bs), args.seq_len, model.config.vocab_size, seed=99)
        runner_cls = LmEvalRunner if use_lm_eval else EngineRunner
        result["profile"] = []
        for spec in _variant_specs(stack.num_layers):
            runner = runner_cls(spec, model, tokenizer, bs, device)
            runner(requests[:2])  # warm
            result["profile"].append({"batch": bs, **profile_pass(runner, requests, device)})
        log(f"{shape}: profiled one pass per variant at batch {bs}")
        report()
    del model, stack
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ---- targets and report -------------------------------------------------------------------------


def targets(timing: dict) -> list[dict]:
    """The issue's targets, read off the timing rows: full within 3% of hf, and measured/ideal >= 0.9
    for the static half-depth exit at batch 1 and 16."""
    out = []
    for shape, res in timing.items():
        rows = res.get("loglikelihood", [])
        baseline = "model(...) forward" if any(r["variant"] == "forward" for r in rows) else "hf"  # without lm-eval
        for row in rows:
            if row["variant"] == "full" and "time_vs_hf" in row:
                out.append({"shape": shape, "batch": row["batch"], "target": f"policy=full time / {baseline} time <= 1.03",
                            "value": row["time_vs_hf"], "met": row["time_vs_hf"] <= 1.03})
            if row["variant"].startswith("static") and row["batch"] in (1, 16):
                out.append({"shape": shape, "batch": row["batch"], "target": "static half depth measured/ideal >= 0.9",
                            "value": row["measured_over_ideal"], "met": row["measured_over_ideal"] >= 0.9})
    return out


def environment(device, argv: list[str]) -> dict:
    from adainfer_lmeval.offline.pypi import package_versions

    env = {"command": " ".join(shlex.quote(a) for a in ["python", "-m", "adainfer_lmeval.experiments.gpu_check", *argv]),
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "versions": package_versions(), "device": str(device)}
    import transformers

    # The run step may put another transformers ahead of the machine's own: say which one ran.
    env["transformers_from"] = str(Path(transformers.__file__).parent)
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                   multiprocessors=props.multi_processor_count)
    else:
        env["gpu"] = None
        env["torch_threads"] = torch.get_num_threads()
    return env


def _table(headers: list[str], rows: list[list]) -> list[str]:
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + \
           ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]


def render_markdown(payload: dict) -> str:
    env = payload["environment"]
    lines = ["# GPU check: parity, bf16, and whether early exit saves wall-clock", "",
             f"- command: `{env['command']}`", f"- date (UTC): {env['date']}",
             f"- device: {env.get('gpu') or env['device']}"
             + (f" ({env['gpu_memory_gib']} GiB, compute capability {env['compute_capability']}, CUDA {env['cuda']})" if env.get("gpu") else ""),
             "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
             f"- elapsed: {payload.get('elapsed_s', '-')} s of a {payload['budget_s']} s budget"
             + ("; **incomplete**" if not payload.get("complete") else ""), ""]
    for note in payload["notes"]:
        lines.append(f"- note: {note}")
    parity = payload["parity"]
    failed = [p for p in parity if not p["passed"]]
    lines += ["", f"## Parity ({len(parity) - len(failed)}/{len(parity)} passed)", ""]
    lines += _table(["dtype", "arch", "check", "max abs diff", "passed", "detail"],
                    [[p["dtype"], p["arch"], p["check"], p["max_abs_diff"], "yes" if p["passed"] else "**NO**", p.get("detail", "")]
                     for p in parity])
    lines += ["", "Tolerances per element, |ours - reference| <= atol + rtol·|reference|: logits "
              + "; ".join(f"{k} atol {a}, rtol {r}" for k, (a, r) in TOLERANCE.items())
              + "; lm-eval log-probs " + "; ".join(f"{k} atol {a}, rtol {r}" for k, (a, r) in LOGPROB_TOLERANCE.items())
              + ". For generation, max abs diff counts the generated tokens that differ.", ""]
    for shape, res in payload["timing"].items():
        lines += [f"## Timing: {shape}-shaped, random weights, {res.get('dtype', '-')}", "",
                  f"{_params(res.get('params', 0))} parameters, {res.get('num_layers', '-')} layers. Ideal speedup = "
                  "full-depth FLOPs / FLOPs executed (exit checks included); measured = time(full) / time(variant), "
                  "paired per repeat, median; time vs hf = time(variant) / time(hf), paired, median.", ""]
        lines += _table(["batch", "variant", "mean layers", "ideal speedup", "measured speedup", "measured/ideal",
                         "time vs hf", "median s", "requests"],
                        [[r["batch"], r["variant"], r["mean_layers"], r["ideal_speedup"], r["measured_speedup"],
                          r["measured_over_ideal"], r["time_vs_hf"], r["median_s"], r["requests"]]
                         for r in res.get("loglikelihood", [])])
        d = res.get("decision_cost")
        if d:
            lines += ["", f"One exit decision (final norm + full head + softmax + top-2 at one position) = "
                      f"{d['decision_pct_of_layer']:.2f}% of one decoder layer over {d['tokens']} tokens at batch 1 "
                      f"({d['decision_ms']:.3f} ms vs {d['layer_ms']:.3f} ms; FLOPs say {d['flops_pct_of_layer']:.2f}%); "
                      f"16 positions {d['decision_16rows_pct_of_layer']:.2f}%; a pruned check (K={d['check_vocab']}) "
                      f"{d['pruned_decision_pct_of_layer']:.3f}%."]
        if res.get("generation"):
            lines += ["", "Generation (greedy, no end-of-sequence):", ""]
            lines += _table(["batch", "variant", "prompt", "new tokens", "tokens/s", "mean layers", "ideal speedup",
                             "measured speedup", "measured/ideal"],
                            [[g["batch"], g["variant"], g["prompt_tokens"], g["new_tokens"], g["tokens_per_s"],
                              g.get("mean_layers"), g.get("ideal_speedup"), g.get("measured_speedup"),
                              g.get("measured_over_ideal")] for g in res["generation"]])
        if res.get("profile"):
            lines += ["", "One profiled pass per variant (torch.profiler; per request):", ""]
            lines += _table(["batch", "variant", "aten ops", "kernels", "copies to host", "host syncs", "scalar reads",
                             "device busy % of wall"],
                            [[p["batch"], p["variant"], p["aten_ops_per_request"], p["kernels_per_request"],
                              p["copies_to_host_per_request"], p["host_syncs_per_request"], p["scalar_reads_per_request"],
                              p["device_busy_pct"]] for p in res["profile"]])
        lines.append("")
    if payload["targets"]:
        lines += ["## Targets", ""]
        lines += _table(["shape", "batch", "target", "value", "met"],
                        [[t["shape"], t["batch"], t["target"], t["value"], "yes" if t["met"] else "**no**"]
                         for t in payload["targets"]])
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, payload: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload["targets"] = targets(payload["timing"])
    (out_dir / "report.json").write_text(json.dumps(payload, indent=2, default=str))
    (out_dir / "report.md").write_text(render_markdown(payload))


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="python -m adainfer_lmeval.experiments.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, few repeats, batch 1 and 4 (seconds on a CPU): checks the script, not the speed")
    parser.add_argument("--output_dir", default=os.environ.get("OUT") or "out/gpu_check",
                        help="where report.md and report.json go (default: $OUT, else out/gpu_check)")
    parser.add_argument("--budget_s", type=float, default=450.0,
                        help="stop starting new sections after this many seconds (the report says what was skipped)")
    parser.add_argument("--shapes", default=None, help=f"timing shapes, from {', '.join(SHAPES)}")
    parser.add_argument("--archs", default=None,
                        help=f"tiny families for the parity checks (default {','.join(PARITY_ARCHS)}; smoke {','.join(SMOKE_ARCHS)})")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="parity dtypes")
    parser.add_argument("--timing_dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--batch_sizes", default=None, help="loglikelihood batch sizes (default 1,16,64; smoke 1,4)")
    parser.add_argument("--gen_batch_sizes", default=None, help="generation batch sizes (default 1,16; smoke 1,2)")
    parser.add_argument("--seq_len", type=int, default=None, help="longest context in tokens (default 256; smoke 24)")
    parser.add_argument("--gen_prompt", type=int, default=None, help="generation prompt tokens (default 128; smoke 8)")
    parser.add_argument("--gen_tokens", type=int, default=None, help="generated tokens per row (default 32; smoke 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; smoke 2)")
    parser.add_argument("--min_requests", type=int, default=None,
                        help="requests per timed pass: this many, or 2 batches if more (default 24; smoke 4)")
    parser.add_argument("--min_run_time", type=float, default=None, help="seconds per decision-cost timer (default 0.5)")
    parser.add_argument("--no_parity", action="store_true")
    parser.add_argument("--no_timing", action="store_true")
    parser.add_argument("--no_profile", dest="profile", action="store_false")
    parser.add_argument("--without_lm_eval", action="store_true", help="act as if lm-eval were not installed")
    a = parser.parse_args(argv)
    smoke = a.smoke
    defaults = dict(archs=",".join(SMOKE_ARCHS if smoke else PARITY_ARCHS), shapes="smoke" if smoke else "llama-3.2-1b,llama-2-7b", batch_sizes="1,4" if smoke else "1,16,64",
                    gen_batch_sizes="1,2" if smoke else "1,16", seq_len=24 if smoke else 256, gen_prompt=8 if smoke else 128,
                    gen_tokens=4 if smoke else 32, repeats=2 if smoke else 5, min_run_time=0.02 if smoke else 0.5,
                    min_requests=4 if smoke else 24)
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.shapes = [s for s in a.shapes.split(",") if s]
    unknown = [s for s in a.shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    a.archs = [s for s in a.archs.split(",") if s]
    a.dtypes = [s for s in a.dtypes.split(",") if s]
    if set(a.dtypes) - set(DTYPES):
        parser.error(f"--dtypes: choose from {', '.join(DTYPES)}")
    a.batch_sizes = [int(b) for b in str(a.batch_sizes).split(",")]
    a.gen_batch_sizes = [int(b) for b in str(a.gen_batch_sizes).split(",")]
    if torch.device(a.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device; use --device cpu (with --smoke)")
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.smoke and torch.device(args.device).type == "cpu":
        # Smoke timings mean nothing; on a shared CPU, extra OpenMP threads only spin (30x slower).
        torch.set_num_threads(1)
    # lm-eval warns at every backend built from a model object (here: dozens); errors still show.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    started = time.time()
    deadline = started + args.budget_s
    out_dir = Path(args.output_dir)
    use_lm_eval = has_lm_eval() and not args.without_lm_eval
    notes: list[str] = []
    if not use_lm_eval:
        notes.append("lm-eval is not installed here: the comparisons with lm-eval's hf backend are skipped, and timing "
                     "runs the engine itself against a plain model(...) forward")
        log(notes[-1])
    env = environment(args.device, argv)
    log(f"device {env.get('gpu') or args.device}; torch {torch.__version__}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if k != "torch"))
    payload = {"environment": env, "budget_s": args.budget_s, "smoke": args.smoke, "notes": notes, "parity": [],
               "timing": {}, "targets": [], "complete": False}

    def report():
        payload["elapsed_s"] = round(time.time() - started, 1)
        write_report(out_dir, payload)

    if not args.no_parity:
        payload["parity"] = run_parity(args.device, args.dtypes, args.archs, use_lm_eval, report)
    if not args.no_timing:
        tokenizer = tiny_tokenizer()  # lm-eval's backends want one; the timed requests are token ids
        for shape in args.shapes:
            if time.time() > deadline:
                notes.append(f"{shape}: skipped, out of time budget")
                log(notes[-1])
                continue
            payload["timing"][shape] = {}
            run_timing(shape, args, use_lm_eval, deadline, tokenizer, notes, payload["timing"][shape], report)
    payload["complete"] = not any("skipped, out of time" in n for n in notes)
    report()
    for t in payload["targets"]:
        log(f"target {t['shape']} batch {t['batch']}: {t['target']}: {t['value']:.3f} ({'met' if t['met'] else 'MISSED'})")
    failed = [p for p in payload["parity"] if not p["passed"]]
    log(f"parity: {len(payload['parity']) - len(failed)}/{len(payload['parity'])} passed; "
        f"wrote {out_dir / 'report.md'} and {out_dir / 'report.json'} in {payload['elapsed_s']} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
