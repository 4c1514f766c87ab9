"""Which offline tasks can run: their data checked against the datasets cache, in one line.

Reads only ``dataset_info.json`` files: it neither imports ``datasets`` nor builds tasks, so
commands refuse a task with missing data before a model loads.
"""

from __future__ import annotations

from typing import Iterable

from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.offline.data.catalogue import TASKS, TRAIN, UNAVAILABLE, HubConfig, find_task
from adainfer_lmeval.offline.data.datasets_cache import FETCH_COMMAND, present_splits
from adainfer_lmeval.offline.environment import hf_datasets_cache


class DataMissingError(AdaInferError):
    """Offline data for a task is not in the cache; the message is one line naming the fix."""


def _missing_for(needs: Iterable) -> list[tuple[HubConfig, str]]:
    cache: dict[str, dict[str, int]] = {}
    missing = []
    for config, split in needs:
        rows = cache.setdefault(config.key, present_splits(config))
        if not rows.get(split):
            missing.append((config, split))
    return missing


def check_tasks_available(task_names: str | Iterable[str]) -> None:
    """Raise ``DataMissingError`` (one line, naming the fix) if a task's offline data is absent.

    ``task_names``: lm-eval task, group or tag names (a list, or one comma-separated string).
    Names no offline benchmark serves (other lm-eval tasks, local YAMLs) are not checked.
    """
    if isinstance(task_names, str):
        task_names = [task_names]
    names = [n.strip() for item in task_names for n in str(item).split(",") if n.strip()]
    for name in names:
        if name in UNAVAILABLE:
            raise DataMissingError(UNAVAILABLE[name])
    missing_tasks, first = [], None
    train_only = True
    for name in names:
        data = find_task(name)
        if data is None:
            continue
        missing = _missing_for(data.needs)
        if missing:
            missing_tasks.append(name)
            first = first or missing[0]
            train_only = train_only and all(split == TRAIN for _, split in missing)
    if missing_tasks:
        config, split = first
        hint = " (without --no-train)" if train_only else ""
        plural = "s" if len(missing_tasks) > 1 else ""
        raise DataMissingError(
            f"offline data missing for task{plural} {', '.join(missing_tasks)} "
            f"({config.describe()} {split} not in {hf_datasets_cache()}); "
            f"run `{FETCH_COMMAND}`{hint}"
        )


def data_status() -> list[dict]:
    """One row per task: name, kind, evaluated split, expected and present rows, note."""
    rows = []
    for name, task in TASKS.items():
        missing = _missing_for(task.needs)
        present = 0
        if not missing:
            for config in {c.key: c for c, _ in task.needs}.values():
                split_rows = present_splits(config)
                for split in task.eval_split.split("+"):
                    present += split_rows.get(split, 0)
        rows.append({
            "task": name, "kind": task.kind, "split": task.eval_split,
            "expected": task.expected, "rows": present if not missing else None,
            "present": not missing,
            "missing": sorted({f"{c.describe()} {s}" for c, s in missing})[:3],
            "note": task.note,
        })
    return rows
