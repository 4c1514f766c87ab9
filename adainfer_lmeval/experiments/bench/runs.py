"""One model's benchmark: every variant at every batch size on the same requests, and where the time goes."""

from __future__ import annotations

import statistics

from adainfer_lmeval.experiments.bench.decision import decision_cost, picker_recall
from adainfer_lmeval.experiments.bench.machine import CpuMonitor
from adainfer_lmeval.experiments.bench.requests import workload
from adainfer_lmeval.experiments.bench.timing import (ideal_speedup, mean_layers, paired_ratio, rotation, speedups,
                                                      time_interleaved, timed)
from adainfer_lmeval.experiments.bench.variants import (DEFAULT_CHECK_VOCAB, Variant, exit_records, make_backend,
                                                        score, without_check_args)

STAGES = ("layers", "check_head", "check_features", "check_continuation", "exit_continuation", "emit", "layer_inputs",
          "embed")  # see adainfer_lmeval/core/stages.py


def breakdown(lm, requests) -> dict:
    """One pass of ``lm`` under a :class:`~adainfer_lmeval.core.stages.StageClock`: where its time goes."""
    from adainfer_lmeval.core.stages import StageClock

    with StageClock() as clock:
        total, _ = timed(lambda: score(lm, requests))
    seconds = clock.seconds
    parts = {k: seconds.get(k, 0.0) for k in STAGES}
    engine = seconds.get("engine_run", 0.0)
    parts["engine_other"] = engine - sum(parts.values())
    parts["backend_other"] = total - engine  # encoding, packing, log-softmax, accounting
    calls = {"checks": clock.calls.get("check_head", 0), "check_rows": clock.rows.get("check_head", 0),
             "layer_calls": clock.calls.get("layers", 0)}
    return {"total_s": total, "seconds": parts, "percent": {k: 100 * v / total for k, v in parts.items()}, "calls": calls}


def _row(model_name: str, variant: Variant, bs: int, requests: list, times: dict, responses: dict,
         by_label: dict) -> dict:
    """One (batch size, variant) row: exits and ideal speedup from its records, measured ones from its times."""
    label = variant.label
    t = times[(label, bs)]
    row = {"model": model_name, "batch": bs, "variant": label, "requests": len(requests),
           "times_s": t, "median_s": statistics.median(t)}
    if variant.is_hf:
        row.update(mean_layers=None, ideal_speedup=None)
    else:
        records = exit_records(responses[(label, bs)])
        row["mean_layers"], row["ideal_speedup"] = mean_layers(records), ideal_speedup(records)
        row["checks_per_request"] = sum(r.checks for r in records) / len(records)
        row["exit_layers"] = [r.layers for r in records]  # per request, in the requests' order
        base = without_check_args(variant)
        if base != variant and base.label in by_label:  # cheap checks: do they decide as full ones do?
            reference = exit_records(responses[(base.label, bs)])
            row["same_exit_as_full_checks"] = sum(
                a.layers == b.layers for a, b in zip(records, reference)) / len(records)
    if "full" in by_label and not variant.is_hf:
        # paired by repeat: each repeat ran full and this variant back to back
        row.update(speedups(t, times[("full", bs)], row["ideal_speedup"]))
    else:
        row["measured_speedup"] = row["measured_over_ideal"] = None
    row["time_vs_hf"] = paired_ratio(t, times[("hf", bs)]) if "hf" in by_label else None
    return row


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
        timed(lambda: score(lm, warm), device)

    def order(rep: int) -> list:
        # The batch sizes alternate direction and the variants rotate, repeat by repeat.
        sizes = batch_sizes if rep % 2 == 0 else list(reversed(batch_sizes))
        return [(label, bs) for bs in sizes for label in rotation(labels, rep)]

    def after_repeat(rep: int, times: dict) -> None:
        log(f"[benchmark] {model_name} repeat {rep + 1}/{repeats}: "
            + ", ".join(f"{lab}@{bs}={times[(lab, bs)][-1]:.2f}s" for bs in batch_sizes for lab in labels))

    monitor = CpuMonitor()
    passes = {key: (lambda lm=lm: score(lm, requests)) for key, lm in backends.items()}
    times, responses = time_interleaved(passes, repeats, device, order=order, watch=monitor.interval,
                                        after_repeat=after_repeat)

    max_full_vs_hf = None
    if "hf" in labels and "full" in labels:
        pairs = zip(responses[("hf", batch_sizes[0])], responses[("full", batch_sizes[0])])
        max_full_vs_hf = max(abs(float(h[0]) - float(f[0])) for h, f in pairs)

    rows = [_row(model_name, by_label[label], bs, requests, times, responses, by_label)
            for bs in batch_sizes for label in labels]
    num_layers = next((exit_records(out)[0].num_layers for (label, _), out in responses.items() if label != "hf"), None)
    result = {"model": model_name, "num_layers": num_layers, "rows": rows,
              "workload": workload(requests, backends[next(iter(backends))].max_length),
              "max_abs_logprob_diff_full_vs_hf": max_full_vs_hf, "load_during": monitor.summary()}
    adainfer = {key: lm for key, lm in backends.items() if key[0] != "hf"}
    some_adainfer = next(iter(adainfer.values()), None)
    clustered = [lm for lm in adainfer.values() if lm.engine.head_clusters is not None]
    if clustered:
        first = min((lm.engine.policy.min_layer for lm in clustered if hasattr(lm.engine.policy, "min_layer")), default=1)
        result["picker_recall"] = picker_recall(some_adainfer.engine.stack, clustered[0].engine.head_clusters, requests,
                                                first, check_vocab or DEFAULT_CHECK_VOCAB, some_adainfer.max_length,
                                                min_run_time)
    if some_adainfer is not None:
        result["decision_cost"] = decision_cost(some_adainfer.engine.stack, some_adainfer.costs,
                                                tokens=decision_tokens, min_run_time=min_run_time,
                                                check_vocab=check_vocab or DEFAULT_CHECK_VOCAB)
    if profile:
        result["breakdown"] = {f"{label}@{bs}": breakdown(lm, requests) for (label, bs), lm in adainfer.items()}
    return result
