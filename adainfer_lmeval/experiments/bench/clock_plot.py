"""Time saved against FLOPs saved for the study's rules, from benchmark runs on study cells.

    python -m adainfer_lmeval.experiments.bench.clock_plot reports/benchmark/study_cell_*/benchmark.json \\
        --out reports/benchmark/study_cell_clock.png

One panel for batch 1 and one for the batched runs; a point per (run, rule): x = the FLOPs it
saved against full depth (1 - 1 / ideal speedup: checks and carries counted), y = the time it
saved (1 - 1 / measured speedup). On the diagonal the clock gives what the FLOPs promise; below
it the checks cost more time than their FLOPs say.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adainfer_lmeval.errors import AdaInferError

MODEL_SHORT = {"qwen2.5-coder-0.5b": "Qwen-0.5B", "qwen2.5-coder-1.5b": "Qwen-1.5B", "smollm2-135m": "SmolLM2"}


def clock_points(paths: list[Path]) -> list[dict]:
    """Per run, rule and batch size: the cell, the study policy, FLOPs and time saved (%)."""
    points = []
    for path in paths:
        try:
            points.extend(_points(json.loads(Path(path).read_text())["results"], path))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError) as exc:
            raise AdaInferError(f"{path}: not a benchmark.json ({type(exc).__name__}: {exc}); "
                                "write it with python -m adainfer_lmeval.experiments.benchmark --study_cell ...") from None
    if not points:
        raise AdaInferError("none of these benchmark files has a --study_cell run")
    return points


def _points(results: list, path: Path) -> list[dict]:
    out = []
    for res in results:
        cell = res.get("study_cell")
        if not cell:
            continue
        # a rule at a filled read-out's point (--study_readouts filled) is another point than the study's
        policies = {r["variant"]: r["policy"] + (" (filled)" if r.get("readout") == "filled" else "") for r in cell["rows"]}
        for row in res["rows"]:
            if row["variant"] not in policies or not row.get("measured_speedup"):
                continue
            out.append({"model": res["model"], "cell": cell["cell"], "policy": policies[row["variant"]],
                        "batch": row["batch"], "flops_saved": 100 * (1 - 1 / row["ideal_speedup"]),
                        "time_saved": 100 * (1 - 1 / row["measured_speedup"]),
                        "documents": len(cell["doc_ids"]), "source": str(path)})
    return out


def plot_clock(points: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = sorted({p["policy"] for p in points})
    colours = dict(zip(policies, plt.get_cmap("tab10").colors))
    cells = sorted({(p["model"], p["cell"], p["documents"]) for p in points})
    markers = dict(zip(cells, "osD^vP"))
    low = min(min(p["flops_saved"], p["time_saved"]) for p in points) - 3
    high = max(max(p["flops_saved"], p["time_saved"]) for p in points) + 3
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharex=True, sharey=True)
    for ax, batched in zip(axes, (False, True)):
        for p in (p for p in points if (p["batch"] > 1) == batched):
            ax.scatter(p["flops_saved"], p["time_saved"], color=colours[p["policy"]],
                       marker=markers[(p["model"], p["cell"], p["documents"])], s=60, edgecolor="black", linewidth=0.5)
        ax.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1, label="time saved = FLOPs saved")
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title("batch 1" if not batched else "batched (8-16 rows)")
        ax.set_xlabel("FLOPs saved vs full depth, checks counted (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("time saved vs full depth, same process (%)")
    handles = [plt.Line2D([], [], color=colours[p], marker="o", linestyle="", label=p) for p in policies]
    handles += [plt.Line2D([], [], color="grey", marker=markers[c], linestyle="",
                           label=f"{MODEL_SHORT.get(c[0], c[0])} {c[1]} ({c[2]} docs)") for c in cells]
    handles.append(plt.Line2D([], [], color="grey", linestyle="--", label="time saved = FLOPs saved"))
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.suptitle("The study's calibrated rules on the clock (2 CPU cores, fp32)")
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adainfer_lmeval.experiments.bench.clock_plot",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="benchmark.json files of --study_cell runs")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmark/study_cell_clock.png"))
    a = parser.parse_args(argv)
    try:
        out = plot_clock(clock_points(a.files), a.out)
    except AdaInferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
