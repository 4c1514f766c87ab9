"""The package as a user installs it: the wheel, a fresh environment outside the checkout, and
lm-eval's own ``lm_eval`` command finding ``--model adainfer`` through the start-up hook."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from adainfer_lmeval.adapter.startup_hook import BACKEND

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "tiny_sentiment.jsonl"
SOURCES = ["pyproject.toml", "setup.py", "README.md", "adainfer_lmeval", "policies", "tasks"]
HOOK_PTH = "adainfer_lmeval_hook.pth"


def _run(command, cwd, timeout=300, env=None):
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"{command[:4]}...: {done.stdout[-1500:]}\n{done.stderr[-3000:]}"
    return done


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    """The wheel built from a copy of the sources (the shared checkout is left alone), with the
    run-time link tasks/_lm_eval_tasks present in the copy as it is in a used checkout."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "_lm_eval_tasks", "._lm_eval_tasks.*")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    import lm_eval

    (src / "tasks" / "_lm_eval_tasks").symlink_to(Path(lm_eval.__file__).parent / "tasks", target_is_directory=True)
    dist = root / "dist"
    done = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                 "-w", str(dist), str(src)], cwd=root, env=_clean_env())
    (built,) = dist.glob("adainfer_lmeval-*.whl")
    return built, done.stdout + done.stderr


@pytest.fixture(scope="module")
def fresh_env(wheel, tmp_path_factory) -> dict:
    """A new virtual environment outside the checkout with the wheel installed by pip; the
    dependencies come from this environment's site-packages through a plain path .pth (its own
    .pth files, e.g. the checkout's editable finder, are not run there)."""
    root = tmp_path_factory.mktemp("fresh")
    _run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], cwd=root)
    python = root / "venv" / "bin" / "python"
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=root).stdout.strip())
    (purelib / "zz_adainfer_test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", str(wheel[0])],
         cwd=root, env=_clean_env())
    return {"python": python, "purelib": purelib, "cwd": root}


def test_the_wheel_ships_the_policies_the_tasks_and_the_hook(wheel):
    path, log = wheel
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        hook = archive.read(HOOK_PTH).decode()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points = archive.read(entry_points).decode()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(metadata).decode()
    for policies in (ROOT / "policies").iterdir():
        if policies.is_dir():
            assert f"adainfer_lmeval/_policies/{policies.name}/svm.json" in names
    shipped_tasks = {str(p.relative_to(ROOT / "tasks")) for p in (ROOT / "tasks").rglob("*.yaml")
                     if "_lm_eval_tasks" not in p.parts}
    in_wheel = {n.split("adainfer_lmeval/_tasks/", 1)[1] for n in names if n.startswith("adainfer_lmeval/_tasks/")}
    assert shipped_tasks and shipped_tasks <= in_wheel
    assert not [n for n in names if "_lm_eval_tasks" in n or "__pycache__" in n]  # the link stays out
    assert hook.startswith("import adainfer_lmeval.adapter.startup_hook")
    assert f"adainfer = {BACKEND}" in entry_points.split("[lm_eval.models]", 1)[1]
    assert "License-Expression: Apache-2.0" in metadata
    assert "Requires-Dist: torch>=" in metadata and "torch==" not in metadata  # a user's GPU torch stays
    assert "Deprecat" not in log and "absent from the `packages` configuration" not in log


def test_the_installed_copy_finds_its_own_policies_and_tasks(fresh_env):
    script = r"""
import dataclasses, json, sys
hooked = "adainfer_lmeval.adapter.startup_hook" in sys.modules  # run by the .pth at start-up
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "lm_eval", "transformers", "numpy"))
import adainfer_lmeval
from adainfer_lmeval.policies.files import read_policy_json, shipped_path
from adainfer_lmeval.policies import learned as learned_policies  # registers policy=svm
from adainfer_lmeval.paths import tasks_dir
from adainfer_lmeval.policies import ModelIdentity, build_policy
from lm_eval.tasks import TaskManager

meta = read_policy_json(shipped_path("smollm2-135m", "svm"))
policy = build_policy("svm", {})  # policy=svm: the file shipped for the model it binds to
policy.bind(ModelIdentity(**{f.name: meta["model"][f.name] for f in dataclasses.fields(ModelIdentity)}))
manager = TaskManager(include_path=str(tasks_dir()), include_defaults=False)
entry = manager.task_index["sst2"]
print(json.dumps({"hooked": hooked, "heavy": heavy, "package": adainfer_lmeval.__file__,
                  "policy": policy.describe()["file"], "tasks": str(tasks_dir()), "sst2": str(entry.yaml_path),
                  "sst2_config": {k: entry.cfg.get(k) for k in ("dataset_path", "training_split")}}))
"""
    done = _run([str(fresh_env["python"]), "-c", script], cwd=fresh_env["cwd"], env=_clean_env())
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["hooked"] and found["heavy"] == []  # the hook costs no torch or lm-eval import
    install = fresh_env["purelib"].resolve()
    for key in ("package", "policy", "tasks", "sst2"):
        assert Path(found[key]).resolve().is_relative_to(install), (key, found[key])
        assert not Path(found[key]).resolve().is_relative_to(ROOT), (key, found[key])
    assert Path(found["policy"]).name == "svm.json" and Path(found["policy"]).parent.name == "smollm2-135m"
    # tasks/sst2 includes lm-eval's own YAML through the link made beside the installed copy
    assert found["sst2_config"] == {"dataset_path": "nyu-mll/glue", "training_split": None}


def test_lm_evals_own_command_runs_the_adainfer_model(fresh_env, tiny_model_dirs, tmp_path):
    """lm-eval's console script, run by the fresh environment's interpreter: nothing but the
    installed .pth tells lm-eval 0.4.13 about --model adainfer."""
    console_script = Path(sys.executable).with_name("lm_eval")
    assert console_script.is_file()
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    task = {
        "task": "tiny_sentiment", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(FIXTURE)}},
        "test_split": "test", "output_type": "multiple_choice",
        "doc_to_text": "{{text}} . question : positive or negative ? answer :", "doc_to_target": "label",
        "doc_to_choice": ["negative", "positive"],
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    (task_dir / "tiny_sentiment.yaml").write_text(json.dumps(task))  # JSON is YAML
    out = tmp_path / "out"
    command = [
        str(fresh_env["python"]), str(console_script), "--model", "adainfer",
        "--model_args", f"pretrained={tiny_model_dirs['llama']},policy=threshold,gap=0.9",
        "--tasks", "tiny_sentiment", "--include_path", str(task_dir), "--device", "cpu",
        "--limit", "4", "--output_path", str(out),
    ]
    done = _run(command, cwd=fresh_env["cwd"], timeout=600, env=_clean_env())
    assert "layers_saved_pct" in done.stdout  # lm-eval's own table
    (result_file,) = out.rglob("results_*.json")
    saved = json.loads(result_file.read_text())
    row = saved["results"]["tiny_sentiment"]
    assert 0.0 <= row["layers_saved_pct,none"] <= 100.0
    assert saved["adainfer"]["tasks"]["tiny_sentiment"]["requests"] == 8  # 4 documents x 2 choices
    assert saved["adainfer"]["num_layers"] == 4


def test_importing_the_package_registers_adainfer_lazily():
    script = r"""
import sys
import adainfer_lmeval, adainfer_lmeval.core.features
assert "lm_eval" not in sys.modules, "import adainfer_lmeval imported lm-eval"
import lm_eval.api.registry as registry
assert "adainfer" not in registry.model_registry  # lm-eval has not filled its registry yet
registry.get_model("hf")  # still fills it with lm-eval's own models
assert registry.model_registry._objs["adainfer"] == adainfer_lmeval.adapter.startup_hook.BACKEND
assert "adainfer_lmeval.adapter.backend" not in sys.modules  # a placeholder until it is asked for
cls = registry.get_model("adainfer")
from adainfer_lmeval.adapter.backend import AdaInferLM
assert cls is AdaInferLM is adainfer_lmeval.AdaInferLM
print("ok")
"""
    done = _run([sys.executable, "-c", script], cwd=ROOT, env=_clean_env())
    assert done.stdout.strip() == "ok"


def test_the_entry_point_names_the_backend_class():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["lm_eval.models"] == {"adainfer": BACKEND}
    module, _, name = BACKEND.partition(":")
    from adainfer_lmeval.adapter.backend import AdaInferLM

    assert (AdaInferLM.__module__, AdaInferLM.__name__) == (module, name)  # lm-eval upgrades the placeholder


def test_two_copies_of_the_start_up_hook_do_not_ask_each_other(tmp_path, monkeypatch):
    """An editable install beside another checkout on PYTHONPATH puts two copies' finders in
    sys.meta_path: importing a watched module must load it once and run a callback, not recurse."""
    import importlib.util
    import sys

    from adainfer_lmeval.adapter import startup_hook

    spec = importlib.util.spec_from_file_location("adainfer_lmeval_copy.startup_hook", startup_hook.__file__)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    (tmp_path / "watched_by_two.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    ours = startup_hook._AfterImport({"watched_by_two": lambda module: seen.append(("ours", module.VALUE))})
    theirs = copy._AfterImport({"watched_by_two": lambda module: seen.append(("theirs", module.VALUE))})
    monkeypatch.setattr(sys, "meta_path", [theirs, ours, *sys.meta_path])
    monkeypatch.delitem(sys.modules, "watched_by_two", raising=False)
    import watched_by_two  # noqa: F401

    assert seen == [("theirs", 1)]  # the first finder's callback ran on the loaded module
