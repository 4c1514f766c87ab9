"""AdaInfer's learned stop classifiers (SVM and CRF) as exit policies, and their safe files.

``policy=svm`` / ``policy=crf`` load the policy shipped for the running model
(``policies/<model short name>/svm.json`` or ``crf.json``, chosen in :meth:`bind` from
:attr:`ModelIdentity.name`); ``policy=file,path=P`` (or ``policy=P`` where ``P`` ends in
``.json`` or contains ``/``) loads any policy file.

File formats (text only; nothing is ever unpickled):

* SVM: one JSON file with the feature list, the standardisation (mean, scale), the linear
  coefficients and intercept, and the operating point (``threshold`` on the decision value,
  ``min_layer``).
* CRF: a JSON metadata file plus the crfsuite model file it names (``crfsuite_file``, next
  to it) with its sha256; the crfsuite file is checked (size, magic, hash) before crfsuite
  opens it. The operating point is a threshold on the CRF's marginal P(stop at layer l)
  computed on the *prefix* sequence of layers 1..l, so a decision never reads later layers.

Both carry metadata: the model (name, type, layers, hidden size, vocab), the label mode,
training tasks, shots, data hashes, package versions and validation figures. Loading refuses,
in one line (:class:`AdaInferError`), a pickle, a corrupt or foreign file, and a policy whose
model does not match the running one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
from pathlib import Path

import torch

from .errors import AdaInferError
from .features import FEATURE_NAMES
from .policies import ExitPolicy, ModelIdentity, register_policy

log = logging.getLogger(__name__)

FORMAT = "adainfer-exit-policy"
FORMAT_VERSION = 1
KINDS = ("svm", "crf")
MAX_FILE_BYTES = 1_000_000
CRF_MAGIC = b"lCRF"
STOP, GO = "stop", "go"


def policies_dir() -> Path:
    """The shipped policies: ``$ADAINFER_POLICIES`` or the repository's ``policies/``."""
    explicit = os.environ.get("ADAINFER_POLICIES")
    return Path(explicit) if explicit else Path(__file__).resolve().parent.parent / "policies"


def shipped_path(model_name: str, kind: str) -> Path:
    return policies_dir() / model_name / f"{kind}.json"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- reading files safely ---------------------------------------------------------------------


def _looks_like_pickle(data: bytes) -> bool:
    if data[:1] == b"\x80" and len(data) > 1 and data[1:2] in bytes(range(2, 6)):
        return True  # pickle protocol 2..5 header
    if data[:2] == b"PK":  # zip: torch.save / joblib-in-zip archives hold pickles
        return True
    return data[:1] in (b"(", b"]", b"}", b"c") and data.rstrip().endswith(b".")  # protocol 0/1


def read_policy_json(path: str | Path) -> dict:
    """The policy metadata at ``path``: checked to be a small JSON policy file, never unpickled."""
    path = Path(path)
    if path.suffix.lower() in (".pkl", ".pickle", ".joblib", ".pt", ".bin", ".sav"):
        raise AdaInferError(f"{path}: refusing a {path.suffix} file (pickles are never loaded); policy files are JSON")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise AdaInferError(f"policy file {path} does not exist") from None
    if size > MAX_FILE_BYTES:
        raise AdaInferError(f"{path}: {size} bytes is too large for a policy file (limit {MAX_FILE_BYTES})")
    data = path.read_bytes()
    if _looks_like_pickle(data):
        raise AdaInferError(f"{path}: this is a pickle/zip archive, not a JSON policy file; refusing to unpickle it")
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdaInferError(f"{path}: corrupt policy file (not valid JSON: {str(error).splitlines()[0]})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdaInferError(f"{path}: not an adainfer exit-policy file (missing \"format\": \"{FORMAT}\")")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdaInferError(f"{path}: policy format version {meta.get('format_version')!r} is not supported (need {FORMAT_VERSION})")
    if meta.get("kind") not in KINDS:
        raise AdaInferError(f"{path}: unknown policy kind {meta.get('kind')!r}; known: {', '.join(KINDS)}")
    _check_fields(path, meta)
    return meta


def _number(path, meta, key):
    value = meta.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise AdaInferError(f"{path}: corrupt policy file ({key!r} must be a finite number, got {value!r})")
    return float(value)


def _vector(path, meta, key, n):
    value = meta.get(key)
    if not isinstance(value, list) or len(value) != n or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    ):
        raise AdaInferError(f"{path}: corrupt policy file ({key!r} must be {n} finite numbers)")
    return [float(v) for v in value]


def _check_fields(path: Path, meta: dict) -> None:
    model = meta.get("model")
    if not isinstance(model, dict) or not all(k in model for k in ("name", "num_layers", "hidden_size")):
        raise AdaInferError(f"{path}: corrupt policy file (\"model\" must name name, num_layers, hidden_size)")
    feats = meta.get("features")
    if not isinstance(feats, list) or not feats or any(f not in FEATURE_NAMES for f in feats):
        raise AdaInferError(f"{path}: corrupt policy file (\"features\" must be a non-empty subset of {', '.join(FEATURE_NAMES)})")
    n = len(feats)
    scaler = meta.get("scaler")
    if not isinstance(scaler, dict):
        raise AdaInferError(f"{path}: corrupt policy file (missing \"scaler\")")
    _vector(path, scaler, "mean", n)
    scale = _vector(path, scaler, "scale", n)
    if any(s <= 0 for s in scale):
        raise AdaInferError(f"{path}: corrupt policy file (scaler scale must be positive)")
    _number(path, meta, "threshold")
    min_layer = meta.get("min_layer")
    if not isinstance(min_layer, int) or isinstance(min_layer, bool) or min_layer < 1:
        raise AdaInferError(f"{path}: corrupt policy file (\"min_layer\" must be an integer >= 1)")
    if meta["kind"] == "svm":
        _vector(path, meta, "coef", n)
        _number(path, meta, "intercept")
    else:
        name = meta.get("crfsuite_file")
        if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
            raise AdaInferError(f"{path}: corrupt policy file (\"crfsuite_file\" must be a file name next to it)")
        if not isinstance(meta.get("crfsuite_sha256"), str):
            raise AdaInferError(f"{path}: corrupt policy file (missing \"crfsuite_sha256\")")


def read_crfsuite_bytes(json_path: Path, meta: dict) -> bytes:
    """The CRF model bytes, checked (size, magic, sha256) before crfsuite may parse them."""
    model_path = Path(json_path).parent / meta["crfsuite_file"]
    try:
        data = model_path.read_bytes()
    except FileNotFoundError:
        raise AdaInferError(f"{json_path}: its crfsuite model {model_path.name} is missing") from None
    if len(data) > MAX_FILE_BYTES:
        raise AdaInferError(f"{model_path}: too large for a crfsuite policy model ({len(data)} bytes)")
    if _looks_like_pickle(data) and not data.startswith(CRF_MAGIC):
        raise AdaInferError(f"{model_path}: this is a pickle/zip archive, not a crfsuite model; refusing to unpickle it")
    if not data.startswith(CRF_MAGIC):
        raise AdaInferError(f"{model_path}: corrupt crfsuite model (bad magic; expected a file written by crfsuite)")
    if sha256_bytes(data) != meta["crfsuite_sha256"]:
        raise AdaInferError(f"{model_path}: corrupt crfsuite model (sha256 differs from {json_path.name})")
    return data


def check_fits(meta: dict, model: ModelIdentity, source: str) -> None:
    """Refuse (one line) a policy trained for another model; warn if only the name differs."""
    want = meta["model"]
    problems = []
    for key, have in (("num_layers", model.num_layers), ("hidden_size", model.hidden_size),
                      ("vocab_size", model.vocab_size), ("model_type", model.model_type)):
        if key in want and want[key] != have:
            problems.append(f"{key} {want[key]} != {have}")
    if problems:
        raise AdaInferError(
            f"{source} was trained for {want['name']} ({want.get('num_layers')} layers, hidden {want.get('hidden_size')}) "
            f"and does not fit the running model {model.name} ({'; '.join(problems)})"
        )
    if want["name"] != model.name:
        log.warning("%s was trained for %s; running it on %s (same shape)", source, want["name"], model.name)
    if meta["min_layer"] >= model.num_layers:
        raise AdaInferError(f"{source}: min_layer {meta['min_layer']} is not below the model's {model.num_layers} layers")


# ---- the classifiers (numpy/torch only; shared by the policies and by training) ---------------


def standardize(meta: dict, x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(meta["scaler"]["mean"], dtype=torch.float64)
    scale = torch.tensor(meta["scaler"]["scale"], dtype=torch.float64)
    return (x.double().cpu() - mean) / scale


def svm_scores(meta: dict, x: torch.Tensor) -> torch.Tensor:
    """Decision values [.., ] of the linear SVM for raw features x [..., F] (policy's order)."""
    coef = torch.tensor(meta["coef"], dtype=torch.float64)
    return standardize(meta, x) @ coef + float(meta["intercept"])


def crf_item(values) -> dict:
    """One layer as crfsuite attributes: standardized feature values and a bias."""
    item = {f"f{i}": float(v) for i, v in enumerate(values)}
    item["bias"] = 1.0
    return item


class CrfScorer:
    """P(stop at the last layer | layers of the prefix), with a crfsuite tagger."""

    def __init__(self, meta: dict, model_bytes: bytes):
        import pycrfsuite

        self.meta = meta
        self.tagger = pycrfsuite.Tagger()
        # crfsuite reads the model from this buffer without copying it: keep it alive.
        self._model_bytes = bytes(model_bytes)
        try:
            self.tagger.open_inmemory(self._model_bytes)
        except Exception as error:  # noqa: BLE001  (crfsuite's own errors are not ours)
            raise AdaInferError(f"corrupt crfsuite model ({type(error).__name__}: {error})") from None
        if STOP not in self.tagger.labels():
            raise AdaInferError(f"crfsuite model has labels {self.tagger.labels()}, expected {STOP!r} and {GO!r}")

    def prefix_stop_prob(self, z_prefix) -> float:
        """``z_prefix``: standardized features of layers seq_start..l (a list of rows)."""
        self.tagger.set([crf_item(v) for v in z_prefix])
        return self.tagger.marginal(STOP, len(z_prefix) - 1)

    def all_prefix_probs(self, z_seq) -> list[float]:
        return [self.prefix_stop_prob(z_seq[: t + 1]) for t in range(len(z_seq))]


# ---- the policies ----------------------------------------------------------------------------


class LearnedPolicy(ExitPolicy):
    """A stop classifier read from a policy file; ``decide`` at layer l reads layers <= l only."""

    kind = ""
    params = {
        "path": (str, "a policy JSON file (default: the one shipped for the loaded model)"),
        "threshold": (float, "override the stored operating point (decision threshold)"),
        "min_layer": (int, "override the stored first layer that may exit"),
    }

    def __init__(self, path: str | None = None, threshold: float | None = None, min_layer: int | None = None):
        self.path = Path(path) if path else None
        self._threshold_override = threshold
        self._min_layer_override = min_layer
        self.meta: dict | None = None
        self.features = ()
        self.min_layer = 1 if min_layer is None else int(min_layer)
        if self.path is not None:  # read now: a bad file fails before a model loads
            self._load(self.path)

    def _load(self, path: Path) -> None:
        meta = read_policy_json(path)
        if self.kind and meta["kind"] != self.kind:
            raise AdaInferError(f"{path} holds a {meta['kind']} policy, not {self.kind}; use policy={meta['kind']},path=... or policy={path}")
        self._extra_load(path, meta)
        self.meta = meta
        self.source = str(path)
        self.features = tuple(meta["features"])
        self.threshold = float(meta["threshold"] if self._threshold_override is None else self._threshold_override)
        self.min_layer = int(meta["min_layer"] if self._min_layer_override is None else self._min_layer_override)
        if self.min_layer < 1:
            raise AdaInferError(f"min_layer={self.min_layer} must be >= 1")

    def _extra_load(self, path: Path, meta: dict) -> None:
        pass

    def bind(self, model: ModelIdentity) -> None:
        if self.meta is None:
            path = shipped_path(model.name, self.kind)
            if not path.exists():
                shipped = sorted(p.parent.name for p in policies_dir().glob(f"*/{self.kind}.json"))
                raise AdaInferError(
                    f"no {self.kind} policy is shipped for model {model.name!r} (shipped for: {', '.join(shipped) or 'none'}); "
                    f"train one with python -m adainfer_lmeval.train --model {model.name}, then pass path=..."
                )
            self._load(path)
        check_fits(self.meta, model, self.source)
        super().bind(model)

    def describe(self) -> dict:
        meta = self.meta or {}
        return {
            "name": self.name, "kind": self.kind or meta.get("kind"), "file": getattr(self, "source", None),
            "threshold": getattr(self, "threshold", None), "min_layer": self.min_layer,
            "label": meta.get("label"), "trained_for": (meta.get("model") or {}).get("name"),
            "data_sha256": (meta.get("training") or {}).get("data_sha256"),
        }


@register_policy("svm")
class SvmPolicy(LearnedPolicy):
    """AdaInfer's SVM: stop at the first layer >= min_layer whose decision value >= threshold."""

    kind = "svm"

    def decide(self, layer, num_layers, history):
        x = history[:, layer, :]  # this layer's features only
        stop = svm_scores(self.meta, x) >= self.threshold
        if layer < self.min_layer:
            stop[:] = False
        return stop.to(history.device)


@register_policy("crf")
class CrfPolicy(LearnedPolicy):
    """A linear-chain CRF over layers: stop when P(stop at l | layers seq_start..l) >= threshold."""

    kind = "crf"

    def _extra_load(self, path, meta):
        self.scorer = CrfScorer(meta, read_crfsuite_bytes(path, meta))
        self.seq_start = int(meta.get("seq_start", 1))

    def consults_at(self, layer: int, num_layers: int) -> bool:
        # The chain needs every layer from seq_start on (decisions only from min_layer).
        return min(self.seq_start, self.min_layer) <= layer < num_layers

    def decide(self, layer, num_layers, history):
        rows = history.shape[0]
        stop = torch.zeros(rows, dtype=torch.bool)
        if layer >= self.min_layer and layer >= self.seq_start:
            z = standardize(self.meta, history[:, self.seq_start : layer + 1, :]).tolist()
            for r in range(rows):
                stop[r] = self.scorer.prefix_stop_prob(z[r]) >= self.threshold
        return stop.to(history.device)


@register_policy("file")
class PolicyFile(ExitPolicy):
    """``policy=file,path=P``: whichever learned policy the file holds (svm or crf)."""

    params = LearnedPolicy.params

    def __new__(cls, path: str | None = None, threshold: float | None = None, min_layer: int | None = None):
        if not path:
            raise AdaInferError("policy=file needs path=<policy .json>, e.g. policy=file,path=policies/smollm2-135m/svm.json")
        meta = read_policy_json(path)
        target = SvmPolicy if meta["kind"] == "svm" else CrfPolicy
        return target(path=path, threshold=threshold, min_layer=min_layer)


def is_policy_path(name: str) -> bool:
    """A ``policy=`` value that names a file rather than a registered policy."""
    return "/" in name or os.sep in name or name.lower().endswith(".json")


# ---- `adainfer-eval policy list` --------------------------------------------------------------


def shipped_policies() -> list[tuple[Path, dict | None, str | None]]:
    """(path, metadata or None, error or None) for every shipped policy file."""
    out = []
    for path in sorted(policies_dir().glob("*/*.json")):
        try:
            out.append((path, read_policy_json(path), None))
        except AdaInferError as error:
            out.append((path, None, str(error)))
    return out


def _row(path: Path, meta: dict) -> list[str]:
    val = meta.get("validation") or {}
    tr = meta.get("training") or {}
    model = meta["model"]
    layers = model.get("num_layers")
    shots = ",".join(str(s) for s in tr.get("shots", []))
    acc = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    saved = val.get("layers_saved")
    return [
        model["name"], meta["kind"], f"{(meta.get('label') or {}).get('mode', '?')}/{(meta.get('label') or {}).get('prediction', '?')}",
        f"{len(tr.get('tasks', []))} tasks, {shots}-shot, {tr.get('docs', '?')} examples",
        f"{acc(val.get('full_acc'))} ({acc(val.get('chance_acc'))})", acc(val.get("policy_acc")),
        "-" if saved is None else f"{100 * saved:.1f}% ({val.get('mean_exit_layer', 0):.1f}/{layers})",
        f"thr={meta['threshold']:.3g} min_layer={meta['min_layer']}",
        str(path.relative_to(policies_dir().parent)) if path.is_relative_to(policies_dir().parent) else str(path),
    ]


def main(argv: list[str] | None = None) -> int:
    """``adainfer-eval policy list [--json]`` / ``policy show FILE``."""
    import argparse

    parser = argparse.ArgumentParser(prog="adainfer-eval policy", description="Shipped early-exit stop classifiers.")
    sub = parser.add_subparsers(dest="command", required=True)
    lister = sub.add_parser("list", help="what is shipped, trained on what, validation accuracy and savings")
    lister.add_argument("--json", action="store_true", help="print the metadata as JSON")
    show = sub.add_parser("show", help="check a policy file and print its metadata")
    show.add_argument("file")
    args = parser.parse_args(argv)
    try:
        if args.command == "show":
            print(json.dumps(read_policy_json(args.file), indent=2))
            return 0
        entries = shipped_policies()
        if args.json:
            print(json.dumps([{"file": str(p), "meta": m, "error": e} for p, m, e in entries], indent=2))
            return 0
        header = ["model", "kind", "labels", "trained on", "val full (chance)", "val policy", "layers saved", "operating point", "file"]
        rows = [_row(p, m) for p, m, e in entries if m is not None]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        print("  ".join("-" * w for w in widths))
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        for p, _, e in entries:
            if e is not None:
                print(f"BROKEN {p}: {e}")
        if not entries:
            print(f"(no policies under {policies_dir()})")
        print("val: held-out training documents (accuracy = lm-eval acc; savings mean something only above chance)")
        return 0
    except AdaInferError as error:
        print(f"adainfer-eval policy: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
