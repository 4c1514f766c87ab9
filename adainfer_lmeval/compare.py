"""Early exit beside the full-depth baseline, on the same tasks, in one process.

``adainfer-eval compare --model_args pretrained=smollm2-135m,policy=threshold,gap=0.9
--tasks sst2,mmlu --limit 50`` loads the model once, then for each task runs lm-eval with
``policy=full`` and with the given policy (same prompts, same requests, same metrics) and
prints per task: the metric both ways and its difference, mean layers used, % layers and FLOPs
saved, the wall-clock per request both ways and the speedup. A task where the full-depth model
is not clearly above chance is flagged: a saving there proves nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from .errors import AdaInferError

PRIMARY_METRICS = ("acc", "exact_match", "f1", "word_perplexity")


def _task_rows(results: dict, task: str) -> dict:
    return results["results"][task]


def _metric(row: dict) -> tuple[str, float, float | None]:
    for name in PRIMARY_METRICS:
        key = f"{name},none"
        if key in row:
            stderr = row.get(f"{name}_stderr,none")
            return name, float(row[key]), float(stderr) if isinstance(stderr, (int, float)) else None
    raise AdaInferError(f"no known metric among {', '.join(PRIMARY_METRICS)} in {sorted(row)}")


def chance_level(samples: list[dict]) -> float | None:
    """Expected accuracy of guessing, for multiple-choice samples (one request per choice)."""
    counts = [len(s["resps"]) for s in samples if len(s.get("resps", [])) > 1]
    return sum(1.0 / c for c in counts) / len(counts) if counts else None


def _samples(results: dict, task: str) -> list[dict]:
    tree = results.get("group_subtasks", {})
    names = [task]
    while any(n in tree for n in names):
        names = [child for n in names for child in (tree.get(n) or [n])]
    return [s for n in names for s in results.get("samples", {}).get(n, [])]


def compare_task(task: str, full: dict, early: dict) -> dict:
    metric, full_value, full_se = _metric(_task_rows(full, task))
    _, early_value, early_se = _metric(_task_rows(early, task))
    stats = early["adainfer"]["tasks"][task]
    samples = _samples(full, task)
    chance = chance_level(samples)
    # Paired comparison on the same documents: the delta's standard error is at most the
    # root-sum-square of the two (independent-sample bound), which is what we can report
    # from lm-eval's per-run stderrs.
    delta_se = math.hypot(full_se, early_se) if full_se is not None and early_se is not None else None
    at_chance = chance is not None and full_se is not None and full_value - chance < 2 * full_se
    seconds_full = full["adainfer"]["seconds"]
    seconds_early = early["adainfer"]["seconds"]
    requests = stats["requests"]
    return {
        "task": task,
        "metric": metric,
        "documents": len(samples),
        "requests": requests,
        "chance": chance,
        "full": full_value,
        "early_exit": early_value,
        "delta": early_value - full_value,
        "delta_stderr": delta_se,
        "mean_layers": stats["mean_layers"],
        "num_layers": stats["num_layers"],
        "layers_saved_pct": stats["layers_saved_pct"],
        "flops_saved_pct": stats["flops_saved_pct"],
        "ms_per_request_full": 1000 * seconds_full / max(requests, 1),
        "ms_per_request_early_exit": 1000 * seconds_early / max(requests, 1),
        "speedup": seconds_full / seconds_early if seconds_early else None,
        "at_chance": at_chance,
    }


def format_table(rows: list[dict]) -> str:
    from tabulate import tabulate

    def pct(v):
        return f"{100 * v:.1f}" if v is not None else "-"

    table = []
    for r in rows:
        delta = f"{100 * r['delta']:+.1f}" + (f" ± {100 * r['delta_stderr']:.1f}" if r["delta_stderr"] is not None else "")
        note = "AT CHANCE: saving proves nothing" if r["at_chance"] else ""
        table.append([
            r["task"], r["documents"], r["metric"], pct(r["chance"]), pct(r["full"]), pct(r["early_exit"]), delta,
            f"{r['mean_layers']:.1f}/{r['num_layers']}", f"{r['layers_saved_pct']:.1f}", f"{r['flops_saved_pct']:.1f}",
            f"{r['ms_per_request_full']:.1f}", f"{r['ms_per_request_early_exit']:.1f}",
            f"{r['speedup']:.2f}x" if r["speedup"] else "-", note,
        ])
    headers = ["task", "docs", "metric", "chance %", "full %", "early exit %", "Δ points", "layers used",
               "layers saved %", "FLOPs saved %", "ms/req full", "ms/req exit", "speedup", "note"]
    return tabulate(table, headers=headers, tablefmt="github")


def run_compare(model_args: str, tasks: list[str], limits: list[float | None], num_fewshot: int | None,
                batch_size: int, device: str, output_path: str | None = None) -> list[dict]:
    import lm_eval
    import transformers
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import simple_parse_args_string

    from .engine import ExitBatch
    from .lm_backend import AdaInferLM, split_model_args
    from .model_zoo import resolve_pretrained
    from .offline_data import check_tasks_available, tasks_dir

    check_tasks_available(tasks)
    args = simple_parse_args_string(model_args)
    pretrained = resolve_pretrained(str(args.pop("pretrained", "smollm2-135m")))
    policy = str(args.pop("policy", "full"))
    _, hf_args = split_model_args(policy, args)  # refuse bad args before loading anything
    policy_args = {k: v for k, v in args.items() if k not in hf_args}
    print(f"[compare] loading {pretrained}", flush=True)
    # One copy of the weights serves both runs: the comparison is in the same process.
    model = transformers.AutoModelForCausalLM.from_pretrained(pretrained).to(device).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(pretrained)

    def backend(policy_name: str, extra: dict) -> AdaInferLM:
        return AdaInferLM(pretrained=model, tokenizer=tokenizer, policy=policy_name, device=device,
                          batch_size=batch_size, **hf_args, **extra)

    baseline, early = backend("full", {}), backend(policy, policy_args)
    manager = TaskManager(include_path=str(tasks_dir()))

    def evaluate(lm, task, limit):
        return lm_eval.simple_evaluate(model=lm, tasks=[task], limit=limit, num_fewshot=num_fewshot,
                                       log_samples=True, task_manager=manager, bootstrap_iters=1000)

    # Warm-up (allocator, kernels) so that the first timed run is not penalised.
    baseline.engine.run(ExitBatch.from_rows([[1] * 64] * batch_size, [63] * batch_size, device=baseline.device))
    rows, raw = [], {}
    for task, limit in zip(tasks, limits):
        print(f"[compare] {task}: full depth", flush=True)
        full = evaluate(baseline, task, limit)
        print(f"[compare] {task}: {policy}", flush=True)
        exited = evaluate(early, task, limit)
        rows.append(compare_task(task, full, exited))
        raw[task] = {"full": full["results"], "early_exit": exited["results"], "adainfer": exited["adainfer"]}
    print(format_table(rows))
    if output_path:
        out = Path(output_path)
        out.mkdir(parents=True, exist_ok=True)
        summary = {"model_args": model_args, "tasks": tasks, "limits": limits, "num_fewshot": num_fewshot,
                   "batch_size": batch_size, "device": device, "rows": rows, "runs": raw}
        (out / "compare.json").write_text(json.dumps(summary, indent=2, default=str))
        (out / "compare.md").write_text(format_table(rows) + "\n")
        print(f"[compare] wrote {out / 'compare.json'} and {out / 'compare.md'}")
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="adainfer-eval compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_args", default="pretrained=smollm2-135m,policy=full")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--limit", default=None,
                        help="documents per task (per subtask for groups like mmlu); one number, or one per task")
    parser.add_argument("--num_fewshot", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output_path", default=None)
    a = parser.parse_args(argv)
    tasks = [t for t in a.tasks.split(",") if t]
    limits = [float(x) for x in a.limit.split(",")] if a.limit else [None]
    if len(limits) == 1:
        limits = limits * len(tasks)
    if len(limits) != len(tasks):
        raise AdaInferError(f"--limit has {len(limits)} values for {len(tasks)} tasks; give one, or one per task")
    run_compare(a.model_args, tasks, limits, a.num_fewshot, a.batch_size, a.device, a.output_path)
    return 0
