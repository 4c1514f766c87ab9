"""The report's plots: one panel per (model, task) in a grid of at most three columns, one colour
and marker per policy shared by every panel of both plots, the full-depth point, the oracle and
the chance line marked, one legend for the figure."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from adainfer_lmeval.reporting.comparison import FULL, ORACLE

# A fixed colour per policy family, variants of a family in sorted order down its list, so that
# "svm" is the same red in every report and panel. Grey and black are kept for full depth, the
# oracle and the chance line.
FAMILY_COLOURS = {
    "threshold": ["#1f77b4", "#ff7f0e", "#2ca02c", "#17becf", "#bcbd22", "#e377c2", "#8c564b", "#aec7e8",
                  "#ffbb78", "#98df8a", "#9edae5", "#dbdb8d", "#f7b6d2", "#c49c94"],
    "svm": ["#d62728", "#ff9896", "#a01c1c"],
    "crf": ["#9467bd", "#c5b0d5", "#5e3c99"],
}
OTHER_COLOURS = ["#8c6d31", "#e7969c", "#637939", "#7b4173", "#3182bd", "#e6550d"]
MARKERS = ["o", "s", "^", "v", "P", "X", "h", "<", ">"]


def policy_styles(policies) -> dict[str, dict]:
    """Colour, marker and legend label of each policy: a function of the policy strings alone."""
    styles = {FULL: {"color": "black", "marker": "*", "label": "full depth"},
              ORACLE: {"color": "black", "marker": "D", "label": "oracle (hindsight bound)"}}
    families: dict[str, list[str]] = {}
    for p in sorted(set(policies) - {FULL, ORACLE}):
        families.setdefault(p.split(",")[0], []).append(p)
    other = 0
    for family, members in sorted(families.items()):
        for i, p in enumerate(members):
            if family in FAMILY_COLOURS:
                palette, j = FAMILY_COLOURS[family], i
            else:
                palette, j = OTHER_COLOURS, other
                other += 1
            label = "\n  ".join(textwrap.wrap(_plain(p).replace(",", ", "), 34)) or _plain(p)
            styles[p] = {"color": palette[j % len(palette)], "marker": MARKERS[(i + j // len(palette)) % len(MARKERS)],
                         "label": label}
    return styles


def _plain(text) -> str:
    """Text as matplotlib draws it literally: "$" would start mathtext."""
    return " ".join(str(text).split()).replace("$", r"\$")


def _panels(rows: list[dict]) -> list[tuple[tuple, list[dict]]]:
    panels: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["policy"] != FULL and r["task"] != "macro-average":
            panels.setdefault((r["model"], r["task"], r.get("num_fewshot"), r.get("limit")), []).append(r)
    return list(panels.items())


def _grid(n: int):
    """Figure and axes for n panels, at most 3 columns; a spare cell (or a row below) for the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 1 if n <= 1 else 2 if n in (2, 4) else 3
    nrows = max(1, math.ceil(n / ncols))
    spare = nrows * ncols > n
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.4 * ncols, 4.3 * nrows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.axis("off")
    return plt, fig, flat[:n], (flat[n] if spare else None)


def _title(ax, key: tuple, first: dict) -> None:
    model, task, shots, _ = key
    label = f"{_plain(model)}\n{_plain(task)}" + (f", {shots}-shot" if shots is not None else "") + f", {first['documents']} docs"
    at_chance = first["at_chance"]
    ax.set_title(label + ("  (AT CHANCE)" if at_chance else ""), fontsize=12, color="firebrick" if at_chance else "black")


def _legend(fig, legend_ax, handles: dict, styles: dict) -> None:
    fixed = [styles[FULL]["label"], styles[ORACLE]["label"], "chance"]
    rest = [st["label"] for p, st in sorted(styles.items()) if p not in (FULL, ORACLE)]
    items = [(label, handles[label]) for label in fixed + rest if label in handles]
    labels, artists = [k for k, _ in items], [v for _, v in items]
    if legend_ax is not None:
        legend_ax.legend(artists, labels, loc="center", fontsize=10, frameon=False)
    else:
        # below the panels; savefig's tight bounding box grows the figure to hold it
        fig.legend(artists, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(3, len(labels)), fontsize=10,
                   frameon=False)


def _style_axes(ax) -> None:
    ax.grid(True, alpha=0.35)
    ax.tick_params(labelsize=10)


def plot_tradeoff(rows: list[dict], path: Path) -> None:
    """Accuracy against layers saved, one panel per (model, task)."""
    panels = _panels(rows)
    styles = policy_styles(r["policy"] for _, members in panels for r in members)
    plt, fig, axes, legend_ax = _grid(len(panels))
    handles: dict = {}
    for ax, (key, members) in zip(axes, panels):
        first = members[0]
        # Policies draw over the full-depth star: one that never exits sits exactly on it.
        h = ax.scatter([0], [100 * first["full"]], marker="*", s=300, color="black", zorder=2)
        handles.setdefault(styles[FULL]["label"], h)
        for r in members:
            st = styles[r["policy"]]
            x, y = r["layers_saved_pct"], 100 * r["early_exit"]
            if r["policy"] == ORACLE:
                h = ax.scatter([x], [y], marker="D", s=110, facecolors="none", edgecolors="black", linewidths=2, zorder=5)
                ax.annotate("oracle", (x, y), textcoords="offset points", xytext=(9, -14), fontsize=10, ha="left")
            else:
                h = ax.scatter([x], [y], marker=st["marker"], s=80, color=st["color"], edgecolors="white", linewidths=0.6,
                               alpha=0.9, zorder=3)
            handles.setdefault(st["label"], h)
        if first["chance"] is not None:
            h = ax.axhline(100 * first["chance"], color="grey", linestyle=":", linewidth=1.6, zorder=1)
            handles.setdefault("chance", h)
        _title(ax, key, first)
        ax.set_xlabel("layers saved (%)", fontsize=11)
        ax.set_ylabel(f"{_plain(first['metric'])} (%)", fontsize=11)
        lo = min([100 * first["chance"]] * (first["chance"] is not None) + [100 * r["early_exit"] for r in members])
        hi = max([100 * first["full"]] + [100 * r["early_exit"] for r in members])
        pad = max(2.0, 0.08 * (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlim(-2, max(10.0, max(r["layers_saved_pct"] for r in members) * 1.15 + 2))
        _style_axes(ax)
    fig.tight_layout()
    _legend(fig, legend_ax, handles, styles)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_exit_layers(rows: list[dict], path: Path) -> None:
    """Where requests exit: per (model, task), the share of requests at each exit layer, one line per policy."""
    panels = [(k, [r for r in m if r.get("exit_layer_histogram")]) for k, m in _panels(rows)]
    panels = [(k, m) for k, m in panels if m]
    styles = policy_styles(r["policy"] for _, members in panels for r in members)
    plt, fig, axes, legend_ax = _grid(len(panels))
    handles: dict = {}
    for ax, (key, members) in zip(axes, panels):
        for r in members:
            st = styles[r["policy"]]
            hist = {int(float(k)): v for k, v in r["exit_layer_histogram"].items()}
            total = sum(hist.values()) or 1
            layers = list(range(1, r["num_layers"] + 1))
            share = [100 * hist.get(layer, 0) / total for layer in layers]
            oracle = r["policy"] == ORACLE
            marks = [i for i, v in enumerate(share) if v > 0]  # markers where requests exit, not on the zeros
            (h,) = ax.plot(layers, share, color=st["color"], marker=None if oracle else st["marker"], markersize=6, markevery=marks,
                           linestyle="--" if oracle else "-", linewidth=2 if oracle else 1.4, alpha=0.9)
            handles.setdefault(st["label"], h)
        _title(ax, key, members[0])
        ax.set_xlim(0.5, members[0]["num_layers"] + 0.5)
        ax.set_xlabel("exit layer", fontsize=11)
        ax.set_ylabel("requests (%)", fontsize=11)
        _style_axes(ax)
    fig.tight_layout()
    _legend(fig, legend_ax, handles, styles)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
