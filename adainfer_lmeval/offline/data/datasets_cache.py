"""The Hugging Face ``datasets`` cache, in the exact layout ``datasets`` uses for a dataset
that came from the Hub: what is there, and writing one config into it::

    $HF_DATASETS_CACHE/<namespace>___<name>/<config>/0.0.0/<hash>/
        dataset_info.json            (features, config_name, splits with row counts)
        <name>-<split>.arrow         (Arrow stream files, written by datasets' ArrowWriter)

With ``HF_HUB_OFFLINE=1`` ``datasets.load_dataset("nyu-mll/glue", "sst2")`` then finds that
folder (``datasets``' "cached dataset" fallback), so lm-eval's task configs run unchanged.
Reading needs only ``dataset_info.json`` files; writing imports ``datasets`` when it runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.offline.data.catalogue import HubConfig
from adainfer_lmeval.offline.environment import hf_datasets_cache

FETCH_COMMAND = "adainfer-eval data fetch"
# Every dataset folder written here carries this at the start of its description; only such
# folders are ever replaced or removed (a real Hub download in the same cache is left alone).
MARKER = "adainfer-lmeval offline data"
RECIPE = "1"  # bump when the rows written change; older folders are then rebuilt
VERSION_DIR = "0.0.0"


def config_root(config: HubConfig) -> Path:
    namespace, name = config.repo_id.split("/")
    return hf_datasets_cache() / f"{namespace}___{name}" / config.config


def _read_info(folder: Path) -> dict | None:
    try:
        info = json.loads((folder / "dataset_info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def our_folders(config: HubConfig) -> list[tuple[Path, dict]]:
    """Folders this package wrote for ``config``, newest first, with their dataset_info."""
    found = []
    version_root = config_root(config) / VERSION_DIR
    if not version_root.is_dir():
        return found
    for folder in version_root.iterdir():
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        info = _read_info(folder)
        if info and str(info.get("description", "")).startswith(MARKER):
            found.append((folder, info))
    found.sort(key=lambda item: item[0].stat().st_mtime, reverse=True)
    return found


def _recipe_of(info: dict) -> str:
    description = str(info.get("description", ""))
    marker = f"{MARKER} recipe "
    return description[len(marker):].split(" ", 1)[0] if description.startswith(marker) else ""


def present_splits(config: HubConfig) -> dict[str, int]:
    """{split: rows} of the newest complete folder of the current recipe (empty if none)."""
    for folder, info in our_folders(config):
        if _recipe_of(info) != RECIPE or info.get("config_name") != config.config:
            continue
        splits = info.get("splits") or {}
        rows = {}
        for split, split_info in splits.items():
            arrow = folder / f"{config.dataset_name}-{split}.arrow"
            if arrow.is_file() and arrow.stat().st_size > 0:
                rows[split] = int(split_info.get("num_examples", 0))
        if rows and len(rows) == len(splits):
            return rows
    return {}


def write_config(config: HubConfig, features, tables: dict, source: str) -> dict[str, int]:
    """Write one config folder in datasets' cache layout; returns {split: rows}.

    The folder is built hidden beside its final name and renamed into place, then this
    package's older folders of the config are removed."""
    from datasets import DatasetInfo, SplitDict, SplitInfo
    from datasets.arrow_writer import ArrowWriter
    from datasets.table import table_cast

    for split, table in tables.items():
        expected = config.expected.get(split)
        if expected is not None and table.num_rows != expected:
            raise AdaInferError(f"{config.describe()} {split}: {table.num_rows} rows, expected {expected}")
    splits_key = ",".join(sorted(tables))
    digest = hashlib.sha1(f"{MARKER}|{RECIPE}|{config.key}|{splits_key}".encode()).hexdigest()
    version_root = config_root(config) / VERSION_DIR
    version_root.mkdir(parents=True, exist_ok=True)
    final = version_root / digest
    scratch = Path(tempfile.mkdtemp(dir=version_root, prefix=f".{digest}."))  # hidden from datasets' glob
    try:
        split_dict = SplitDict(dataset_name=config.dataset_name)
        schema = features.arrow_schema
        for split, table in tables.items():
            writer = ArrowWriter(features=features, path=str(scratch / f"{config.dataset_name}-{split}.arrow"))
            writer.write_table(table_cast(table, schema))
            rows, size = writer.finalize()
            split_dict.add(SplitInfo(name=split, num_bytes=size, num_examples=rows, dataset_name=config.dataset_name))
        info = DatasetInfo(
            description=f"{MARKER} recipe {RECIPE} (from {source}); written by `{FETCH_COMMAND}`",
            features=features, builder_name="parquet", dataset_name=config.dataset_name,
            config_name=config.config, version=VERSION_DIR, splits=split_dict,
        )
        info.write_to_directory(str(scratch))
        if final.exists():
            shutil.rmtree(final)
        os.replace(scratch, final)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    for folder, _ in our_folders(config):  # older recipes or fewer splits: ours, so removable
        if folder != final:
            shutil.rmtree(folder, ignore_errors=True)
    os.utime(final)  # datasets picks the newest folder of a config
    return {split: table.num_rows for split, table in tables.items()}
