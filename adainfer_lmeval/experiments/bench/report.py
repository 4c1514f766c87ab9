"""The benchmark's tables and its report files (``benchmark.json``, ``benchmark.md``)."""

from __future__ import annotations

import json
from pathlib import Path

from adainfer_lmeval.experiments.bench.machine import OTHERS_QUIET

COLUMNS = ["model", "batch", "variant", "mean layers", "ideal speedup", "measured speedup", "measured/ideal",
           "time vs hf", "median s", "requests", "same exits as full checks"]


def _fmt(v, fmt):
    return "-" if v is None else format(v, fmt)


def table_rows(results: list[dict]) -> list[list]:
    out = []
    for res in results:
        for r in res["rows"]:
            layers = "-" if r["mean_layers"] is None else f"{r['mean_layers']:.1f}/{res['num_layers']}"
            out.append([r["model"], r["batch"], r["variant"], layers, _fmt(r["ideal_speedup"], ".2f"),
                        _fmt(r["measured_speedup"], ".2f"), _fmt(r["measured_over_ideal"], ".2f"),
                        _fmt(r["time_vs_hf"], ".3f"), _fmt(r["median_s"], ".2f"), r["requests"],
                        _fmt(None if r.get("same_exit_as_full_checks") is None else 100 * r["same_exit_as_full_checks"], ".0f")])
    return out


def _time_saved(res: dict, label: str, batch: int) -> float | None:
    """Per cent of full depth's time this variant saved at ``batch`` (1 - 1 / measured speedup)."""
    row = next((r for r in res["rows"] if r["variant"] == label and r["batch"] == batch), None)
    return None if row is None or not row.get("measured_speedup") else 100 * (1 - 1 / row["measured_speedup"])


def _offline_exit(check: dict, label: str) -> str:
    return f"{check['variants'][label]['offline_mean_exit']:.2f}" if check.get("present") else "-"


def _bench_exit(res: dict, label: str) -> str:
    row = next(r for r in res["rows"] if r["variant"] == label)
    return f"{row['mean_layers']:.2f}"


def _equal(check: dict, label: str) -> str:
    if not check.get("present"):
        return "no collection"
    same = check["same_documents"] and check["variants"][label]["exits_equal"]
    return "yes" if same else "NO"


def format_tables(results: list[dict]) -> str:
    from tabulate import tabulate

    main_table = tabulate(table_rows(results), headers=COLUMNS, tablefmt="github")
    dec = []
    for res in results:
        d = res.get("decision_cost")
        if d:
            dec.append([res["model"], d["tokens"], f"{d['layer_ms']:.2f}", f"{d['decision_ms']:.2f}",
                        f"{d['decision_pct_of_layer']:.1f}", f"{d['decision_16rows_ms']:.2f}",
                        f"{d['decision_16rows_pct_of_layer']:.1f}", f"{d['flops_pct_of_layer']:.1f}",
                        f"{d.get('pruned_decision_ms', float('nan')):.3f}", f"{d.get('pruned_decision_pct_of_layer', float('nan')):.2f}",
                        f"{d.get('margin_decision_ms', float('nan')):.3f}", f"{d.get('margin_decision_pct_of_layer', float('nan')):.2f}",
                        f"{d.get('simlens_decision_ms', float('nan')):.2f}", f"{d.get('simlens_decision_pct_of_layer', float('nan')):.1f}",
                        f"{d.get('simlens_flops_pct_of_layer', float('nan')):.1f}"])
    dec_table = tabulate(dec, headers=["model", "tokens", "layer ms (batch 1)", "decision ms (1 pos)",
                                       "decision % of layer", "decision ms (16 pos)", "16-pos % of layer",
                                       "FLOPs % of layer", "pruned decision ms (K tokens)", "pruned % of layer",
                                       "margin decision ms (4 options)", "margin % of layer",
                                       "simlens decision ms (from layer L/2)", "simlens % of layer", "simlens FLOPs % of layer"],
                         tablefmt="github")
    br = []
    for res in results:
        for key, b in (res.get("breakdown") or {}).items():
            p = b["percent"]
            # p.get: runs recorded before the continuation stages existed have no such keys
            br.append([res["model"], key, f"{b['total_s']:.2f}"] + [f"{p.get(k, 0.0):.1f}" for k in
                      ("layers", "check_head", "check_features", "check_continuation", "exit_continuation", "emit",
                       "layer_inputs", "embed", "engine_other", "backend_other")] + [b["calls"]["checks"]])
    br_table = tabulate(br, headers=["model", "variant@batch", "total s", "layers %", "check head %",
                                     "check softmax+top2 %", "check continuation %", "exit continuation %",
                                     "emit head %", "masks/rope %", "embed %", "engine other %", "backend other %",
                                     "check calls"], tablefmt="github")
    rec = []
    for res in results:
        r, d = res.get("picker_recall"), res.get("decision_cost") or {}
        if r:
            rec.append([res["model"], r["clusters"], r["probes"], f"{r['first_layer']}..{res['num_layers'] - 1}",
                        r["checks"], f"{100 * r['top1_recall']:.1f}", f"{r['mean_abs_gap_error']:.4f}",
                        f"{100 * r['gap_error_over_0.05']:.1f}", f"{r['mean_head_rows']:.0f} ({r['head_rows_pct_of_vocab']:.1f}%)",
                        f"{r['pick_ms']:.3f}", f"{100 * r['pick_ms'] / d['layer_ms']:.2f}" if d.get("layer_ms") else "-"])
    rec_table = tabulate(rec, headers=["model", "clusters", "probes", "layers", "checks", "top-1 recall %",
                                       "mean |gap error|", "gap error > 0.05 %", "head rows per pick (% of vocab)",
                                       "pick ms (these states)", "pick % of layer"],
                         tablefmt="github") if rec else "(no head-clusters variant)"
    cells = [[res["model"], res["study_cell"]["cell"], s["variant"], s["policy"], f"{100 * s['layers_saved']:.1f}",
              f"{s['delta_points']:+.1f}", _offline_exit(res["study_cell"]["check"], s["variant"]),
              _bench_exit(res, s["variant"])]
             + [_fmt(_time_saved(res, s["variant"], bs), ".1f") for bs in res["study_cell"]["batch_sizes"]]
             + [_equal(res["study_cell"]["check"], s["variant"])]
             for res in results if res.get("study_cell") for s in res["study_cell"]["rows"]]
    cell_table = "" if not cells else tabulate(
        cells, headers=["model", "cell", "variant", "study policy", "study layers saved %", "study Δ points",
                        "offline mean exit (these docs)", "benchmark mean exit"] + [f"time saved % @{bs}" for bs in results[0]["study_cell"]["batch_sizes"]]
        + ["exits = study's offline"], tablefmt="github")
    cell_text = ("\n\nThe study's calibrated points on its test documents (layers saved and Δ: the study's; time saved: "
                 f"1 - time / time(full), this run):\n\n{cell_table}") if cells else ""
    return (f"{main_table}{cell_text}\n\nExit decision vs one decoder layer (synthetic sequence, torch timer medians):\n\n{dec_table}"
            f"\n\nHead-clusters picker against the full head, on the benchmark's contexts at full depth:\n\n{rec_table}"
            f"\n\nWhere the adainfer time goes (one instrumented pass each):\n\n{br_table}")


def write_report(out_dir: Path, payload: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "benchmark.json").write_text(json.dumps(payload, indent=2, default=str))
    env, state = payload["environment"], payload["machine_state"]
    lines = [
        "# AdaInfer wall-clock benchmark",
        "",
        f"- command: `{env['command']}`",
        f"- date (UTC): {env['date']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"- python {env['python']} on {env['platform']}; {env['cpu_count']} CPUs; torch threads {env['torch_threads']}",
        f"- load (1-min average) before measuring: {state['load_at_start']:.2f} at worst, after waiting {state['waited_s']:.0f} s in all"
        + "; during the timed passes (our own 2 threads included in the load average): "
        + "; ".join(f"{r['model']}: load {r['load_during']['min']:.2f}..{r['load_during']['max']:.2f}, other processes "
                    f"used {r['load_during']['others_cores_median']:.2f} cores (median over passes; max "
                    f"{r['load_during']['others_cores_max']:.2f})" for r in payload["results"]),
        f"- **{'quiet machine' if state['quiet_throughout'] else 'TAKEN UNDER LOAD: timings are unreliable'}** "
        f"(quiet: 1-min load < {state['max_load']} before starting and other processes using < "
        f"{OTHERS_QUIET} cores during the timed passes)",
        f"- requests: {payload['requests_per_task']}; batch sizes {payload['batch_sizes']}; repeats {payload['repeats']} (median)",
        "",
        "Ideal speedup = full-depth FLOPs / FLOPs executed (layers run + exit-head checks), from the responses' "
        "ExitRecords. Measured speedup = time(policy=full) / time(variant), paired per repeat, median. "
        "Time vs hf = time(variant) / time(hf backend), same batch size, paired, median.",
        "",
        format_tables(payload["results"]),
        "",
    ]
    for res in payload["results"]:
        lines.append(f"- {res['model']}: max |logprob(full) - logprob(hf)| = {res['max_abs_logprob_diff_full_vs_hf']}")
    (out_dir / "benchmark.md").write_text("\n".join(lines) + "\n")
