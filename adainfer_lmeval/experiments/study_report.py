"""The study's outputs: ``report.md`` (every table), ``results.csv`` / ``results.json``, the plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from adainfer_lmeval.experiments.study_policies import CONTINUATION_POLICIES, STUDY_POLICIES, TRAINING_SETTINGS

REPORTED_CRITERIA = ("agreement", "accuracy", "guarantee")
CRITERION_TEXT = {
    "agreement": "At most 1% of the *training* documents' answers may change (the shipped policies' empirical criterion).",
    "accuracy": "Training accuracy within 1 point of full depth (the paper's \"<1 point lost\").",
    "guarantee": "The Clopper-Pearson upper bound on the rate of changed answers among the training (calibration) "
                 "documents is at most δ (`--max-changed`) at 95% confidence (Bonferroni over the `min_layer` paths); "
                 "where no point passes, the policy runs at full depth.",
}
PAPER_SAVING = 0.148  # the paper's smallest claimed saving within 1 point


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _cells(rows: list[dict]) -> list[tuple]:
    return sorted({(r["model"], r["task"], r["shots"]) for r in rows})


def _pooled_se(ses: list[float]) -> float:
    """Standard error of a mean over independent cells."""
    return float(math.sqrt(sum(s * s for s in ses)) / len(ses))


def summary_rows(rows: list[dict], criterion: str) -> list[dict]:
    """Per policy and setting: mean layers saved and accuracy change over tasks above chance."""
    out = []
    order = ["full", "oracle", *STUDY_POLICIES]
    keys = sorted({(r["policy"], r["setting"]) for r in rows if r["criterion"] in (criterion, "-")},
                  key=lambda k: (order.index(k[0]), k[1]))
    for policy, setting in keys:
        members = [r for r in rows if r["policy"] == policy and r["setting"] == setting
                   and r["criterion"] in (criterion, "-") and not r["at_chance"]]
        if not members:
            continue
        within = [r for r in members if r["delta_points"] > -1.0 - 1e-9]
        out.append({
            "policy": policy, "setting": setting, "cells": len(members),
            "mean_layers_saved": float(np.mean([r["layers_saved"] for r in members])),
            "mean_layers_saved_se": _pooled_se([r["layers_saved_se"] for r in members]),
            "mean_continuation_share": (float(np.mean([r["continuation_share"] for r in members]))
                                        if policy in CONTINUATION_POLICIES else None),
            "mean_delta_points": float(np.mean([r["delta_points"] for r in members])),
            "mean_delta_se_points": _pooled_se([r["delta_se_points"] for r in members]),
            "worst_delta_points": float(np.min([r["delta_points"] for r in members])),
            "cells_within_1pt": len(within),
            "cells_saving_15pct_within_1pt": sum(r["layers_saved"] >= PAPER_SAVING for r in within),
            "cells_passed": (sum(bool(r["passed"]) for r in members)
                             if criterion == "guarantee" and policy in STUDY_POLICIES else None),
        })
    return out


def _cell_text(r: dict | None) -> str:
    if r is None:
        return "-"
    continuation = f", cont. {_pct(r['continuation_share'])}" if r["policy"] in CONTINUATION_POLICIES else ""
    return f"{_pct(r['acc'])} / {_pct(r['layers_saved'])} (Δ{r['delta_points']:+.1f}±{r['delta_se_points']:.1f}{continuation})"


def _criterion_tables(rows: list[dict], criterion: str) -> list[str]:
    lines = [f"### Operating point `{criterion}`", "", CRITERION_TEXT[criterion], "",
             "Per cell: test accuracy % / layers saved % (Δ points against full depth ± its paired standard error; for "
             "the SimLens policies, cont.: the continuation's carries in % of the model's depth, counted in the layers "
             "saved). `-`: not evaluated (no continuation read-out collected for the cell).", ""]
    for setting in [s for s in TRAINING_SETTINGS if any(r["setting"] == s for r in rows)]:
        inter_model = setting == "inter-model"  # a row per model the policies came from
        lines += [f"#### {setting}", ""]
        header = ["model", *(["policies from"] if inter_model else []), "task", "shots", "n", "chance", "full", "oracle",
                  *STUDY_POLICIES, "note"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for model, task, shots in _cells(rows):
            mine = [r for r in rows if (r["model"], r["task"], r["shots"]) == (model, task, shots)]
            full, oracle = (next(r for r in mine if r["policy"] == p) for p in ("full", "oracle"))
            sources = sorted({r["trained_model"] for r in mine if r["setting"] == setting}) if inter_model else [model]
            for source in sources:
                pick = {r["policy"]: r for r in mine if r["setting"] == setting and r["criterion"] == criterion
                        and r["trained_model"] == source}
                lines.append("| " + " | ".join([
                    model, *([source] if inter_model else []), task, str(shots), str(full["n_test"]), _pct(full["chance"]),
                    _pct(full["full_acc"]), f"{_pct(oracle['acc'])} / {_pct(oracle['layers_saved'])}",
                    *[_cell_text(pick.get(p)) for p in STUDY_POLICIES], "AT CHANCE" if full["at_chance"] else "",
                ]) + " |")
        lines.append("")
    passed = " | cells passed" if criterion == "guarantee" else ""
    lines += ["Mean over the cells *above chance* (a saving at chance proves nothing), ± standard error over documents "
              "(inter-model: over every cell and model the policies came from):", "",
              f"| policy | setting | cells | mean layers saved % | continuation % of depth (counted in the saving) | mean Δ points | worst Δ | cells within 1 pt | cells with ≥14.8% saved within 1 pt{passed} |",
              "|---|---|---|---|---|---|---|---|---|" + ("---|" if passed else "")]
    for s in summary_rows(rows, criterion):
        lines.append(f"| {s['policy']} | {s['setting']} | {s['cells']} | {_pct(s['mean_layers_saved'])} ± {_pct(s['mean_layers_saved_se'])} | "
                     f"{_pct(s['mean_continuation_share'])} | "
                     f"{s['mean_delta_points']:+.1f} ± {s['mean_delta_se_points']:.1f} | {s['worst_delta_points']:+.1f} | "
                     f"{s['cells_within_1pt']} | {s['cells_saving_15pct_within_1pt']} |"
                     + (f" {'-' if s['cells_passed'] is None else s['cells_passed']} |" if passed else ""))
    lines.append("")
    return lines


def _guarantee_reach(rows: list[dict]) -> list[str]:
    """Per cell and setting: the calibration size and the smallest δ any point can pass there."""
    from adainfer_lmeval.experiments.calibration import changed_upper_bound

    lines = ["### What the guarantee can reach at these calibration sizes", "",
             "A point passes only if the upper bound on its rate of changed answers is at most δ, each of the L - 1 "
             "`min_layer` paths tested at 1 - (1 - confidence) / (L - 1) (Bonferroni). Even a point that changes no "
             "calibration answer has the bound 1 - ((1 - confidence) / (L - 1))^(1/n), so a δ below it cannot be met "
             "by any policy, however good its signal.", "",
             "| model | task | shots | setting | calibration docs | paths | smallest reachable δ % |", "|---|---|---|---|---|---|---|"]
    seen = set()
    for r in rows:
        if r["criterion"] != "guarantee" or r["setting"] == "inter-model":
            continue
        key = (r["model"], r["task"], r["shots"], r["setting"])
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"| {r['model']} | {r['task']} | {r['shots']} | {r['setting']} | {r['calibration_docs']} | {r['layers'] - 1} | "
                     f"{_pct(changed_upper_bound(0, r['calibration_docs'], r['path_confidence']))} |")
    lines.append("")
    return lines


def markdown_tables(result: dict) -> str:
    rows = result["rows"]
    lines = []
    for criterion in REPORTED_CRITERIA:
        lines += _criterion_tables(rows, criterion)
    lines += _guarantee_reach(rows)
    lines += ["### In hindsight: the most a threshold could save on the test documents within 1 point", "",
              "Each intra-task policy's score with the operating point (threshold *and* min_layer) picked on the "
              "*test* documents themselves: the most layers saved whose test accuracy stays within 1 point of full "
              "depth. No one could pick this point in advance: it bounds what any calibration of these scores could "
              "give; the oracle bounds every policy.", "",
              "Cells: layers saved % (test accuracy %, % of answers equal to full depth's). Where few answers agree, "
              "the accuracy held only because early layers' (mostly one-label) guesses score about as well as the model.", "",
              "| model | task | shots | full % | oracle saved % | " + " | ".join(f"{p} best saved % (acc %, agree %)" for p in STUDY_POLICIES)
              + " | note |", "|" + "---|" * (6 + len(STUDY_POLICIES))]
    for model, task, shots in _cells(rows):
        mine = {r["policy"]: r for r in rows if (r["model"], r["task"], r["shots"]) == (model, task, shots) and r["setting"] == "-"}
        cells = []
        for policy in STUDY_POLICIES:
            best = next((h for h in result.get("hindsight", []) if (h["model"], h["task"], h["policy"]) == (model, f"{task}@{shots}", policy)), None)
            cells.append("-" if best is None else f"{_pct(best['layers_saved'])} ({_pct(best['acc'])}, {_pct(best['agreement'])})")
        lines.append(f"| {model} | {task} | {shots} | {_pct(mine['full']['full_acc'])} | {_pct(mine['oracle']['layers_saved'])} | "
                     + " | ".join(cells) + f" | {'AT CHANCE' if mine['full']['at_chance'] else ''} |")
    lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = result["rows"]
    cells = sorted({(r["model"], f"{r['task']}@{r['shots']}") for r in rows})
    cols = min(4, len(cells))
    nrows = math.ceil(len(cells) / cols)
    height = 3.4 * nrows + 1.0  # + legend and title
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, height), squeeze=False)
    colors = dict(zip(STUDY_POLICIES, ("tab:blue", "tab:orange", "tab:purple", "tab:green", "tab:red", "tab:brown",
                                       "tab:pink", "tab:olive", "tab:cyan")))
    markers = {"intra": "o", "inter-task": "s", "inter-model": "^"}
    for ax, (model, task) in zip(axes.flat, cells):
        mine = [r for r in rows if r["model"] == model and f"{r['task']}@{r['shots']}" == task]
        full = next(r for r in mine if r["policy"] == "full")
        for c in result["curves"]:
            if c["model"] == model and c["task"] == task:
                pts = np.array(sorted(c["points"]))
                ax.plot(100 * pts[:, 0], 100 * pts[:, 1], color=colors[c["policy"]], alpha=0.35, linewidth=1)
        for r in mine:
            if r["policy"] in colors and r["criterion"] in ("accuracy", "agreement"):
                ax.scatter(100 * r["layers_saved"], 100 * r["acc"], color=colors[r["policy"]], marker=markers[r["setting"]],
                           facecolors=colors[r["policy"]] if r["criterion"] == "accuracy" else "none", s=28)
        oracle = next(r for r in mine if r["policy"] == "oracle")
        ax.scatter([0], [100 * full["acc"]], color="black", marker="*", s=80)
        ax.scatter([100 * oracle["layers_saved"]], [100 * oracle["acc"]], color="purple", marker="D", s=40)
        ax.axhline(100 * full["chance"], color="grey", linestyle=":")
        ax.set_title(f"{model} {task}" + (" (AT CHANCE)" if full["at_chance"] else ""), fontsize=8)
        ax.set_xlabel("layers saved %", fontsize=8)
        ax.set_ylabel("accuracy %", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(cells):]:
        ax.axis("off")
    legend = [Line2D([], [], color=c, marker="o", linestyle="-", label=k) for k, c in colors.items()]
    legend += [Line2D([], [], color="grey", marker=m, linestyle="", label=s) for s, m in markers.items()]
    legend += [Line2D([], [], color="black", marker="*", linestyle="", label="full depth"),
               Line2D([], [], color="purple", marker="D", linestyle="", label="oracle"),
               Line2D([], [], color="grey", marker="o", markerfacecolor="none", linestyle="", label="hollow: agreement point"),
               Line2D([], [], color="grey", linestyle=":", label="chance")]
    fig.legend(handles=legend, loc="lower center", ncol=8, fontsize=8)
    fig.suptitle("accuracy vs layers saved on the test documents; markers: calibrated operating points; "
                 "lines: each intra-task policy swept on the test documents (hindsight)", fontsize=9)
    fig.tight_layout(rect=(0, 0.75 / height, 1, 1 - 0.35 / height))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _backend_table(check: dict) -> list[str]:
    text = ["### Offline evaluation vs the real backend", "",
            f"{check['model']}'s intra-task policies for {check['task']} (operating point `{check['criterion']}`) run through "
            f"`lm_eval.simple_evaluate(model=\"adainfer\", ...)` on the first {check['docs']} documents of the task "
            "(a mechanics check: these rows may include SST-2's training half), against the offline evaluation of "
            "the same documents' collected features:", "",
            "| policy | docs | exit layers equal | answers equal | acc offline % | acc backend % | backend exit layers |",
            "|---|---|---|---|---|---|---|"]
    for r in check["policies"].values():
        text.append(f"| `{r['policy']}` | {r['docs']} | {r['exits_equal']} | {r['answers_equal']} | {_pct(r['offline_acc'])} | "
                    f"{_pct(r['backend_acc'])} | {' '.join(map(str, r['backend_exits']))} |")
    return text + [""]


def _rounded(x):  # 6 significant digits are plenty for a report; keeps the file small
    if isinstance(x, float):
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v) for v in x]
    return x


CSV_FIELDS = ["model", "task", "shots", "layers", "n_test", "chance", "at_chance", "full_acc", "policy", "setting", "criterion",
              "acc", "acc_se", "delta_points", "delta_se_points", "mean_exit_layer", "layers_saved", "layers_saved_se",
              "continuation_layers", "continuation_share", "agreement",
              "trained_model", "trained_on", "n_train", "threshold", "min_layer", "calibration_docs", "calibration_changed",
              "changed_upper_bound", "passed"]


def write_outputs(result: dict, out: Path, meta: dict) -> list[Path]:
    import csv

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_rounded({"meta": meta, **result}), separators=(",", ":")) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in result["rows"]:
            writer.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()})
    text = ["# AdaInfer study: generated tables", "",
            f"Generated by `{meta['command']}` ({meta['seconds']:.0f}s for the offline part); "
            "read README.md for the method and what the numbers say.", "",
            markdown_tables(result), "![accuracy vs layers saved](accuracy_vs_layers_saved.png)", ""]
    if meta.get("backend_check"):
        text += _backend_table(meta["backend_check"])
    (out / "report.md").write_text("\n".join(text))
    plot(result, out / "accuracy_vs_layers_saved.png")
    return [out / name for name in ("results.json", "results.csv", "report.md", "accuracy_vs_layers_saved.png")]
