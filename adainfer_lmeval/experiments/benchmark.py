"""Do the savings show up on the clock? Wall-clock of early exit against the ideal, in one process.

``python -m adainfer_lmeval.experiments.benchmark`` (``adainfer-eval benchmark``) loads each model once
and, on the SAME loglikelihood requests (N SST-2 and N MMLU documents built by lm-eval from
the real tasks, 0-shot), times lm-eval's ``hf`` backend (``HFLM._loglikelihood_tokens``),
``adainfer`` with ``policy=full``, with a threshold policy and, where a policy file is shipped
for the model, ``policy=svm``, at each batch size. All variants share one copy of the
weights; runs are interleaved (the order rotates every repeat) and medians are reported.

Per (model, batch size, variant) it reports: mean layers, the *ideal* speedup (full-depth
FLOPs over the FLOPs actually executed, exit-head checks included, from the ``ExitRecord``
each response carries), the *measured* speedup against ``policy=full``, their ratio, and the
time relative to ``hf``. Per model it also measures, with torch timers, one exit decision
(final norm + head + p1/gap features at one position) against one decoder layer over a
synthetic 128-token sequence (batch 1), and an instrumented pass attributes the engine's time
to layers, exit checks, the emitted heads and the rest.

Timing on a shared CPU: OpenMP threads spin badly when the cores are oversubscribed, so the
benchmark first waits (up to ``--wait_quiet`` minutes) for the 1-minute load average to drop
below ``--max_load`` and records the load throughout; numbers taken under load are marked.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adainfer_lmeval.adapter import request_encoding as request_encoding
from adainfer_lmeval.core.features import compute_features

DEFAULT_MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b")
DEFAULT_MMLU_TASKS = ("mmlu_marketing", "mmlu_high_school_psychology", "mmlu_miscellaneous", "mmlu_high_school_biology")
#: The threshold operating point per model (see reports/benchmark/README.md for how it was chosen).
DEFAULT_THRESHOLDS = {
    "smollm2-135m": {"gap": 0.6, "min_layer": 20},
    "qwen2.5-coder-0.5b": {"gap": 0.6, "min_layer": 22},
}
DEFAULT_CHECK_VOCAB = 64  # K of the pruned-vocabulary checks variant (adainfer_lmeval/core/exit_checks.py)
#: The head-clusters variant per model (adainfer_lmeval/core/head_clusters.py): the fewest head rows
#: per pick with top-1 recall near 99% where the threshold consults (reports/benchmark/README.md).
DEFAULT_CHECK_CLUSTERS = {"smollm2-135m": {"check_clusters": 256},
                          "qwen2.5-coder-0.5b": {"check_clusters": 2048, "check_probes": 32}}
OTHERS_QUIET = 0.25  # cores other processes may use during the timed passes for "quiet"
COLUMNS = ["model", "batch", "variant", "mean layers", "ideal speedup", "measured speedup", "measured/ideal",
           "time vs hf", "median s", "requests", "same exits as full checks"]


@dataclass
class Variant:
    name: str  # "hf" or the adainfer policy name
    policy_args: dict = field(default_factory=dict)

    @property
    def is_hf(self) -> bool:
        return self.name == "hf"

    @property
    def label(self) -> str:
        if self.is_hf:
            return "hf"
        args = ",".join(f"{k}={v}" for k, v in self.policy_args.items())
        return f"{self.name}({args})" if args else self.name


def variants_for(model_name: str, threshold: dict | None = None, svm: bool = True, log=print,
                 check_vocab: int | None = DEFAULT_CHECK_VOCAB, check_clusters: int | None = None) -> list[Variant]:
    """hf, full, threshold and (if shipped for this model) svm; the policies also with cheap
    checks: pruned-vocabulary (``check_vocab``), and its first check picked from head clusters
    (``check_clusters``)."""
    out = [Variant("hf"), Variant("full")]
    cheap = []  # the check args of the cheap-check variants
    clusters = DEFAULT_CHECK_CLUSTERS.get(model_name) if check_clusters is None else (
        {"check_clusters": check_clusters} if check_clusters else None)
    if check_vocab:
        cheap.append({"check_vocab": check_vocab})
        if clusters:
            cheap.append({"check_vocab": check_vocab, **clusters})
    threshold = threshold if threshold is not None else DEFAULT_THRESHOLDS.get(model_name)
    if threshold:
        out.append(Variant("threshold", dict(threshold)))
        out.extend(Variant("threshold", {**threshold, **args}) for args in cheap)
    if svm:
        try:
            from adainfer_lmeval.policies import learned  # noqa: F401  (registers policy=svm)
            from adainfer_lmeval.policies import files as policy_files
            from adainfer_lmeval.policies import registered_policies

            path = policy_files.shipped_path(model_name, "svm")
            if "svm" in registered_policies() and path.is_file():
                out.append(Variant("svm"))
                out.extend(Variant("svm", dict(args)) for args in cheap[-1:])
            else:
                log(f"[benchmark] {model_name}: no shipped svm policy ({path}); skipping policy=svm")
        except Exception as exc:  # learned policies absent or broken: skip, say why
            log(f"[benchmark] {model_name}: policy=svm unavailable ({type(exc).__name__}: {exc}); skipping")
    return out


# ---- machine state ------------------------------------------------------------------------------


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def wait_until_quiet(max_load: float, minutes: float, poll_s: float = 30.0, log=print) -> dict:
    """Poll the 1-minute load average until it is below ``max_load`` (or ``minutes`` pass)."""
    started = time.time()
    samples = [loadavg()]
    while not samples[-1] < max_load and time.time() - started < 60 * minutes:
        log(f"[benchmark] load {samples[-1]:.2f} >= {max_load}; waiting ({(time.time() - started) / 60:.1f}/{minutes} min)")
        time.sleep(poll_s)
        samples.append(loadavg())
    quiet = samples[-1] < max_load
    return {"quiet": quiet, "waited_s": round(time.time() - started, 1), "load_at_start": samples[-1],
            "max_load": max_load}


class CpuMonitor:
    """CPU time used by *other* processes (in cores) while we measure: /proc/stat minus our own.

    The load average counts our own busy threads too, so it cannot tell whether someone else
    competed for the cores during a measurement; this can.
    """

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @staticmethod
    def _busy_jiffies() -> int:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]) - idle

    @staticmethod
    def _own_jiffies() -> int:
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return int(stat[11]) + int(stat[12])  # utime + stime (all threads)

    def __enter__(self):
        self.samples = []
        self._mark = self._snap()
        return self

    def _snap(self):
        try:
            return time.perf_counter(), self._busy_jiffies(), self._own_jiffies()
        except (OSError, ValueError, IndexError):
            return None

    def mark(self) -> None:
        """Open an interval (call right before a timed pass)."""
        self._mark = self._snap()

    def sample(self) -> None:
        """Close the interval opened by :meth:`mark`: others' cores busy during it.

        Only intervals of at least 0.5 s count: /proc/stat ticks are 10 ms, so a shorter one
        reads as noise (one stray tick over 1 ms is "10 cores").
        """
        now = self._snap()
        if now is not None and self._mark is not None and now[0] - self._mark[0] >= 0.5:
            wall = now[0] - self._mark[0]
            others = (now[1] - self._mark[1]) - (now[2] - self._mark[2])
            self.samples.append(max(0.0, others / self.hz / wall))
        self._mark = None

    def __exit__(self, *exc):
        return False

    def summary(self) -> dict:
        s = self.samples or [float("nan")]
        return {"others_cores_median": statistics.median(s), "others_cores_max": max(s), "intervals": len(self.samples)}


def environment() -> dict:
    from adainfer_lmeval.offline.pypi import package_versions

    return {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "-m", "adainfer_lmeval.experiments.benchmark", *sys.argv[1:]]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "versions": package_versions(),
    }


# ---- requests -----------------------------------------------------------------------------------


def build_requests(lm, task_limits: dict[str, int], manager=None) -> tuple[list, dict]:
    """lm-eval's loglikelihood requests ``((context, continuation), context_enc, continuation_enc)``.

    Built by lm-eval itself (0-shot), tokenised by lm-eval's ``loglikelihood``
    (:func:`~adainfer_lmeval.adapter.backend.tokenized_requests`). Returns the requests and, per task,
    (documents, requests).
    """
    from lm_eval.tasks import TaskManager, get_task_dict

    from adainfer_lmeval.adapter.backend import tokenized_requests
    from adainfer_lmeval.offline.data import configure_offline_environment, tasks_dir

    configure_offline_environment()
    manager = manager or TaskManager(include_path=str(tasks_dir()))
    tasks = get_task_dict(list(task_limits), manager)
    requests, counts = [], {}
    for name in task_limits:  # a fixed order, whatever order lm-eval returns
        task = tasks[name]
        task.set_config(key="num_fewshot", value=0)
        task.build_all_requests(limit=task_limits[name], rank=0, world_size=1)
        instances = [i for i in task.instances if i.request_type == "loglikelihood"]
        requests.extend(tokenized_requests(lm, instances))
        counts[name] = {"documents": len({i.doc_id for i in instances}), "requests": len(instances)}
    return requests, counts


def synthetic_requests(tokenizer, n_docs: int, choices: int = 2, seed: int = 0) -> list:
    """Small multiple-choice-like requests from random tokens (for smoke tests)."""
    g = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    out = []
    for d in range(n_docs):
        ctx = torch.randint(4, vocab, (int(torch.randint(5, 20, (1,), generator=g)),), generator=g).tolist()
        for c in range(choices):
            cont = torch.randint(4, vocab, (1 + (c + d) % 2,), generator=g).tolist()
            out.append(((f"doc{d}", f"choice{c}"), ctx, cont))
    return out


# ---- backends -----------------------------------------------------------------------------------


def make_backend(variant: Variant, model, tokenizer, batch_size: int, device: str = "cpu"):
    from lm_eval.models.huggingface import HFLM

    from adainfer_lmeval.adapter.backend import AdaInferLM

    common = dict(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    if variant.is_hf:
        return HFLM(**common)
    return AdaInferLM(policy=variant.name, **variant.policy_args, **common)


def _timed_pass(lm, requests) -> tuple[float, list]:
    started = time.perf_counter()
    out = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    return time.perf_counter() - started, out


def _records(responses) -> list:
    return [r.exit for r in responses if hasattr(r, "exit")]


def _without_check_args(variant: Variant) -> Variant:
    from adainfer_lmeval.core.exit_checks import CHECK_ARGS

    return Variant(variant.name, {k: v for k, v in variant.policy_args.items() if k not in CHECK_ARGS})


def _ideal(records) -> tuple[float, float]:
    """(mean layers, ideal speedup = full-depth FLOPs / executed FLOPs)."""
    flops = sum(r.flops for r in records)
    full = sum(r.full_flops for r in records)
    return sum(r.layers for r in records) / len(records), full / flops


# ---- where the engine's time goes ---------------------------------------------------------------


STAGES = ("layers", "check_head", "check_features", "emit", "layer_inputs", "embed")  # see adainfer_lmeval/core/stages.py


def breakdown(lm, requests) -> dict:
    """One pass of ``lm`` under a :class:`~adainfer_lmeval.core.stages.StageClock`: where its time goes."""
    from adainfer_lmeval.core.stages import StageClock

    with StageClock() as clock:
        total, _ = _timed_pass(lm, requests)
    seconds = clock.seconds
    parts = {k: seconds.get(k, 0.0) for k in STAGES}
    engine = seconds.get("engine_run", 0.0)
    parts["engine_other"] = engine - sum(parts.values())
    parts["backend_other"] = total - engine  # encoding, packing, log-softmax, accounting
    calls = {"checks": clock.calls.get("check_head", 0), "check_rows": clock.rows.get("check_head", 0),
             "layer_calls": clock.calls.get("layers", 0)}
    return {"total_s": total, "seconds": parts, "percent": {k: 100 * v / total for k, v in parts.items()}, "calls": calls}


# ---- the decision cost --------------------------------------------------------------------------


def _median_seconds(fn, min_run_time: float) -> float:
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


@torch.no_grad()
def decision_cost(stack, costs, tokens: int = 128, min_run_time: float = 1.0, batch_rows: int = 16,
                  check_vocab: int = DEFAULT_CHECK_VOCAB) -> dict:
    """One exit decision (norm + head + p1/gap features at one position) vs one layer at ``tokens``,
    and a pruned decision (K head rows). A pick from head clusters is timed by
    :func:`picker_recall` on real states: its cost depends on the state.
    """
    g = torch.Generator().manual_seed(0)
    device = stack.head.weight.device
    ids = torch.randint(0, stack.vocab_size, (1, tokens), generator=g).to(device)
    hidden = stack.embed(ids)
    inputs = stack.layer_inputs(hidden)
    middle = stack.num_layers // 2
    for index in range(middle):  # a hidden state from where policies decide
        hidden = stack.run_layer(index, hidden, inputs)
    state1 = hidden[:, -1].contiguous()  # [1, H]
    state_b = hidden[0, -batch_rows:].contiguous() if tokens >= batch_rows else hidden[0].repeat(batch_rows, 1)

    # The decision as the engine makes it: the head, then the policy's features (p1, gap).
    def decide(state):
        return compute_features(("p1", "gap"), stack.exit_logits(state), state, None, middle, stack.num_layers)

    candidates = torch.randint(0, stack.vocab_size, (1, check_vocab), generator=g).to(device)

    def decide_pruned(state):  # a later check under check_vocab=K: K head rows only
        return compute_features(("p1", "gap"), stack.exit_logits_over(state, candidates), state, None, middle,
                                stack.num_layers)

    layer_s = _median_seconds(lambda: stack.run_layer(middle, hidden, inputs), min_run_time)
    decide1_s = _median_seconds(lambda: decide(state1), min_run_time)
    decide_b_s = _median_seconds(lambda: decide(state_b), min_run_time)
    pruned_s = _median_seconds(lambda: decide_pruned(state1), min_run_time)
    ideal_pct = 100 * costs.head_flops(1, with_softmax=True) / costs.layer_flops(tokens)
    return {
        "check_vocab": check_vocab,
        "pruned_decision_ms": 1000 * pruned_s,
        "pruned_decision_pct_of_layer": 100 * pruned_s / layer_s,
        "tokens": tokens,
        "layer_ms": 1000 * layer_s,
        "decision_ms": 1000 * decide1_s,
        "decision_pct_of_layer": 100 * decide1_s / layer_s,
        f"decision_{batch_rows}rows_ms": 1000 * decide_b_s,
        f"decision_{batch_rows}rows_pct_of_layer": 100 * decide_b_s / layer_s,
        "flops_pct_of_layer": ideal_pct,
    }


def _gap(logits: torch.Tensor) -> float:
    """p1 - p2 over ``logits`` (one row), as the exit features read it."""
    return float(compute_features(("gap",), logits[None], logits[None], None, 1, 1)[0, 0])


@torch.no_grad()
def picker_recall(stack, head_clusters, requests: list, first_layer: int, k: int = DEFAULT_CHECK_VOCAB,
                  max_length: int = 2048, min_run_time: float = 1.0) -> dict:
    """How well the head clusters pick a first check's candidates, on real requests.

    Each distinct context runs at full depth once; at every layer from ``first_layer`` (where
    the policy starts consulting) to L-1, at the decision position (the context's last token),
    the picked K candidates are compared with the full head: is its top-1 among them, and how
    far the gap (p1 - p2 over K tokens) read off the picked candidates is from the one read
    off the full head's top K (what ``check_vocab`` alone computes). The picks are then timed
    again on those same states (how many rows a pick multiplies depends on the state).
    """
    groups = request_encoding.encode([(c, k) for _, c, k in requests], max_length).groups
    contexts = sorted({tuple(g.rows[0].tokens[: g.rows[0].decision + 1]) for g in groups})
    hits, gap_errors, rows, states = [], [], [], []
    for ctx in contexts:
        hidden = stack.embed(torch.tensor([list(ctx)], device=stack.head.weight.device))
        inputs = stack.layer_inputs(hidden)
        for layer in range(1, stack.num_layers):
            hidden = stack.run_layer(layer - 1, hidden, inputs)
            if layer < first_layer:
                continue
            state = hidden[:, -1].contiguous()
            states.append(state)
            top = stack.exit_logits(state)[0].topk(k)
            ids, logits, used = head_clusters.pick(stack, state, k)
            hits.append(int(top.indices[0]) in set(ids[0].tolist()))
            gap_errors.append(abs(_gap(logits[0]) - _gap(top.values)))
            rows.append(int(used[0]))
    pick_s = _median_seconds(lambda: [head_clusters.pick(stack, state, k) for state in states], min_run_time) / len(states)
    return {"clusters": head_clusters.clusters, "probes": head_clusters.probes,
            "first_layer": first_layer, "checks": len(hits), "contexts": len(contexts), "pick_ms": 1000 * pick_s,
            "top1_recall": sum(hits) / len(hits), "mean_abs_gap_error": sum(gap_errors) / len(gap_errors),
            "gap_error_over_0.05": sum(e > 0.05 for e in gap_errors) / len(gap_errors),
            "mean_head_rows": sum(rows) / len(rows), "head_rows_pct_of_vocab": 100 * sum(rows) / len(rows) / stack.vocab_size}


# ---- the benchmark ------------------------------------------------------------------------------


def benchmark_model(model_name: str, model, tokenizer, requests: list, variants: list[Variant],
                    batch_sizes: list[int], repeats: int, device: str = "cpu", profile: bool = True,
                    decision_tokens: int = 128, min_run_time: float = 1.0, log=print,
                    check_vocab: int | None = DEFAULT_CHECK_VOCAB) -> dict:
    """Every variant at every batch size on ``requests``, interleaved, ``repeats`` times."""
    backends = {(v.label, bs): make_backend(v, model, tokenizer, bs, device) for v in variants for bs in batch_sizes}
    labels = [v.label for v in variants]
    by_label = {v.label: v for v in variants}

    # Warm-up (allocator, kernels, lazy imports) on a few requests: whole documents, the longest.
    warm = requests[: min(len(requests), max(batch_sizes))]
    for lm in backends.values():
        _timed_pass(lm, warm)

    responses = {}
    times: dict[tuple, list[float]] = {key: [] for key in backends}
    loads = []
    monitor = CpuMonitor().__enter__()
    for rep in range(repeats):
        sizes = batch_sizes if rep % 2 == 0 else list(reversed(batch_sizes))
        for bs in sizes:
            k = rep % len(labels)
            order = labels[k:] + labels[:k]
            for label in order:
                loads.append(loadavg())
                monitor.mark()
                seconds, out = _timed_pass(backends[(label, bs)], requests)
                times[(label, bs)].append(seconds)
                responses.setdefault((label, bs), out)
                monitor.sample()
        log(f"[benchmark] {model_name} repeat {rep + 1}/{repeats}: "
            + ", ".join(f"{lab}@{bs}={times[(lab, bs)][-1]:.2f}s" for bs in batch_sizes for lab in labels))

    max_full_vs_hf = None
    if "hf" in labels and "full" in labels:
        pairs = zip(responses[("hf", batch_sizes[0])], responses[("full", batch_sizes[0])])
        max_full_vs_hf = max(abs(float(h[0]) - float(f[0])) for h, f in pairs)

    rows = []
    num_layers = None
    for bs in batch_sizes:
        for label in labels:
            v = by_label[label]
            t = times[(label, bs)]
            row = {"model": model_name, "batch": bs, "variant": label, "requests": len(requests),
                   "times_s": t, "median_s": statistics.median(t)}
            if v.is_hf:
                row.update(mean_layers=None, ideal_speedup=None)
            else:
                records = _records(responses[(label, bs)])
                num_layers = records[0].num_layers
                row["mean_layers"], row["ideal_speedup"] = _ideal(records)
                row["checks_per_request"] = sum(r.checks for r in records) / len(records)
                base = _without_check_args(v)
                if base != v and base.label in by_label:  # cheap checks: do they decide as full ones do?
                    reference = _records(responses[(base.label, bs)])
                    row["same_exit_as_full_checks"] = sum(
                        a.layers == b.layers for a, b in zip(records, reference)) / len(records)
            if "full" in labels and not v.is_hf:
                # paired by repeat: each repeat ran full and this variant back to back
                row["measured_speedup"] = statistics.median(
                    f / x for f, x in zip(times[("full", bs)], t))
                row["measured_over_ideal"] = row["measured_speedup"] / row["ideal_speedup"]
            else:
                row["measured_speedup"] = row["measured_over_ideal"] = None
            if "hf" in labels:
                row["time_vs_hf"] = statistics.median(x / h for x, h in zip(t, times[("hf", bs)]))
            else:
                row["time_vs_hf"] = None
            rows.append(row)

    # lm-eval's hf backend runs one row per distinct input (its one-token-continuation logits
    # cache); adainfer runs one row per request. Both counts, with the tokens each way:
    inputs = [tuple(row) for row in request_encoding.encode([(c, k) for _, c, k in requests],
                                                            backends[next(iter(backends))].max_length).rows]
    shape = {"requests": len(requests), "distinct_inputs": len(set(inputs)),
             "tokens_per_request": sum(map(len, inputs)), "tokens_distinct": sum(map(len, set(inputs)))}
    result = {"model": model_name, "num_layers": num_layers, "rows": rows, "workload": shape,
              "max_abs_logprob_diff_full_vs_hf": max_full_vs_hf,
              "load_during": {"min": min(loads), "max": max(loads), "median": statistics.median(loads),
                              **monitor.summary()}}
    some_adainfer = next((lm for (label, _), lm in backends.items() if label != "hf"), None)
    clustered = next((lm.engine.head_clusters for (label, _), lm in backends.items()
                      if label != "hf" and lm.engine.head_clusters is not None), None)
    if clustered is not None:
        first = min((lm.engine.policy.min_layer for (label, _), lm in backends.items()
                     if label != "hf" and lm.engine.head_clusters is not None and hasattr(lm.engine.policy, "min_layer")),
                    default=1)
        lm = some_adainfer
        result["picker_recall"] = picker_recall(lm.engine.stack, clustered, requests, first, check_vocab or DEFAULT_CHECK_VOCAB,
                                                lm.max_length, min_run_time)
    if some_adainfer is not None:
        result["decision_cost"] = decision_cost(some_adainfer.engine.stack, some_adainfer.costs,
                                                tokens=decision_tokens, min_run_time=min_run_time,
                                                check_vocab=check_vocab or DEFAULT_CHECK_VOCAB)
    if profile:
        result["breakdown"] = {f"{label}@{bs}": breakdown(backends[(label, bs)], requests)
                               for (label, bs) in backends if label != "hf"}
    return result


def table_rows(results: list[dict]) -> list[list]:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    out = []
    for res in results:
        for r in res["rows"]:
            layers = "-" if r["mean_layers"] is None else f"{r['mean_layers']:.1f}/{res['num_layers']}"
            out.append([r["model"], r["batch"], r["variant"], layers, f(r["ideal_speedup"], ".2f"),
                        f(r["measured_speedup"], ".2f"), f(r["measured_over_ideal"], ".2f"),
                        f(r["time_vs_hf"], ".3f"), f(r["median_s"], ".2f"), r["requests"],
                        f(None if r.get("same_exit_as_full_checks") is None else 100 * r["same_exit_as_full_checks"], ".0f")])
    return out


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
                        f"{d.get('pruned_decision_ms', float('nan')):.3f}", f"{d.get('pruned_decision_pct_of_layer', float('nan')):.2f}"])
    dec_table = tabulate(dec, headers=["model", "tokens", "layer ms (batch 1)", "decision ms (1 pos)",
                                       "decision % of layer", "decision ms (16 pos)", "16-pos % of layer",
                                       "FLOPs % of layer", "pruned decision ms (K tokens)", "pruned % of layer"],
                         tablefmt="github")
    br = []
    for res in results:
        for key, b in (res.get("breakdown") or {}).items():
            p = b["percent"]
            br.append([res["model"], key, f"{b['total_s']:.2f}"] + [f"{p[k]:.1f}" for k in
                      ("layers", "check_head", "check_features", "emit", "layer_inputs", "embed", "engine_other",
                       "backend_other")] + [b["calls"]["checks"]])
    br_table = tabulate(br, headers=["model", "variant@batch", "total s", "layers %", "check head %",
                                     "check softmax+top2 %", "emit head %", "masks/rope %", "embed %",
                                     "engine other %", "backend other %", "check calls"], tablefmt="github")
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
    return (f"{main_table}\n\nExit decision vs one decoder layer (synthetic sequence, torch timer medians):\n\n{dec_table}"
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adainfer-eval benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--n", default="8",
                        help="documents per task: N SST-2 and N MMLU (spread over --mmlu_tasks); one number, or one per model")
    parser.add_argument("--mmlu_tasks", default=",".join(DEFAULT_MMLU_TASKS))
    parser.add_argument("--batch_sizes", default="1,16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threshold", action="append", default=[],
                        help="MODEL:gap=0.6,min_layer=20 (overrides the default operating point for MODEL)")
    parser.add_argument("--no_svm", action="store_true")
    parser.add_argument("--check_vocab", type=int, default=DEFAULT_CHECK_VOCAB,
                        help="K of the variants with pruned-vocabulary checks (0: no such variants)")
    parser.add_argument("--check_clusters", type=int, default=None,
                        help="C of the variants whose first check picks its K candidates from C head clusters "
                             f"(default per model: {DEFAULT_CHECK_CLUSTERS}; 0: no such variants)")
    parser.add_argument("--no_profile", action="store_true", help="skip the instrumented breakdown pass")
    parser.add_argument("--decision_tokens", type=int, default=128)
    parser.add_argument("--wait_quiet", type=float, default=20.0, help="minutes to wait for a quiet machine")
    parser.add_argument("--max_load", type=float, default=1.0)
    parser.add_argument("--threads", default="auto",
                        help="torch threads; 'auto': torch's default on a quiet machine, 1 if it never got quiet "
                             "(oversubscribed OpenMP threads spin: a 2-thread pass can run 30x slower)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output_dir", default="reports/benchmark")
    a = parser.parse_args(argv)

    import transformers

    from adainfer_lmeval.offline.model_zoo import resolve_pretrained
    from adainfer_lmeval.offline.data import check_tasks_available, configure_offline_environment, tasks_dir

    if a.threads != "auto":
        torch.set_num_threads(int(a.threads))
    default_threads = torch.get_num_threads()
    configure_offline_environment()
    thresholds = {}
    for spec in a.threshold:
        name, _, args = spec.partition(":")
        thresholds[name] = {k: (int(v) if k == "min_layer" else float(v))
                            for k, v in (kv.split("=") for kv in args.split(",") if kv)}
    models = [m for m in a.models.split(",") if m]
    mmlu = [t for t in a.mmlu_tasks.split(",") if t]
    batch_sizes = [int(b) for b in a.batch_sizes.split(",")]
    ns = [int(x) for x in str(a.n).split(",")]
    ns = ns * len(models) if len(ns) == 1 else ns
    if len(ns) != len(models):
        parser.error(f"--n has {len(ns)} values for {len(models)} models; give one, or one per model")

    def limits_for(n: int) -> dict:
        # N MMLU documents, spread over the subjects (the first ones get the remainder).
        per_subject = {t: n // len(mmlu) + (1 if i < n % len(mmlu) else 0) for i, t in enumerate(mmlu)}
        return {"sst2": n, **{t: k for t, k in per_subject.items() if k > 0}}

    task_limits = {name: limits_for(n) for name, n in zip(models, ns)}
    check_tasks_available(sorted({t for limits in task_limits.values() for t in limits}))
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir()))
    results, counts, waits = [], {}, {}
    started = time.time()
    for name in models:
        # Wait for a quiet machine before each model (out of one --wait_quiet budget in all).
        left = max(0.0, a.wait_quiet - (time.time() - started) / 60)
        waits[name] = state = wait_until_quiet(a.max_load, left)
        if a.threads == "auto":
            torch.set_num_threads(default_threads if state["quiet"] else 1)
        state["torch_threads"] = torch.get_num_threads()
        print(f"[benchmark] load {state['load_at_start']:.2f} ({'quiet' if state['quiet'] else 'NOT quiet'}); "
              f"torch threads {torch.get_num_threads()}", flush=True)
        folder = resolve_pretrained(name)
        print(f"[benchmark] loading {name} from {folder}", flush=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).to(a.device).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        variants = variants_for(name, thresholds.get(name), svm=not a.no_svm, check_vocab=a.check_vocab or None,
                                check_clusters=a.check_clusters)
        tokenizing_lm = make_backend(Variant("hf"), model, tokenizer, 1, a.device)
        requests, counts[name] = build_requests(tokenizing_lm, task_limits[name], manager)
        print(f"[benchmark] {name}: {len(requests)} requests; variants {[v.label for v in variants]}", flush=True)
        res = benchmark_model(name, model, tokenizer, requests, variants, batch_sizes, a.repeats, a.device,
                              profile=not a.no_profile, decision_tokens=a.decision_tokens,
                              check_vocab=a.check_vocab or None)
        results.append(res)
        print(format_tables([res]), flush=True)
        del model
    state = {"quiet": all(w["quiet"] for w in waits.values()),
             "waited_s": sum(w["waited_s"] for w in waits.values()),
             "load_at_start": max(w["load_at_start"] for w in waits.values()), "max_load": a.max_load,
             "per_model": waits, "load_at_end": loadavg()}
    state["quiet_throughout"] = state["quiet"] and all(
        r["load_during"]["others_cores_median"] < OTHERS_QUIET for r in results)
    payload = {"environment": {**environment(), "torch_threads": {n: w["torch_threads"] for n, w in waits.items()}}, "machine_state": state, "task_limits": task_limits,
               "requests_per_task": counts, "batch_sizes": batch_sizes, "repeats": a.repeats,
               "thresholds": {n: thresholds.get(n, DEFAULT_THRESHOLDS.get(n)) for n in models},
               "elapsed_s": round(time.time() - started, 1), "results": results}
    print(format_tables(results))
    write_report(Path(a.output_dir), payload)
    print(f"[benchmark] wrote {Path(a.output_dir) / 'benchmark.json'} and {Path(a.output_dir) / 'benchmark.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
