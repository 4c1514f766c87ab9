"""Parity on tiny models, per dtype: the engine, the backend and the generator against transformers and
lm-eval's ``hf`` backend. Each check returns ``{"max_abs_diff", "passed", "tolerance", "detail"}``."""

from __future__ import annotations

import contextlib
import copy
import io
import time

import torch

from adainfer_lmeval.core.architectures import DecoderStack
from adainfer_lmeval.core.engine import EarlyExitEngine, ExitBatch
from adainfer_lmeval.core.generation import EarlyExitGenerator
from adainfer_lmeval.experiments.gpu.budget import log
from adainfer_lmeval.experiments.gpu.tiny_models import DTYPES, PARITY_ARCHS, random_rows, tiny_model, tiny_tokenizer
from adainfer_lmeval.policies import build_policy

#: (atol, rtol) per element, |ours - reference| <= atol + rtol * |reference|. bf16 keeps ~3
#: significant digits and the two paths apply the head to differently shaped tensors.
TOLERANCE = {"float32": (1e-4, 1e-4), "bfloat16": (6e-2, 2e-2)}
#: lm-eval's summed log-probabilities (test_backend.py's tolerances)
LOGPROB_TOLERANCE = {"float32": (1e-4, 0.0), "bfloat16": (5e-2, 2e-2)}

CONTEXTS = ["the quick brown fox jumps over", "question : what is the answer ? answer :", "a film that is great ,",
            "the lazy dog"]
CONTINUATIONS = [" the lazy dog", " yes", " no", " positive negative", " ."]
TEXTS = ["the quick brown fox jumps over the lazy dog . " * 3,
         "a movie that is bad . a film that is great , question : what is the answer ?"]


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
    from adainfer_lmeval.adapter.backend import AdaInferLM
    from adainfer_lmeval.adapter.harness import HFLM, Instance

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
    rows = random_rows(0, 5, vocab)
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
