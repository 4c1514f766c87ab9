"""The GPU check's smoke mode on the CPU, so the script cannot rot between GPU loans; and its
parity functions against deliberately broken engines (a check that cannot fail checks nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import statistics

import pytest
import torch

from adainfer_lmeval.experiments import gpu_check
from adainfer_lmeval.experiments.gpu import parity
from adainfer_lmeval.experiments.gpu.runners import CHECK_VOCAB, SHAPES, RowDrawnExits
from adainfer_lmeval.experiments.gpu.tiny_models import DTYPES, random_rows, tiny_model, tiny_tokenizer
from adainfer_lmeval.core.architectures import DecoderStack
from adainfer_lmeval.core.engine import EarlyExitEngine, ExitBatch

ROOT = Path(__file__).resolve().parents[1]
PARITY_CHECKS = {"full vs model(...)", "static exits vs hidden-state lens", "generation full vs model.generate",
                 "generation static@2 vs truncated generate", "full vs lm-eval hf backend"}


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_smoke")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    # Two families (one rotary, one with learned positions) keep this test short; the script's
    # own smoke default runs four.
    proc = subprocess.run(
        [sys.executable, "-m", "adainfer_lmeval.experiments.gpu_check", "--smoke", "--device", "cpu", "--output_dir", str(out),
         "--archs", "llama,gpt2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "report.json").read_text()), (out / "report.md").read_text(), proc.stdout


def test_smoke_parity_passes_for_every_check(smoke_report):
    _, report, markdown, stdout = smoke_report
    parity = report["parity"]
    seen = {(p["arch"], p["dtype"], p["check"]) for p in parity}
    assert seen == {(a, d, c) for a in ("llama", "gpt2") for d in ("float32", "bfloat16") for c in PARITY_CHECKS}
    assert all(p["passed"] for p in parity), [p for p in parity if not p["passed"]]
    for p in parity:
        limit = 1e-4 if p["dtype"] == "float32" else 6e-2 + 2e-2 * 50  # atol + rtol·|logits| (|logits| < 50)
        assert 0.0 <= p["max_abs_diff"] <= limit, p
    assert f"Parity ({len(parity)}/{len(parity)} passed)" in markdown
    assert f"parity: {len(parity)}/{len(parity)} passed" in stdout


def test_smoke_timing_rows_have_the_right_structure(smoke_report):
    _, report, markdown, _ = smoke_report
    timing = report["timing"]["smoke"]
    layers = timing["num_layers"]
    assert layers == SHAPES["smoke"]["num_hidden_layers"] and timing["params"] > 0
    rows = timing["loglikelihood"]
    variants = ["hf", "full", f"static(layer={layers // 2})", f"mixed({layers // 4}..{layers})",
                f"mixed({layers // 4}..{layers})+checks(K={CHECK_VOCAB})"]
    assert [(r["batch"], r["variant"]) for r in rows] == [(b, v) for b in (1, 4) for v in variants]
    times = {(r["batch"], r["variant"]): r["times_s"] for r in rows}
    for r in rows:
        # Figures follow from the repeats they report (paired per repeat), not from a second timer.
        t, hf, full = r["times_s"], times[(r["batch"], "hf")], times[(r["batch"], "full")]
        assert len(t) == 2 and r["median_s"] == pytest.approx(statistics.median(t))
        assert r["time_vs_hf"] == pytest.approx(statistics.median(x / h for x, h in zip(t, hf)))
        assert r["requests"] >= r["batch"]
        if r["variant"] == "hf":
            assert r["ideal_speedup"] is None
            continue
        assert r["measured_speedup"] == pytest.approx(statistics.median(f / x for f, x in zip(full, t)))
        assert r["measured_over_ideal"] == pytest.approx(r["measured_speedup"] / r["ideal_speedup"])
        # Exit layers come from the engine's records, not from the timer: these hold exactly.
        if r["variant"] == "full":
            assert r["mean_layers"] == layers and r["ideal_speedup"] == pytest.approx(1.0)
        elif r["variant"].startswith("static"):
            assert r["mean_layers"] == layers // 2 and r["ideal_speedup"] > 1.5
        else:
            assert layers // 4 <= r["mean_layers"] < layers and r["ideal_speedup"] > 0
    plain, checked = [r for r in rows if r["variant"].startswith("mixed") and r["batch"] == 1]
    assert plain["mean_layers"] == checked["mean_layers"], "same seeded draws with and without checks"
    assert checked["ideal_speedup"] < plain["ideal_speedup"], "the checks' FLOPs are charged"

    d = timing["decision_cost"]
    assert d["decision_pct_of_layer"] == pytest.approx(100 * d["decision_ms"] / d["layer_ms"], rel=1e-3)
    gen = timing["generation"]
    assert {(g["batch"], g["variant"]) for g in gen} == {
        (b, v) for b in (1, 2) for v in ("model.generate", "full", f"static(layer={layers // 2})", f"mixed({layers // 4}..{layers})")}
    for g in gen:
        assert g["tokens_per_s"] > 0 and g["new_tokens"] == 4
        if g["variant"].startswith("static"):
            assert g["mean_layers"] == layers // 2 and g["ideal_speedup"] > 1
    assert [p["variant"] for p in timing["profile"]] == variants
    assert all(p["aten_ops_per_request"] > 0 for p in timing["profile"])
    assert {t["target"] for t in report["targets"]} == {"policy=full time / hf time <= 1.03",
                                                        "static half depth measured/ideal >= 0.9"}
    assert all(isinstance(t["met"], bool) for t in report["targets"])
    env = report["environment"]
    assert env["command"].startswith("python -m adainfer_lmeval.experiments.gpu_check --smoke") and "torch" in env["versions"]
    assert report["complete"] and "## Timing: smoke-shaped" in markdown and "## Targets" in markdown


@pytest.fixture(scope="module")
def tiny():
    tokenizer = tiny_tokenizer()
    return tokenizer, random_rows(0, 4, len(tokenizer))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_parity_checks_fail_when_the_engine_is_off(tiny, monkeypatch, dtype):
    tokenizer, rows = tiny
    model = tiny_model("llama", len(tokenizer), DTYPES[dtype], "cpu")
    atol, rtol = parity.TOLERANCE[dtype]
    good = parity.parity_full_vs_forward(model, rows, atol, rtol)
    assert good["passed"] and good["max_abs_diff"] <= (1e-4 if dtype == "float32" else 0.5)
    assert parity.parity_static_vs_lens(model, rows, atol, rtol)["passed"]

    # Each layer of the engine 5% off (the model's own forward untouched): beyond bf16's noise too.
    run_layer = DecoderStack.run_layer
    monkeypatch.setattr(DecoderStack, "run_layer", lambda self, *a, **kw: run_layer(self, *a, **kw) * 1.05)
    bad = parity.parity_full_vs_forward(model, rows, atol, rtol)
    assert not bad["passed"] and bad["max_abs_diff"] > good["max_abs_diff"]
    assert not parity.parity_static_vs_lens(model, rows, atol, rtol)["passed"]
    # Greedy tokens shrug off small errors (RMSNorm undoes a scale): scramble the layers' output.
    monkeypatch.setattr(DecoderStack, "run_layer", lambda self, *a, **kw: run_layer(self, *a, **kw).roll(1, dims=-1))
    generation = parity.parity_generation(model, atol, rtol)
    assert not generation["passed"] and "NOT a tie" in generation["detail"]


def test_generation_agreement_tells_a_tie_from_a_bug():
    class Reference:
        sequences = torch.tensor([[5, 1, 2, 3]])
        logits = (torch.tensor([[0.0, 1.0, 1.0, 0.0]]), torch.tensor([[0.0, 0.0, 3.0, 0.5]]), torch.zeros(1, 4))

    same = parity.generation_agreement(torch.tensor([[5, 1, 2, 3]]), Reference, 1, 1e-4, 1e-4)
    assert same["passed"] and same["max_abs_diff"] == 0.0
    tie = parity.generation_agreement(torch.tensor([[5, 2, 0, 0]]), Reference, 1, 1e-4, 1e-4)  # logits 1.0 vs 1.0
    assert tie["passed"] and "step 0" in tie["detail"]
    wrong = parity.generation_agreement(torch.tensor([[5, 1, 3, 3]]), Reference, 1, 1e-4, 1e-4)  # 3.0 vs 0.5
    assert not wrong["passed"] and wrong["max_abs_diff"] == pytest.approx(2.5)


def test_row_drawn_exits_spread_rows_and_repeat_after_reset(tiny):
    tokenizer, _ = tiny
    model = tiny_model("llama", len(tokenizer), torch.float32, "cpu")
    rows = random_rows(1, 32, len(tokenizer))
    policy = RowDrawnExits(1)
    engine = EarlyExitEngine(model, policy)
    batch = ExitBatch.from_rows(rows, [len(r) - 1 for r in rows])
    first = engine.run(batch).exit_layers
    policy.reset()
    assert engine.run(batch).exit_layers == first
    assert set(first) == {1, 2, 3, 4}, "32 rows over 4 layers: each layer drawn"


def test_without_lm_eval_times_the_engine_against_a_plain_forward(tmp_path, capsys):
    code = gpu_check.main(["--smoke", "--device", "cpu", "--no_parity", "--no_profile", "--without_lm_eval",
                           "--batch_sizes", "2", "--gen_batch_sizes", "1", "--repeats", "1", "--output_dir", str(tmp_path)])
    assert code == 0
    assert "lm-eval is not installed here" in capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    rows = report["timing"]["smoke"]["loglikelihood"]
    assert [r["variant"] for r in rows][:3] == ["forward", "full", "static(layer=2)"]
    assert all(r["median_s"] > 0 for r in rows)
    assert next(r for r in rows if r["variant"] == "full")["ideal_speedup"] == pytest.approx(1.0)


def test_a_spent_budget_skips_sections_and_says_so(tmp_path):
    code = gpu_check.main(["--smoke", "--device", "cpu", "--no_parity", "--budget_s", "0", "--output_dir", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert not report["complete"] and report["notes"] == ["smoke: skipped, out of time budget"]
    assert "**incomplete**" in (tmp_path / "report.md").read_text()
