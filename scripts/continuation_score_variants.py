"""Do compositions of the lens margin and the SimLens continuation beat the continuation's own margin?
(reports/study/README.md, "Tried and not adopted")

Over the study's cells above chance (reports/study/results.json; its collections in out/study/collect/, intra-task,
calibrated on the training documents under one criterion, scored on the test documents, the
continuation answering and every carry counted as the study counts it), each score below stops
at the first layer >= min_layer where it reaches the calibrated threshold:

* simlens: the continuation's option margin (the study's ``simlens``; its row reproduces the study's);
* min(lens, cont): both margins high;
* cont if lens == cont: the continuation's margin where the lens and the continuation pick the same option, else 0;
* cont if cont == prev (patience): where the continuation's answer equals its answer from the layer before;
* mean(lens, cont).

    python scripts/continuation_score_variants.py [--criterion agreement|accuracy|guarantee]
"""

import argparse
import json
from pathlib import Path

import numpy as np

from adainfer_lmeval.experiments.bench.clock_plot import MODEL_SHORT
from adainfer_lmeval.experiments.calibration import calibrate, evaluate, exit_layers
from adainfer_lmeval.experiments.study_policies import layer_scores, policy_readout
from adainfer_lmeval.experiments.study_tasks import load_collection


def study_cells(results: Path) -> list[tuple[str, str]]:
    """(model, task@shots) of the study's cells above chance, in the study's order."""
    rows = json.loads(results.read_text())["rows"]
    cells = {(r["model"], f"{r['task']}@{r['shots']}") for r in rows if r["policy"] == "full" and not r["at_chance"]}
    return [c for c in dict.fromkeys((r["model"], f"{r['task']}@{r['shots']}") for r in rows) if c in cells]


def scores(data) -> dict[str, np.ndarray]:
    last = data.num_layers - 1
    lens = layer_scores("margin", None, data).astype(float)
    cont = layer_scores("simlens", None, data).astype(float)
    cont_choice, lens_choice = data.continuation.choice[:, :last], data.choice[:, :last]
    previous = np.concatenate([np.full((len(cont_choice), 1), -1), cont_choice[:, :-1]], 1)
    return {"simlens": cont, "min(lens, cont)": np.minimum(lens, cont),
            "cont if lens == cont": np.where(lens_choice == cont_choice, cont, 0.0),
            "cont if cont == prev": np.where(previous == cont_choice, cont, 0.0),
            "mean(lens, cont)": (lens + cont) / 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--criterion", default="agreement", choices=("agreement", "accuracy", "guarantee"))
    parser.add_argument("--collect-dir", type=Path, default=Path("out/study/collect"))
    parser.add_argument("--study-results", type=Path, default=Path("reports/study/results.json"))
    args = parser.parse_args()
    cells = study_cells(args.study_results)
    results: dict[str, list] = {}
    for model, task in cells:
        train, test = (load_collection(args.collect_dir / model / f"{task}-{role}.parquet") for role in ("train", "test"))
        train_scores, test_scores = scores(train), scores(test)
        for name in train_scores:
            # every score reads the continuation's margin: each check carries, as simlens's does
            point = calibrate(train, train_scores[name], 0.01, criterion=args.criterion, readout=policy_readout("simlens", train))
            exits = exit_layers(test_scores[name], point["threshold"], point["min_layer"])
            r = evaluate(test, exits, policy_readout("simlens", test), point["min_layer"])
            results.setdefault(name, []).append((100 * r["layers_saved"], 100 * (r["policy_acc"] - r["full_acc"])))
    print(f"layers saved % / Δ points, intra-task, {args.criterion}")
    print("| score | " + " | ".join(f"{MODEL_SHORT.get(m, m)} {t}" for m, t in cells) + " | mean | small-model cells | worst Δ |")
    print("|---|" + "---|" * (len(cells) + 3))
    small = [i for i, (m, _) in enumerate(cells) if m != "qwen2.5-coder-1.5b"]
    for name, per_cell in results.items():
        v = np.array(per_cell)
        print(f"| {name} | " + " | ".join(f"{s:.1f} / {d:+.1f}" for s, d in v) +
              f" | {v[:, 0].mean():.1f} / {v[:, 1].mean():+.2f} | {v[small, 0].mean():.1f} / {v[small, 1].mean():+.2f} | {v[:, 1].min():+.1f} |")


if __name__ == "__main__":
    main()
