"""The leaderboard: per model, one row per policy (full depth and the oracle above the ranked
ones), one column group per (task, shots, limit)."""

from __future__ import annotations

from adainfer_lmeval.reporting.comparison import FULL, ORACLE

WITHIN_POINTS = 1.0  # a policy "keeps accuracy" when its macro Δ is no worse than this many points


def _group_label(task: str, shots) -> str:
    return task + (f" {shots}-shot" if shots is not None else "")


def task_groups(rows: list[dict]) -> list[dict]:
    """The (task, shots, limit) settings of early-exit rows, in row order, with their full-depth figures."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        if r["policy"] == FULL or r["task"] == "macro-average":
            continue
        key = (r["task"], r.get("num_fewshot"), r.get("limit"))
        if key not in groups:
            shots = "default" if r.get("num_fewshot") is None else r["num_fewshot"]
            groups[key] = {"key": f"{r['task']}-{shots}shot-{r.get('limit')}",
                           "label": _group_label(r["task"], r.get("num_fewshot")), "task": r["task"],
                           "shots": r.get("num_fewshot"), "limit": r.get("limit"), "metric": r["metric"],
                           "documents": r["documents"], "full": r["full"], "chance": r["chance"],
                           "at_chance": r["at_chance"]}
    # Tasks at chance last: their greyed columns are the ones to read least.
    return label_limits(sorted(groups.values(), key=lambda g: g["at_chance"]))


def label_limits(groups: list[dict]) -> list[dict]:
    """The same task and shots under two limits: the limit joins their labels, to tell them apart."""
    labels = [g["label"] for g in groups]
    for g in groups:
        if labels.count(g["label"]) > 1:
            g["label"] += f" (limit {g['limit']})"
    return groups


def _cell(r: dict) -> dict:
    return {"acc": r["early_exit"], "delta": r["delta"], "saved": r["layers_saved_pct"],
            "flops": r["flops_saved_pct"], "at_chance": r["at_chance"]}


def _macro(cells: dict, groups: list[dict]) -> dict | None:
    """Means over the tasks above chance; None when there is none or the row lacks one of them."""
    above = [g["key"] for g in groups if not g["at_chance"]]
    if not above or any(k not in cells for k in above):
        return None
    mean = lambda f: sum(cells[k][f] for k in above) / len(above)  # noqa: E731
    return {"acc": mean("acc"), "delta": mean("delta"), "saved": mean("saved"), "flops": mean("flops"), "tasks": len(above)}


def leaderboard(rows: list[dict]) -> list[dict]:
    """One section per model: its task groups and its rows (full depth, the oracle, then the
    policies ranked: those within ``WITHIN_POINTS`` of full depth on the macro first, by macro
    layers saved; then the rest, by macro Δ). The best row is the first ranked one that keeps
    accuracy and saves any layers."""
    sections = []
    models = list(dict.fromkeys(r["model"] for r in rows if r["policy"] != FULL))
    for model in models:
        mine = [r for r in rows if r["model"] == model and r["policy"] != FULL]
        groups = task_groups(mine)
        key_of = {(g["task"], g["shots"], g["limit"]): g["key"] for g in groups}
        full_cells = {g["key"]: {"acc": g["full"], "delta": 0.0, "saved": 0.0, "flops": 0.0, "at_chance": g["at_chance"]}
                      for g in groups}
        table = [{"model": model, "policy": FULL, "label": "full depth (reference)", "kind": "reference",
                  "cells": full_cells, "macro": _macro(full_cells, groups), "within": None, "rank": None, "best": False}]
        ranked = []
        for policy in dict.fromkeys(r["policy"] for r in mine):
            cells = {key_of[(r["task"], r.get("num_fewshot"), r.get("limit"))]: _cell(r) for r in mine if r["policy"] == policy}
            macro = _macro(cells, groups)
            within = None if macro is None else 100 * macro["delta"] >= -WITHIN_POINTS - 1e-9
            row = {"model": model, "policy": policy, "label": policy, "kind": "ranked", "cells": cells, "macro": macro,
                   "within": within, "rank": None, "best": False}
            if policy == ORACLE:
                row.update(kind="bound", label="oracle (hindsight bound, untimed)")
                table.append(row)
            else:
                ranked.append(row)

        def order(row: dict) -> tuple:
            m = row["macro"]
            if m is None:
                return (2, 0.0, 0.0, 0.0, row["policy"])
            if row["within"]:  # ties in layers saved go to the cheaper policy (its checks cost FLOPs)
                return (0, -m["saved"], -m["delta"], -(m.get("flops") or 0.0), row["policy"])
            return (1, -m["delta"], -m["saved"], 0.0, row["policy"])

        ranked.sort(key=order)
        for i, row in enumerate(r for r in ranked if r["macro"] is not None):
            row["rank"] = i + 1
        best = next((r for r in ranked if r["within"] and r["macro"]["saved"] > 0), None)
        if best is not None:
            best["best"] = True
        num_layers = mine[0]["num_layers"]
        sections.append({"model": model, "num_layers": num_layers, "groups": groups, "rows": table + ranked})
    return sections
