"""``adainfer-eval policy list [--json]`` / ``policy show FILE``: the shipped stop policies."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adainfer_lmeval.policies import files as pf
from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.policies.learned.base import read_policy


def shipped_policies() -> list[tuple[Path, dict | None, str | None]]:
    """(path, metadata or None, error or None) for every shipped policy file."""
    out = []
    for path in sorted(pf.policies_dir().glob("*/*.json")):
        try:
            kind, meta = read_policy(path)
            kind.check_files(path, meta)  # structure only: listing starts no process
            out.append((path, meta, None))
        except AdaInferError as error:
            out.append((path, None, str(error)))
    return out


def _operating_point(meta: dict) -> str:
    """Where the policy stops, and for a guarantee the promise: δ, confidence, calibration size."""
    where = f"thr={meta['threshold']:.3g} min_layer={meta['min_layer']}"
    point = meta.get("operating_point") or {}
    if point.get("criterion") != "guarantee":
        return where
    promise = (f"<={100 * point['max_changed']:g}% changed at {100 * point['confidence']:g}% "
               f"(n={point['calibration_docs']})")
    return f"{where}, {promise}" if point.get("passed", True) else f"{where}, none passed {promise}: never exits"


def _row(path: Path, meta: dict) -> list[str]:
    val = meta.get("validation") or {}
    tr = meta.get("training") or {}
    model = meta["model"]
    layers = model.get("num_layers")
    shots = ",".join(str(s) for s in tr.get("shots", []))
    acc = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    saved = val.get("layers_saved")
    label = meta.get("label")
    return [
        model["name"], meta["kind"], "-" if label is None else f"{label.get('mode', '?')}/{label.get('prediction', '?')}",
        f"{len(tr.get('tasks', []))} tasks, {shots}-shot, {tr.get('docs', '?')} examples",
        f"{acc(val.get('full_acc'))} ({acc(val.get('chance_acc'))})", acc(val.get("policy_acc")),
        "-" if saved is None else f"{100 * saved:.1f}% ({val.get('mean_exit_layer', 0):.1f}/{layers})",
        _operating_point(meta),
        str(path.relative_to(pf.policies_dir().parent)) if path.is_relative_to(pf.policies_dir().parent) else str(path),
    ]


def main(argv: list[str] | None = None) -> int:
    """``adainfer-eval policy list [--json]`` / ``policy show FILE``."""
    parser = argparse.ArgumentParser(prog="adainfer-eval policy", description="Shipped early-exit stop classifiers.")
    sub = parser.add_subparsers(dest="command", required=True)
    lister = sub.add_parser("list", help="what is shipped, trained on what, validation accuracy and savings")
    lister.add_argument("--json", action="store_true", help="print the metadata as JSON")
    show = sub.add_parser("show", help="check a policy file and print its metadata")
    show.add_argument("file")
    args = parser.parse_args(argv)
    try:
        if args.command == "show":
            print(json.dumps(read_policy(args.file)[1], indent=2))
            return 0
        entries = shipped_policies()
        if args.json:
            print(json.dumps([{"file": str(p), "meta": m, "error": e} for p, m, e in entries], indent=2))
            return 0
        header = ["model", "kind", "labels", "trained on", "val full (chance)", "val policy", "layers saved", "operating point", "file"]
        rows, broken = [], [(p, e) for p, m, e in entries if e is not None]
        for p, m, e in entries:
            if m is None:
                continue
            try:
                rows.append(_row(p, m))
            except (KeyError, TypeError, ValueError, AttributeError) as error:  # metadata beyond what loading needs
                broken.append((p, f"unreadable metadata for the listing ({type(error).__name__}: {error})"))
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        print("  ".join("-" * w for w in widths))
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        for p, e in broken:
            print(f"BROKEN {p}: {e}")
        if not entries:
            print(f"(no policies under {pf.policies_dir()})")
        print("val: held-out training documents (accuracy = lm-eval acc; savings mean something only above chance)")
        return 0
    except AdaInferError as error:
        print(f"adainfer-eval policy: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
