"""Is this checkout slower than an earlier commit? Both timed on this machine, interleaved.

The benchmark (``python -m adainfer_lmeval.experiments.benchmark``) compares variants inside one
process, so its ratios move with the machine: a figure measured last week on a quieter machine
is no baseline. This script runs the same backend-level passes for two checkouts in alternating
processes (the order flips every round), each pass timed as lm-eval's
``_loglikelihood_tokens`` over the same requests, and prints measured/ideal per round.

    python scripts/bench_against_commit.py --commit 791519d --rounds 3

The earlier commit is checked out with ``git worktree`` into /tmp; both checkouts run on this
checkout's virtual environment, imported with ``python -S`` and an explicit path, so that the
editable install (which points at this checkout) does not shadow the other one. Requests are
random 128-token contexts with SST-2-like (2 one-token options) and MMLU-like (4 letters)
continuations, the same for both: what is compared is the code's overhead around the same
layers, not accuracy. Output: a table on stdout and ``--out`` (JSON + Markdown).

Wall-clock ratios on 2 shared cores move by ±0.1 between rounds. ``--calls_only`` counts instead
the Python function calls of one pass per variant (``cProfile``): deterministic, so it can run
on a busy machine, and it shows any per-check overhead the code added around the same tensors.

    python scripts/bench_against_commit.py --commit 791519d --calls_only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {  # label: (policy, model args); the threshold point is the benchmark's for SmolLM2
    "full": ("full", {}),
    "threshold": ("threshold", {"gap": 0.6, "min_layer": 20}),
    "threshold,check_vocab=64": ("threshold", {"gap": 0.6, "min_layer": 20, "check_vocab": 64}),
    "threshold,check_vocab=64,check_clusters=256": (
        "threshold", {"gap": 0.6, "min_layer": 20, "check_vocab": 64, "check_clusters": 256}),
    "svm": ("svm", {}),
}


def worker(model_dir: str, batch_sizes: list[int], repeats: int, calls_only: bool = False) -> dict:
    """Time every variant at every batch size with whatever ``adainfer_lmeval`` is importable
    (``calls_only``: count one pass's Python function calls instead)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from adainfer_lmeval.adapter.backend import AdaInferLM  # the layout after issue 12
    except ImportError:
        from adainfer_lmeval.lm_backend import AdaInferLM  # the flat layout before it

    # Counting calls needs no quiet machine, but two OpenMP threads on a busy one spin for ages.
    torch.set_num_threads(1 if calls_only else 2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    requests = []
    for doc in range(16):
        context = torch.randint(100, 40000, (128,), generator=g).tolist()
        options = (" positive", " negative") if doc % 2 else (" A", " B", " C", " D")
        requests += [((f"doc{doc}", o), context, tokenizer(o)["input_ids"]) for o in options]
    num_layers = model.config.num_hidden_layers
    out = {}
    for bs in batch_sizes:
        lms = {label: AdaInferLM(pretrained=model, tokenizer=tokenizer, batch_size=bs, device="cpu", policy=policy, **args)
               for label, (policy, args) in VARIANTS.items()}
        if calls_only:
            out[bs] = {label: {"calls": count_calls(lambda: lm._loglikelihood_tokens(requests, disable_tqdm=True))}
                       for label, lm in lms.items()}
            continue
        times = {label: [] for label in lms}
        layers = {}
        for rep in range(repeats + 1):  # repeat 0 warms up and is not kept
            labels = list(lms)
            labels = labels[rep % len(labels):] + labels[: rep % len(labels)]
            for label in labels:
                started = time.perf_counter()
                responses = lms[label]._loglikelihood_tokens(requests, disable_tqdm=True)
                seconds = time.perf_counter() - started
                if rep:
                    times[label].append(seconds)
                layers[label] = statistics.mean(r.exit.layers for r in responses) / num_layers
        full = statistics.median(times["full"])
        out[bs] = {label: {"seconds": statistics.median(t), "depth": layers[label],
                           "measured_over_ideal": layers[label] / (statistics.median(t) / full)}
                   for label, t in times.items()}
    return out


def count_calls(fn) -> int:
    """Python function calls of ``fn()`` after a warm-up call (first-call imports and caches left out)."""
    import cProfile
    import pstats

    fn()
    profile = cProfile.Profile()
    profile.runcall(fn)
    return pstats.Stats(profile).total_calls


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def run_worker(root: Path, args) -> dict:
    """One worker process importing the package from ``root`` only."""
    purelib = sysconfig.get_paths()["purelib"]
    code = (f"import sys; sys.path[:0] = [{str(root)!r}, {str(REPO / 'scripts')!r}]; sys.path.append({purelib!r}); "
            "import json, bench_against_commit as b; "
            f"print('RESULT', json.dumps(b.worker({args.model_dir!r}, {args.batch_sizes!r}, {args.repeats}, {args.calls_only})))")
    done = subprocess.run([sys.executable, "-S", "-c", code], cwd=root, capture_output=True, text=True)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    if done.returncode or line is None:
        sys.exit(f"worker for {root} failed:\n{done.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", required=True, help="the earlier commit to compare against")
    parser.add_argument("--rounds", type=int, default=3, help="alternating process pairs")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per variant per process")
    parser.add_argument("--batch_sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    parser.add_argument("--model_dir", default=os.path.expanduser("~/.cache/adainfer-lmeval/models/smollm2-135m"))
    parser.add_argument("--max_load", type=float, default=1.0, help="wait for a load average below this")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json / results.md")
    parser.add_argument("--calls_only", action="store_true", help="count function calls per pass (one round, no timing)")
    args = parser.parse_args(argv)
    if not Path(args.model_dir, "config.json").is_file():
        sys.exit(f"no model at {args.model_dir}: run `python -m adainfer_lmeval.offline.models fetch smollm2-135m` first")
    commit = subprocess.run(["git", "rev-parse", "--short", args.commit], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    here = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
    baseline = Path(f"/tmp/adainfer_baseline_{commit}")
    if not baseline.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(baseline), commit], cwd=REPO, check=True,
                       capture_output=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.strip()
    checkouts = {commit: baseline, f"{here}{' + uncommitted changes' if dirty else ''} (this checkout)": REPO}
    if args.calls_only:
        args.rounds, args.max_load = 1, float("inf")
    rounds = []
    for r in range(args.rounds):
        order = list(checkouts) if r % 2 == 0 else list(checkouts)[::-1]
        for label in order:
            waited = time.time()
            while loadavg() >= args.max_load and time.time() - waited < 600:
                time.sleep(15)
            load = loadavg()
            print(f"[round {r + 1}/{args.rounds}] {label} (load {load:.2f})", file=sys.stderr, flush=True)
            rounds.append({"round": r, "checkout": label, "load_at_start": load, "results": run_worker(checkouts[label], args)})
    if args.calls_only:
        lines = ["Python function calls in one pass of lm-eval's `_loglikelihood_tokens` (cProfile)", "",
                 "| batch | variant | " + " | ".join(checkouts) + " | ratio |", "|---|---|" + "---|" * (len(checkouts) + 1)]
        for bs in map(str, args.batch_sizes):
            for variant in VARIANTS:
                calls = [next(x["results"][bs][variant]["calls"] for x in rounds if x["checkout"] == c) for c in checkouts]
                lines.append(f"| {bs} | {variant} | " + " | ".join(map(str, calls)) + f" | {calls[-1] / calls[0]:.3f} |")
        finish("\n".join(lines), rounds, args, argv)
        return
    lines = [f"measured/ideal (1 = every saved layer shows on the clock), {args.rounds} alternating rounds, "
             f"median of {args.repeats} passes each; depth = mean exit layer / L", "",
             "| batch | variant | depth | " + " | ".join(f"{c} per round | {c} median" for c in checkouts) + " |",
             "|---|---|---|" + "---|---|" * len(checkouts)]
    for bs in map(str, args.batch_sizes):
        for variant in VARIANTS:
            cells = []
            for c in checkouts:
                values = [x["results"][bs][variant]["measured_over_ideal"] for x in rounds if x["checkout"] == c]
                cells += [" ".join(f"{v:.2f}" for v in values), f"**{statistics.median(values):.2f}**"]
            depth = rounds[0]["results"][bs][variant]["depth"]
            lines.append(f"| {bs} | {variant} | {depth:.3f} | " + " | ".join(cells) + " |")
    finish("\n".join(lines), rounds, args, argv)


def finish(table: str, rounds: list, args, argv) -> None:
    """Print ``table``; with ``--out`` write it and every round's figures."""
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        command = "python scripts/bench_against_commit.py " + " ".join(argv if argv is not None else sys.argv[1:])
        (args.out / "results.json").write_text(json.dumps({"command": command, "rounds": rounds}, indent=1))
        (args.out / "results.md").write_text(f"`{command}`\n\n{table}\n")


if __name__ == "__main__":
    main()
