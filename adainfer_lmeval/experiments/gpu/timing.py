"""Timing on real shapes: loglikelihood passes and generation per variant and batch size, one exit
decision against one layer, and one profiled pass per variant."""

from __future__ import annotations

import statistics
import time

import torch

from adainfer_lmeval.core.accounting import CostModel
from adainfer_lmeval.core.architectures import DecoderStack
from adainfer_lmeval.core.engine import EarlyExitEngine
from adainfer_lmeval.core.generation import EarlyExitGenerator
from adainfer_lmeval.experiments.bench.decision import decision_cost
from adainfer_lmeval.experiments.bench.timing import (ideal_speedup, mean_layers, paired_ratio, speedups,
                                                      synchronize, time_interleaved, timed)
from adainfer_lmeval.experiments.gpu.budget import Budget, log
from adainfer_lmeval.experiments.gpu.runners import (CHECK_VOCAB, EngineRunner, LmEvalRunner, RowDrawnExits,
                                                     params_text, shape_model, timing_requests, variant_specs)
from adainfer_lmeval.experiments.gpu.tiny_models import DTYPES
from adainfer_lmeval.policies import build_policy


def time_loglikelihood(model, tokenizer, device, batch_sizes: list[int], seq_len: int, repeats: int,
                       use_lm_eval: bool, budget: Budget, min_requests: int = 24) -> list[dict]:
    """Every variant at every batch size, interleaved (the order rotates per repeat), medians."""
    num_layers = DecoderStack(model).num_layers
    specs = variant_specs(num_layers)
    runner_cls = LmEvalRunner if use_lm_eval else EngineRunner
    hf_label = "hf" if use_lm_eval else "forward"
    rows = []
    for bs in batch_sizes:
        if not budget.allows(f"batch {bs}"):
            continue
        requests = timing_requests(max(min_requests, 2 * bs), seq_len, model.config.vocab_size, seed=bs)
        passes = {}
        for spec in specs:
            runner = runner_cls(spec, model, tokenizer, bs, device)
            passes[runner.label] = lambda runner=runner: runner(requests)
        for run in passes.values():  # warm-up: allocator, kernels, cuBLAS heuristics for these shapes
            timed(run, device)
        times, records = time_interleaved(passes, repeats, device)
        log(f"batch {bs}: " + ", ".join(f"{hf_label if label == 'hf' else label} {statistics.median(t):.3f}s"
                                         for label, t in times.items()))
        for label, t in times.items():
            row = {"batch": bs, "variant": hf_label if label == "hf" else label, "requests": len(requests),
                   "times_s": t, "median_s": statistics.median(t)}
            if label == "hf":
                row.update(mean_layers=None, ideal_speedup=None, measured_speedup=None, measured_over_ideal=None)
            else:
                row["mean_layers"], row["ideal_speedup"] = mean_layers(records[label]), ideal_speedup(records[label])
                row.update(speedups(t, times["full"], row["ideal_speedup"]))
            row["time_vs_hf"] = paired_ratio(t, times["hf"])
            rows.append(row)
        del passes
    return rows


@torch.no_grad()
def time_generation(model, device, batch_sizes: list[int], prompt_len: int, new_tokens: int, repeats: int,
                    budget: Budget) -> list[dict]:
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
        if not budget.allows(f"generation at batch {bs}"):
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
            timed(fn, device)
        times, outputs = time_interleaved(runs, repeats, device)
        for label, t in times.items():
            median = statistics.median(t)
            row = {"batch": bs, "variant": label, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
                   "median_s": median, "tokens_per_s": bs * new_tokens / median,
                   "time_vs_full": paired_ratio(t, times["full"])}
            out = outputs[label]
            if label != "model.generate":
                records = [costs.generation(prompt_len, layers, checks) for layers, checks in zip(out.exit_layers, out.checks)]
                row["mean_layers"] = sum(sum(r.token_layers) for r in records) / sum(r.tokens for r in records)
                row["ideal_speedup"] = ideal_speedup(records)
                row.update(speedups(t, times["full"], row["ideal_speedup"]))
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


def run_timing(shape: str, args, use_lm_eval: bool, budget: Budget, tokenizer, result: dict, report) -> None:
    """Every timing section on one shape, into ``result``; ``report()`` after each."""
    device, dtype = args.device, DTYPES[args.timing_dtype]
    started = time.perf_counter()
    model = shape_model(shape, device, dtype)
    stack = DecoderStack(model)
    costs = CostModel.from_stack(stack)
    result.update(num_layers=stack.num_layers, params=sum(p.numel() for p in model.parameters()),
                  build_s=round(time.perf_counter() - started, 2), dtype=args.timing_dtype)
    log(f"{shape}: {params_text(result['params'])} parameters, {stack.num_layers} layers, built in {result['build_s']} s")
    result["loglikelihood"] = time_loglikelihood(model, tokenizer, device, args.batch_sizes, args.seq_len, args.repeats,
                                                 use_lm_eval, budget, args.min_requests)
    report()
    if budget.allows(f"{shape} decision cost"):
        result["decision_cost"] = decision_cost(stack, costs, tokens=args.seq_len, min_run_time=args.min_run_time,
                                                check_vocab=CHECK_VOCAB)
        d = result["decision_cost"]
        log(f"{shape}: one exit decision (1 position, full head) = {d['decision_pct_of_layer']:.1f}% of one layer at "
            f"{d['tokens']} tokens; pruned (K={CHECK_VOCAB}) {d['pruned_decision_pct_of_layer']:.2f}%")
        report()
    if budget.allows(f"{shape} generation"):
        result["generation"] = time_generation(model, device, args.gen_batch_sizes, args.gen_prompt, args.gen_tokens,
                                               max(1, args.repeats - 2), budget)
        report()
    if args.profile and budget.allows(f"{shape} profile"):
        bs = args.batch_sizes[0]
        requests = timing_requests(max(args.min_requests // 2, 2 * bs), args.seq_len, model.config.vocab_size, seed=99)
        runner_cls = LmEvalRunner if use_lm_eval else EngineRunner
        result["profile"] = []
        for spec in variant_specs(stack.num_layers):
            runner = runner_cls(spec, model, tokenizer, bs, device)
            runner(requests[:2])  # warm
            result["profile"].append({"batch": bs, **profile_pass(runner, requests, device)})
        log(f"{shape}: profiled one pass per variant at batch {bs}")
        report()
    del model, stack
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
