"""Do compositions of the lens margin and the SimLens continuation beat the continuation's own margin?
(reports/study/README.md, "Tried and not adopted")

Over the study's eight cells above chance (its collections in out/study/collect/, intra-task,
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
from pathlib import Path

import numpy as np

from adainfer_lmeval.experiments.calibration import Readout, calibrate, evaluate, exit_layers
from adainfer_lmeval.experiments.study_tasks import load_collection

CELLS = [("qwen2.5-coder-0.5b", t) for t in ("sst2@4", "arc_easy@0", "piqa@0")] + \
        [("smollm2-135m", t) for t in ("sst2@0", "arc_easy@0", "piqa@0")] + \
        [("qwen2.5-coder-1.5b", t) for t in ("mmlu@0", "sst2@4")]
SHORT = {"qwen2.5-coder-0.5b": "Qwen-0.5B", "qwen2.5-coder-1.5b": "Qwen-1.5B", "smollm2-135m": "SmolLM2"}


def scores(data) -> dict[str, np.ndarray]:
    last = data.num_layers - 1
    lens = data.feats[:, :last, data.columns(["margin"])[0]].astype(float)
    cont = data.continuation.margin[:, :last].astype(float)
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
    args = parser.parse_args()
    results: dict[str, list] = {}
    for model, task in CELLS:
        train, test = (load_collection(args.collect_dir / model / f"{task}-{role}.parquet") for role in ("train", "test"))
        train_scores, test_scores = scores(train), scores(test)
        for name in train_scores:
            point = calibrate(train, train_scores[name], 0.01, criterion=args.criterion,
                              readout=Readout.carried(train, checks=True, answers=True))
            exits = exit_layers(test_scores[name], point["threshold"], point["min_layer"])
            r = evaluate(test, exits, Readout.carried(test, checks=True, answers=True), point["min_layer"])
            results.setdefault(name, []).append((100 * r["layers_saved"], 100 * (r["policy_acc"] - r["full_acc"])))
    print(f"layers saved % / Δ points, intra-task, {args.criterion}")
    print("| score | " + " | ".join(f"{SHORT[m]} {t}" for m, t in CELLS) + " | mean | six small cells | worst Δ |")
    print("|---|" + "---|" * (len(CELLS) + 3))
    for name, cells in results.items():
        v = np.array(cells)
        print(f"| {name} | " + " | ".join(f"{s:.1f} / {d:+.1f}" for s, d in v) +
              f" | {v[:, 0].mean():.1f} / {v[:, 1].mean():+.2f} | {v[:6, 0].mean():.1f} / {v[:6, 1].mean():+.2f} | {v[:, 1].min():+.1f} |")


if __name__ == "__main__":
    main()
