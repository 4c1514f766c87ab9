"""What the GPU check reports: the environment, the issue's targets read off the timing rows, and
``report.json`` / ``report.md`` (rewritten after every section)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from adainfer_lmeval.experiments.bench.machine import run_environment
from adainfer_lmeval.experiments.gpu.parity import LOGPROB_TOLERANCE, TOLERANCE
from adainfer_lmeval.experiments.gpu.runners import params_text


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
    import transformers

    env = {**run_environment("adainfer_lmeval.experiments.gpu_check", argv), "torch": torch.__version__,
           "device": str(device),
           # The run step may put another transformers ahead of the machine's own: say which one ran.
           "transformers_from": str(Path(transformers.__file__).parent)}
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
                  f"{params_text(res.get('params', 0))} parameters, {res.get('num_layers', '-')} layers. Ideal speedup = "
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
