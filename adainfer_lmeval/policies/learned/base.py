"""What every learned kind shares: the estimator base class, the kind registry, the policy wrapper.

A kind is a :class:`LearnedKind` subclass in the scikit-learn style: ``fit(X, y)`` on layer
sequences, ``decision_function(X)`` (torch in, torch out, a batch of rows), plain parameters
(``to_dict`` / ``from_dict`` of its JSON payload, ``files`` for what sits next to the JSON).
:func:`register_kind` puts it in :data:`LEARNED_KINDS` (what training, the study and
``policy=file`` look kinds up in) and, unless the kind brings its own exit policy (the margin's
is the ``policy=margin`` rule), makes ``policy=<kind>`` one.

:class:`LearnedPolicy` is the wrapper of the classifier kinds: it loads
``policies/<model>/<kind>.json`` (or ``path=``) through :mod:`adainfer_lmeval.policies.files`,
checks that it fits the running model, and applies the operating point: stop at the first layer
l >= ``min_layer`` whose score reaches ``threshold``. A score at layer l reads layers <= l only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from adainfer_lmeval.policies import files as pf
from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.policies import ExitPolicy, ModelIdentity, register_policy

LEARNED_KINDS: dict[str, type["LearnedKind"]] = {}
#: signals measured against the previous consulted layer (NaN at the first). Training reads them
#: against the layer before, so a policy reading them consults one layer before its first decision.
CHANGE_SIGNALS = ("option_change", "option_kl")


def register_kind(name: str, policy: type[ExitPolicy] | None = None):
    """Class decorator: a learned kind ``name``, found by training and ``policy=file``.

    Its files load as ``policy`` when given (an exit policy class taking ``path``, ``threshold``
    and ``min_layer``, under no policy name of its own); otherwise as a :class:`LearnedPolicy`
    registered as ``policy=name``, which without ``path`` binds to the model's shipped file.
    """

    def wrap(cls):
        cls.kind = name
        LEARNED_KINDS[name] = cls
        if policy is not None:
            cls.policy = policy
            return cls
        wrapper = type(f"{cls.__name__.removesuffix('Kind')}Policy", (LearnedPolicy,), {"kind": name, "__doc__": cls.__doc__})
        wrapper.__module__ = cls.__module__
        cls.policy = register_policy(name)(wrapper)
        return cls

    return wrap


def learned_kind(name: str) -> type["LearnedKind"]:
    if name not in LEARNED_KINDS:
        raise AdaInferError(f"unknown policy kind {name!r}; known: {', '.join(LEARNED_KINDS)}")
    return LEARNED_KINDS[name]


def read_policy(path: str | Path) -> tuple[type["LearnedKind"], dict]:
    """(kind class, metadata) of a policy file, every field checked; nothing is unpickled."""
    meta = pf.read_policy_json(path)
    kind = LEARNED_KINDS.get(meta["kind"])
    if kind is None:
        raise AdaInferError(f"{path}: unknown policy kind {meta['kind']!r}; known: {', '.join(LEARNED_KINDS)}")
    if kind.scaled:
        pf.check_scaler(Path(path), meta)
    kind.check_dict(Path(path), meta)
    return kind, meta


def _standardize(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Standardized features; a missing value (NaN: a change signal with no layer before) sits at the mean."""
    z = (x.to(torch.float64) - mean) / scale
    return z.masked_fill(z.isnan(), 0.0)


class LearnedKind:
    """A stop classifier over per-layer features. ``X``: [rows, layers, features], raw values in
    the policy's feature order; the classifier standardizes them with its scaler (mean, scale).

    A subclass sets how one layer is scored in :meth:`step` (``state`` carries what the score at
    the next layer needs, None at the first layer of a chain) and its parameters.
    """

    kind = ""
    policy: type["LearnedPolicy"]
    #: the first layer a score reads (a chain); None: the score at layer l reads layer l only
    seq_start: int | None = None
    #: what the score is (recorded with the operating point)
    score_meaning = ""
    #: whether the kind standardizes its inputs (its file then holds a "scaler")
    scaled = True
    #: whether ``fit`` learns anything from the labels (if not, scores need no cross-fitting)
    fits_parameters = True
    #: the highest threshold the policy accepts (None: any finite number)
    max_threshold: float | None = None

    def __init__(self, mean=None, scale=None):
        self.mean = None if mean is None else [float(v) for v in mean]
        self.scale = None if scale is None else [float(v) for v in scale]
        self._tensors: dict[torch.device, dict] = {}

    def to_dict(self) -> dict:
        """The JSON payload of the parameters (merged into the policy file's metadata)."""
        return {"scaler": {"mean": list(self.mean), "scale": list(self.scale)}}

    def files(self) -> dict[str, bytes]:
        """Files written next to the JSON: name -> bytes."""
        return {}

    @classmethod
    def check_dict(cls, path: Path, meta: dict) -> None:
        """Refuse (one line) a file whose kind-specific fields are unsound."""

    @classmethod
    def from_dict(cls, meta: dict, path: Path | None = None) -> "LearnedKind":
        raise NotImplementedError

    @classmethod
    def check_files(cls, path: Path, meta: dict) -> None:
        """Check the files the JSON names without starting a process (for listings)."""

    def fit(self, X: np.ndarray, y: np.ndarray, **options) -> "LearnedKind":
        """Fit on layer sequences ``X`` [N, T, F] with stop labels ``y`` bool [N, T]; returns self."""
        raise NotImplementedError

    def _fit_scaler(self, x: np.ndarray) -> np.ndarray:
        """Set the scaler from rows ``x`` [n, F]; returns them standardized."""
        mean, scale = np.nan_to_num(np.nanmean(x, 0)), np.nan_to_num(np.nanstd(x, 0))
        scale[scale < 1e-8] = 1.0
        self.mean, self.scale, self._tensors = mean.tolist(), scale.tolist(), {}
        as_tensor = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
        return _standardize(as_tensor(x), as_tensor(self.mean), as_tensor(self.scale)).numpy()

    def tensors(self, device) -> dict:
        """The scoring tensors on ``device``, built once from the plain parameters."""
        device = torch.device(device)
        if device not in self._tensors:
            made = {"mean": torch.tensor(self.mean, dtype=torch.float64),
                    "scale": torch.tensor(self.scale, dtype=torch.float64), **self._build_tensors()}
            self._tensors[device] = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in made.items()}
        return self._tensors[device]

    def _build_tensors(self) -> dict:
        return {}

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tensors(x.device)
        return _standardize(x, t["mean"], t["scale"])

    def step(self, state, x: torch.Tensor):
        """(state for the next layer, float64 score [rows]) of one layer's raw features ``x`` [rows, F]."""
        raise NotImplementedError

    def decision_function(self, X: torch.Tensor) -> torch.Tensor:
        """Scores [N, T] of every layer of ``X`` [N, T, F]; the score at t reads layers <= t only
        (the same steps the policy takes layer by layer)."""
        state, out = None, []
        for t in range(X.shape[1]):
            state, score = self.step(state, X[:, t])
            out.append(score)
        return torch.stack(out, 1)


class LearnedPolicy(ExitPolicy):
    """A learned kind's file as an exit policy; ``decide`` at layer l reads layers <= l only.

    A chained kind (the CRF) carries its state from layer l-1 to l: the rows at l are those of
    l-1 that it did not stop, in order (the exit step's contract: stopped rows leave); when the
    row count is unchanged, they are the same rows. Any other call (a first layer, a gap, more
    rows) starts the chain again from the history.
    """

    kind = ""
    params = {
        "path": (str, "a policy JSON file (default: the one shipped for the loaded model)"),
        "threshold": (float, "override the stored operating point (decision threshold)"),
        "min_layer": (int, "override the stored first layer that may exit"),
    }

    def __init__(self, path: str | None = None, threshold: float | None = None, min_layer: int | None = None):
        if threshold is not None and not pf.finite(threshold):
            raise AdaInferError(f"threshold={threshold} must be a finite number")
        self.path = Path(path) if path else None
        self._threshold_override = threshold
        self._min_layer_override = min_layer
        self.meta: dict | None = None
        self.estimator: LearnedKind | None = None
        self.features = ()
        self.min_layer = 1 if min_layer is None else int(min_layer)
        self._carry = None
        if self.path is not None:  # read now: a bad file fails before a model loads
            self._load(self.path)

    def _load(self, path: Path) -> None:
        kind, meta = read_policy(path)
        if self.kind and meta["kind"] != self.kind:
            raise AdaInferError(f"{path} holds a {meta['kind']} policy, not {self.kind}; use policy=file,path={path}")
        self.estimator = kind.from_dict(meta, path)
        self.meta = meta
        self.source = str(path)
        self.features = tuple(meta["features"])
        self.threshold = float(meta["threshold"] if self._threshold_override is None else self._threshold_override)
        self.min_layer = int(meta["min_layer"] if self._min_layer_override is None else self._min_layer_override)
        if not pf.finite(self.threshold):
            raise AdaInferError(f"threshold={self.threshold} must be a finite number (policy {self.kind or meta['kind']})")
        if self.min_layer < 1:
            raise AdaInferError(f"min_layer={self.min_layer} must be >= 1")

    def bind(self, model: ModelIdentity) -> None:
        if self.meta is None:
            path = pf.shipped_path(model.name, self.kind)
            if not path.exists():
                shipped = sorted(p.parent.name for p in pf.policies_dir().glob(f"*/{self.kind}.json"))
                raise AdaInferError(
                    f"no {self.kind} policy is shipped for model {model.name!r} (shipped for: {', '.join(shipped) or 'none'}); "
                    f"train one with python -m adainfer_lmeval.experiments.train --model {model.name}, then pass path=..."
                )
            self._load(path)
        pf.check_fits(self.meta, model, self.source)
        super().bind(model)

    def consults_at(self, layer: int, num_layers: int) -> bool:
        if self.min_layer >= num_layers:  # stops nowhere (a never-exit file): reads nothing, a chain neither
            return False
        start = self.estimator.seq_start if self.estimator is not None else None
        first = self.min_layer if start is None else min(start, self.min_layer)  # a chain reads every layer
        if any(name in CHANGE_SIGNALS for name in self.features):
            first = max(1, first - 1)  # the layer before the first decision, as training compared with it
        return first <= layer < num_layers

    def decide(self, layer, num_layers, history):
        estimator = self.estimator
        start = estimator.seq_start
        x = history[:, layer, :]
        if start is None:
            _, score = estimator.step(None, x)
        elif layer < start:
            self._carry = None
            return torch.zeros(history.shape[0], dtype=torch.bool, device=history.device)
        else:
            state = self._carried(layer, history.shape[0])
            if state is None and layer > start:  # restart the chain from the history
                for earlier in range(start, layer):
                    state, _ = estimator.step(state, history[:, earlier, :])
            state, score = estimator.step(state, x)
        stop = score >= self.threshold
        if layer < self.min_layer:
            stop = torch.zeros_like(stop)
        if start is not None:
            self._carry = (layer, state, stop)
        return stop

    def _carried(self, layer: int, rows: int):
        carry, self._carry = self._carry, None
        if carry is None or carry[0] != layer - 1 or rows > carry[1].shape[0]:
            return None
        _, state, stop = carry
        if rows == state.shape[0]:
            return state
        # The rows it did not stop, in order; ``rows`` (known on the host) says how many: no sync.
        return state[torch.argsort(stop.to(torch.int8), stable=True)[:rows]]

    def describe(self) -> dict:
        meta = self.meta or {}
        return {
            "name": self.name, "kind": self.kind or meta.get("kind"), "file": getattr(self, "source", None),
            "threshold": getattr(self, "threshold", None), "min_layer": self.min_layer,
            "label": meta.get("label"), "trained_for": (meta.get("model") or {}).get("name"),
            "data_sha256": (meta.get("training") or {}).get("data_sha256"),
        }


@register_policy("file")
class PolicyFile(ExitPolicy):
    """``policy=file,path=P``: whichever learned kind the file holds."""

    params = LearnedPolicy.params

    def __new__(cls, path: str | None = None, threshold: float | None = None, min_layer: int | None = None):
        if not path:
            raise AdaInferError("policy=file needs path=<policy .json>, e.g. policy=file,path=policies/smollm2-135m/svm.json")
        kind, _ = read_policy(path)
        return kind.policy(path=path, threshold=threshold, min_layer=min_layer)
