"""How early each read-out gives full depth's answer: the figure of the filled-continuation runs.

    python -m adainfer_lmeval.experiments.readout_plot reports/study/readouts/*.json \\
        --out reports/study/readouts/agreement_by_layer.png

One panel per study cell (its test documents): per read-out (the lens, SimLens, the filled
continuation, the last K layers only), the share of documents whose answer read from layer l
equals full depth's. The agreement criterion needs about 99%: a read-out saves layers from
where its curve gets there.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.experiments.bench.clock_plot import MODEL_SHORT

STYLES = {"lens": ("black", "-"), "simlens": ("#1f77b4", "-"), "filled": ("#d62728", "-"),
          "last1": ("#2ca02c", "--"), "last2": ("#9467bd", "--"), "last3": ("#8c564b", "--")}


def read_runs(paths: list[Path]) -> list[dict]:
    runs = []
    for path in paths:
        try:
            run = json.loads(Path(path).read_text())
            run["agreement"]["test"], run["from_layer"], run["num_layers"]  # the fields the figure reads
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AdaInferError(f"{path}: not a filled-continuation result ({type(exc).__name__}: {exc}); write it with "
                                "python -m adainfer_lmeval.experiments.filled_continuation ... --json PATH") from None
        runs.append(run)
    if not runs:
        raise AdaInferError("no result files given")
    return runs


def plot_agreement(runs: list[dict], out: Path, role: str = "test") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(runs))
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax, run in zip(axes.flat, runs):
        layers = list(range(run["from_layer"], run["num_layers"] + 1))
        for name, shares in run["agreement"][role].items():
            colour, line = STYLES.get(name, ("grey", ":"))
            ax.plot(layers, [100 * x for x in shares], line, color=colour, marker=".", label=name)
        ax.axhline(99, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{MODEL_SHORT.get(run['model'], run['model'])} {run['task']} ({run['n_docs'][role]} {role} docs)", fontsize=10)
        ax.set_xlabel("layer read from")
        ax.set_ylabel("answers = full depth's (%)")
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    handles = {label: h for ax in axes.flat for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle("Which read-out gives full depth's answer early (dotted: 99%, what the agreement criterion needs)", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adainfer_lmeval.experiments.readout_plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="--json files of filled_continuation runs")
    parser.add_argument("--out", type=Path, default=Path("reports/study/readouts/agreement_by_layer.png"))
    parser.add_argument("--role", choices=("train", "test"), default="test")
    a = parser.parse_args(argv)
    try:
        out = plot_agreement(read_runs(a.files), a.out, a.role)
    except AdaInferError as exc:
        print(f"readout_plot: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
