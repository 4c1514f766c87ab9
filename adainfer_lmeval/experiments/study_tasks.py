"""The study's tasks and documents: which split serves training and test, and the collections.

A study task is an lm-eval task at a few-shot count (:class:`StudyTask`). Per model and task the
study collects ``N`` training documents from the task's *train split* (``arc_easy_train``, ...)
and ``N`` test documents from the split lm-eval evaluates. SST-2 has no train split offline: its
validation set is split once into two halves by a seeded hash of the document id
(:func:`sst2_half`); training documents come from one half, test documents from the other.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adainfer_lmeval.errors import AdaInferError

# lm-eval task evaluated -> the task that runs the same prompts on its train split
TRAIN_TASKS = {
    "arc_easy": "arc_easy_train", "arc_challenge": "arc_challenge_train", "boolq": "boolq_train",
    "commonsense_qa": "commonsense_qa_train", "openbookqa": "openbookqa_train", "piqa": "piqa_train",
    "hellaswag": "hellaswag_train", "mmlu": "mmlu_dev_val",  # MMLU: its dev + validation questions (tasks/mmlu_dev_val)
}
SPLIT_ON_VALIDATION = ("sst2",)  # no train split offline: split the evaluated set in two halves
ROLES = ("train", "test")
# the small models on the tasks that hold their cells above chance; Qwen-1.5B on MMLU (its
# cost per document is 3x Qwen-0.5B's) and SST-2 4-shot
DEFAULT_STUDY_MODELS = "smollm2-135m:80,qwen2.5-coder-0.5b:40;qwen2.5-coder-1.5b:150"
DEFAULT_STUDY_TASKS = "sst2:x2.5,sst2@4:x2.5,arc_easy,piqa;mmlu,sst2@4:100"


@dataclass(frozen=True)
class StudyTask:
    """``name[@shots][:docs]``: an lm-eval task evaluated with ``shots`` few-shot examples.

    ``docs`` overrides the model's documents per role for this task: a count (``:200``) or a
    factor of the model's count (``:x2.5``); cheap tasks can have more.
    """

    name: str
    shots: int = 0
    docs: int | None = None
    docs_factor: float | None = None

    def n_docs(self, model_docs: int) -> int:
        if self.docs is not None:
            return self.docs
        return int(round(model_docs * self.docs_factor)) if self.docs_factor is not None else model_docs

    @classmethod
    def parse(cls, text: str) -> "StudyTask":
        head, _, docs = text.strip().partition(":")
        name, _, shots = head.partition("@")
        if name not in TRAIN_TASKS and name not in SPLIT_ON_VALIDATION:
            known = ", ".join(sorted([*TRAIN_TASKS, *SPLIT_ON_VALIDATION]))
            raise AdaInferError(f"task {name!r} has no training documents offline; study tasks: {known}")
        try:
            factor = float(docs[1:]) if docs.startswith("x") else None
            return cls(name, int(shots) if shots else 0, int(docs) if docs and factor is None else None, factor)
        except ValueError:
            raise AdaInferError(f"bad task spec {text!r}: use name[@shots][:docs], e.g. sst2@4:200") from None

    @property
    def label(self) -> str:
        return f"{self.name}@{self.shots}"

    def source(self, role: str) -> str:
        """The lm-eval task whose documents serve ``role`` (train / test)."""
        if role == "train" and self.name in TRAIN_TASKS:
            return TRAIN_TASKS[self.name]
        return self.name


def sst2_half(doc_id: int, seed: int = 0) -> str:
    """``train`` or ``test``: a fixed, seeded split of a validation set without a train split."""
    return "train" if int(hashlib.sha256(f"study-split:{seed}:{doc_id}".encode()).hexdigest()[:8], 16) % 2 == 0 else "test"


def doc_filter_for(task: StudyTask, role: str, seed: int = 0):
    """The documents ``role`` may draw from: one half for split tasks, all otherwise."""
    if task.name not in SPLIT_ON_VALIDATION:
        return None
    return lambda _name, doc_id: sst2_half(doc_id, seed) == role


@dataclass(frozen=True)
class StudyModel:
    """A model of the study: its documents per task and role (before a task's own ``:docs``)
    and the tasks it runs."""

    name: str
    docs: int
    tasks: tuple[StudyTask, ...]


def parse_plan(models: str, tasks: str) -> list[StudyModel]:
    """The study's models and their tasks from ``--models`` / ``--tasks``.

    Both may hold ``;``-separated groups: the i-th group of models runs the i-th group of tasks
    (so that a larger model can run only the tasks it is worth its CPU time on); one task group
    serves every model group.
    """
    model_groups, task_groups = models.split(";"), tasks.split(";")
    if len(task_groups) not in (1, len(model_groups)):
        raise AdaInferError(f"--models has {len(model_groups)} ';'-separated groups but --tasks has {len(task_groups)}: "
                            "give one task group per model group, or one for all")
    plan = []
    for i, group in enumerate(model_groups):
        study_tasks = tuple(StudyTask.parse(t) for t in task_groups[i if len(task_groups) > 1 else 0].split(",") if t.strip())
        for item in [t.strip() for t in group.split(",") if t.strip()]:
            name, _, docs = item.partition(":")
            try:
                plan.append(StudyModel(name, int(docs) if docs else 60, study_tasks))
            except ValueError:
                raise AdaInferError(f"bad model spec {item!r}: use name or name:docs, e.g. smollm2-135m:80") from None
    names = [m.name for m in plan]
    if len(set(names)) != len(names):
        raise AdaInferError(f"--models names a model twice ({', '.join(names)}): give each model once, with all its tasks")
    return plan


def collection_path(root: Path, model: str, task: StudyTask, role: str) -> Path:
    return root / model / f"{task.label}-{role}.parquet"


def _needs_collecting(path: Path, n_docs: int, seed: int, log) -> bool:
    """Whether ``path`` is missing or was collected with another schema or other settings."""
    from adainfer_lmeval.experiments.collect import SCHEMA_VERSION, read_metadata

    if not path.exists():
        return True
    meta = read_metadata(path)
    if meta.get("schema_version") != SCHEMA_VERSION:
        log(f"  {path}: collected with schema {meta.get('schema_version')}, this version reads {SCHEMA_VERSION}; collecting again")
        return True
    study = meta.get("study", {})
    if study.get("docs") == n_docs and study.get("seed") == seed:
        return False
    log(f"  {path}: collected with other settings ({study}); collecting again")
    return True


def collect_all(plan: list[StudyModel], root: Path, seed: int = 0, log=print, continuation: bool = True) -> None:
    """Collect every (model, task, role) file that is missing or stale (one model load per model)
    and, with ``continuation``, the continuation read-out beside each that lacks a current one."""
    from adainfer_lmeval.adapter.backend import AdaInferLM
    from adainfer_lmeval.experiments.collect import collect, read_metadata
    from adainfer_lmeval.experiments.collect_continuation import collect_continuation, continuation_is_current, continuation_path

    for study_model in plan:
        model = study_model.name
        every = [(task, role, collection_path(root, model, task, role), task.n_docs(study_model.docs))
                 for task in study_model.tasks for role in ROLES]
        todo = [item for item in every if _needs_collecting(item[2], item[3], seed, log)]
        stale = {item[2] for item in todo}
        readouts = [path for _, _, path, _ in every if continuation
                    and (path in stale or not continuation_is_current(continuation_path(path), read_metadata(path)))]
        if not todo and not readouts:
            continue
        lm = AdaInferLM(pretrained=model, policy="full", batch_size=1, device="cpu")
        for task, role, path, n_docs in todo:
            t0 = time.time()
            split = ("seeded half of validation (sst2_half)" if task.name in SPLIT_ON_VALIDATION else
                     "train split" if role == "train" else "lm-eval's evaluation split")
            meta = collect(
                model, [task.source(role)], [task.shots], n_docs, path, seed=seed, lm=lm,
                doc_filter=doc_filter_for(task, role, seed), quiet=True,
                extra_meta={"study": {"task": task.label, "role": role, "docs": n_docs, "seed": seed, "split": split}},
            )
            log(f"  collected {model} {task.label} {role}: {sum(p['docs'] for p in meta['parts'])} docs "
                f"from {task.source(role)} in {time.time() - t0:.0f}s -> {path}")
        for path in readouts:
            written = collect_continuation(lm, path)
            log(f"  collected the continuation read-out of {path}: {written['docs']} docs in {written['seconds']:.0f}s "
                f"({written['seconds_per_doc']:.2f}s per document) -> {continuation_path(path)}")
        del lm


def load_collection(path: Path):
    """One collected file as ``training_data.Data``, with its continuation read-out where a current
    one was collected beside it."""
    from adainfer_lmeval.experiments.collect_continuation import continuation_is_current, continuation_path
    from adainfer_lmeval.experiments.training_data import load_data, with_continuation

    data = load_data(path)
    if continuation_is_current(continuation_path(path), data.meta):
        data = with_continuation(data, path)
    return data


def load_collections(root: Path, plan: list[StudyModel]) -> dict:
    """{(model, task label, role): training_data.Data} for every collected file, with its
    continuation read-out where one was collected for it."""
    out = {}
    for study_model in plan:
        for task in study_model.tasks:
            for role in ROLES:
                path = collection_path(root, study_model.name, task, role)
                if not path.exists():
                    raise AdaInferError(f"{path} is missing: run the study without --skip-collect (or with --collect-only) first")
                out[(study_model.name, task.label, role)] = load_collection(path)
    return out


def training_sets(collections: dict, plan: list[StudyModel], seed: int = 0) -> dict:
    """{(model, task label, setting): Data} for intra-task and inter-task training.

    Inter-task pools the training documents of every task with another name (``sst2@0`` and
    ``sst2@4`` are one task: neither trains the other's inter-task policy), the same number from
    each (the smallest task's count, a seeded sample), so that no task dominates the pool.
    """
    from adainfer_lmeval.experiments.training_data import Data

    out = {}
    for study_model in plan:
        model, tasks = study_model.name, study_model.tasks
        trains = {task.label: collections[(model, task.label, "train")] for task in tasks}
        cap = min(len(d.keys) for d in trains.values())
        rng = np.random.default_rng(seed)
        capped = {label: d if len(d.keys) == cap else d.subset(np.sort(rng.choice(len(d.keys), cap, replace=False)))
                  for label, d in trains.items()}
        for task in tasks:
            out[(model, task.label, "intra")] = trains[task.label]
            others = [capped[o.label] for o in tasks if o.name != task.name]
            if others:
                out[(model, task.label, "inter-task")] = Data.concat(others)
    return out
