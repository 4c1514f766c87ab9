"""Run files: where each run of a suite lives, what identifies it, and which are done.

Each (model, task, policy) run is written to ``<out>/runs/<model>/<task>/<policy>.json`` as
soon as it finishes (atomically: a killed run never leaves a file that looks complete): lm-eval's
results, the ``adainfer`` statistics, and compact samples (log-probs, target and exit layers per
document). A run whose file holds the same settings is not run again. The settings are
everything that changes a result: model, task, shots, limit, policy, batch size, device, dtype,
the suite's model args and the sha256 of the policy file a learned policy reads (``svm``
resolves to the shipped file of the model), so editing any of them runs that run again. Names
that would slug to the same file (``a_b/svm.json`` and ``a/b/svm.json``) get a short hash of
the exact name, so no run overwrites another. :func:`migrate_legacy_runs` upgrades run files
written before the settings carried device, dtype, model args and the policy hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.experiments.suite_file import Suite, SuiteTask
from adainfer_lmeval.reporting.comparison import FULL, ORACLE

KEY_VERSION = 2  # settings that carry device, dtype, model_args and policy_sha256
LEGACY_FIELDS = ("model", "task", "policy", "limit", "num_fewshot", "batch_size")

_CLEAN_POLICY = re.compile(r"[A-Za-z0-9_.]+(,[A-Za-z0-9_.]+=[A-Za-z0-9_.]+)*")
_CLEAN_MODEL = re.compile(r"[A-Za-z0-9_.-]+")


def policy_slug(policy: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", policy).strip("_") or FULL


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _component(text: str, clean: bool) -> str:
    """A file-name part: the slug, plus a hash of the exact text where the slug may lose it
    (paths: ``a_b/svm.json`` and ``a/b/svm.json`` slug alike)."""
    return policy_slug(text) if clean else f"{policy_slug(text)}-{_short_hash(text)}"


def run_path(out: Path, model: str, task: SuiteTask, policy: str, exact: bool = False) -> Path:
    """``exact``: hash both names even where the slug is clean (two runs of a suite collided)."""
    shots = "default" if task.num_fewshot is None else task.num_fewshot
    limit = "all" if task.limit is None else f"{task.limit:g}"
    model_part = _component(model, not exact and bool(_CLEAN_MODEL.fullmatch(model)))
    policy_part = _component(policy, not exact and bool(_CLEAN_POLICY.fullmatch(policy)))
    return out / "runs" / model_part / f"{task.name}-{shots}shot-limit{limit}" / f"{policy_part}.json"


def model_short_name(model: str) -> str:
    """The name a learned policy is looked up by (ModelIdentity.name: the folder's last part)."""
    from adainfer_lmeval.offline.models.table import lookup

    spec = lookup(model)
    return spec.name if spec is not None and not os.path.isdir(model) else model.rstrip("/").split("/")[-1]


def policy_file(model: str, name: str, args: dict) -> Path | None:
    """The policy file a run reads (``svm`` -> the model's shipped svm.json); None for rule policies."""
    from adainfer_lmeval.policies.learned.base import LearnedPolicy
    from adainfer_lmeval.policies.files import shipped_path
    from adainfer_lmeval.policies import registered_policies

    if name in (FULL, ORACLE):
        return None
    if args.get("path"):
        return Path(str(args["path"]))
    cls = registered_policies().get(name)
    if cls is None and ("/" in name or os.sep in name or name.lower().endswith(".json")):
        return Path(name)
    if isinstance(cls, type) and issubclass(cls, LearnedPolicy) and cls.kind:
        return shipped_path(model_short_name(model), cls.kind)
    return None


def policy_file_sha256(path: Path | None) -> str | None:
    """sha256 of a policy file's bytes (and of the crfsuite model a CRF file names)."""
    from adainfer_lmeval.policies.files import MAX_FILE_BYTES

    if path is None:
        return None
    try:  # only what the policy loader would read: a regular file of policy size (a FIFO would block)
        data = path.read_bytes() if path.is_file() and path.stat().st_size <= MAX_FILE_BYTES else None
    except OSError:
        data = None
    if data is None:
        return "unreadable"  # the run refuses the file itself; the key must still differ from a good one
    digest = hashlib.sha256(data)
    try:
        crf = json.loads(data).get("crfsuite_file")
    except (ValueError, AttributeError):
        crf = None
    if isinstance(crf, str) and "/" not in crf:
        model = path.parent / crf
        try:
            ok = model.is_file() and model.stat().st_size <= MAX_FILE_BYTES
            digest.update(model.read_bytes() if ok else b"unreadable")
        except OSError:
            digest.update(b"unreadable")
    return digest.hexdigest()


def run_settings(suite: Suite, model: str, task: SuiteTask, policy: str) -> dict:
    """Everything that changes a run's result: equal settings are the same run."""
    name, args = suite.policy_args(policy)
    settings = {
        "model": model, "task": task.name, "policy": policy, "limit": task.limit, "num_fewshot": task.num_fewshot,
        "batch_size": suite.batch_size, "device": suite.device, "dtype": suite.dtype,
        "model_args": suite.extra_model_args, "policy_sha256": policy_file_sha256(policy_file(model, name, args)),
        "key_version": KEY_VERSION,
    }
    return json.loads(json.dumps(settings))  # as it reads back from a file


@dataclass
class PlannedRun:
    model: str
    task: SuiteTask
    policy: str
    path: Path
    settings: dict
    status: str  # "done", "new", "changed: <fields>", "legacy" (written before KEY_VERSION)
    index: int = 0  # 1-based, for progress lines

    @property
    def done(self) -> bool:
        return self.status == "done"


def _stored_settings(path: Path) -> dict | None:
    try:
        settings = json.loads(path.read_text()).get("settings")
    except (OSError, ValueError, AttributeError):
        return None  # unreadable: run again (the atomic write means it was never ours complete)
    return settings if isinstance(settings, dict) else None


def _status(stored: dict | None, settings: dict) -> str:
    if stored is None:
        return "new"
    if stored == settings:
        return "done"
    if "key_version" not in stored:
        return "legacy"
    changed = [k for k in settings if stored.get(k) != settings[k]]
    return f"changed: {', '.join(changed)}"


def plan_suite(suite: Suite, out: Path) -> list[PlannedRun]:
    """Every run of the suite, its file and whether it is done; loads no model."""
    wanted = [(m, t, p) for m in suite.models for t in suite.tasks[m] for p in [FULL, *suite.policies[m]]]
    paths = {w: run_path(out, *w) for w in wanted}
    by_path: dict[Path, list] = {}
    for w, p in paths.items():
        by_path.setdefault(p, []).append(w)
    plan = []
    for model, task, policy in wanted:
        path = paths[(model, task, policy)]
        settings = run_settings(suite, model, task, policy)
        stored = _stored_settings(path) if path.exists() else None
        foreign = stored is not None and (stored.get("model"), stored.get("policy")) != (model, policy)
        if len(by_path[path]) > 1 or foreign:  # another run's slug: keep both, under exact names
            path = run_path(out, model, task, policy, exact=True)
            stored = _stored_settings(path) if path.exists() else None
        plan.append(PlannedRun(model, task, policy, path, settings, _status(stored, settings), len(plan) + 1))
    return plan


def write_run_file(path: Path, record: dict) -> None:
    """Write atomically: a temporary file beside it, renamed over it; never a half-written run file."""
    from adainfer_lmeval.adapter.harness import json_default

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # not *.json: never read as a run
    try:
        with open(tmp, "w") as fh:
            fh.write(json.dumps(record, indent=1, default=json_default))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def migrate_legacy_runs(suite: Suite, out: Path, log=print) -> tuple[int, int]:
    """Upgrade run files written before the settings carried device, dtype, model args and policy hash.

    A legacy file is taken as this suite's run when its stored fields (model, task, policy, limit,
    shots, batch size) equal the suite's and, for a learned policy, the policy it describes (trained
    for, training data hash, label, operating point) is the file the suite would read now; device,
    dtype and model args are the suite's as it stands (older suites had no way to set the latter
    two: loads were float32, model_args were not stored). Returns (migrated, left to run again).
    """
    from adainfer_lmeval.policies.files import read_policy_json

    migrated = left = 0
    for run in plan_suite(suite, out):
        if run.status != "legacy":
            continue
        record = json.loads(run.path.read_text())
        stored = record["settings"]
        reasons = [k for k in LEGACY_FIELDS if stored.get(k) != run.settings[k]]
        name, args = suite.policy_args(run.policy)
        source = policy_file(run.model, name, args)
        if source is not None and not reasons:
            described = (record.get("adainfer") or {}).get("policy") or {}
            try:
                meta = read_policy_json(source)
            except AdaInferError as error:
                reasons.append(f"policy file unreadable ({error})")
            else:
                now = {"trained_for": meta["model"]["name"], "label": meta.get("label"),
                       "data_sha256": (meta.get("training") or {}).get("data_sha256"),
                       "threshold": float(args.get("threshold", meta["threshold"])),
                       "min_layer": int(args.get("min_layer", meta["min_layer"]))}
                reasons += [f"policy {k}" for k, v in now.items() if described.get(k) != v]
        if reasons:
            left += 1
            log(f"[suite] not migrated (runs again): {run.path} ({', '.join(reasons)} differ)")
            continue
        record["settings"] = run.settings
        write_run_file(run.path, record)
        migrated += 1
    return migrated, left

