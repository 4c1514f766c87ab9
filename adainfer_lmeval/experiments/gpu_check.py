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
   decision against one layer (:func:`.bench.decision.decision_cost`); generation tokens/s; and one
   profiled pass per variant (kernel launches, host syncs, GPU busy time against wall-clock).
3. **Report**: ``report.json`` and ``report.md`` in ``--output_dir`` (default ``$OUT``), rewritten
   after every section so that a run cut short still leaves what it measured.

Without lm-eval (a bare GPU machine) the package still imports; the comparisons that need lm-eval
are skipped with one line, and timing falls back to the engine itself against a plain forward.
The exit status is 1 when a parity check failed.

This module is the command line; the parts are in :mod:`.gpu`: ``tiny_models``, ``parity``,
``runners`` (shapes, requests, variants), ``timing``, ``budget``, ``report``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path

import torch

from adainfer_lmeval.experiments.gpu.budget import Budget, log
from adainfer_lmeval.experiments.gpu.parity import run_parity
from adainfer_lmeval.experiments.gpu.report import environment, write_report
from adainfer_lmeval.experiments.gpu.runners import SHAPES
from adainfer_lmeval.experiments.gpu.timing import run_timing
from adainfer_lmeval.experiments.gpu.tiny_models import DTYPES, PARITY_ARCHS, SMOKE_ARCHS, tiny_tokenizer


def has_lm_eval() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


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
    out_dir = Path(args.output_dir)
    use_lm_eval = has_lm_eval() and not args.without_lm_eval
    notes: list[str] = []
    budget = Budget(started + args.budget_s, notes)
    if not use_lm_eval:
        budget.note("lm-eval is not installed here: the comparisons with lm-eval's hf backend are skipped, and timing "
                    "runs the engine itself against a plain model(...) forward")
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
            if not budget.allows(shape):
                continue
            payload["timing"][shape] = {}
            run_timing(shape, args, use_lm_eval, budget, tokenizer, payload["timing"][shape], report)
    payload["complete"] = budget.skipped == 0
    report()
    for t in payload["targets"]:
        log(f"target {t['shape']} batch {t['batch']}: {t['target']}: {t['value']:.3f} ({'met' if t['met'] else 'MISSED'})")
    failed = [p for p in payload["parity"] if not p["passed"]]
    log(f"parity: {len(payload['parity']) - len(failed)}/{len(payload['parity'])} passed; "
        f"wrote {out_dir / 'report.md'} and {out_dir / 'report.json'} in {payload['elapsed_s']} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
