"""``policy=crf``: a linear-chain CRF over layers (labels stop/go), trained by crfsuite, scored in torch."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.policies import crfsuite_check as crfsuite
from adainfer_lmeval.policies import files as pf
from adainfer_lmeval.policies.learned.base import LearnedKind, register_kind


def crf_item(values) -> dict:
    """One layer as crfsuite attributes: standardized feature values and a bias."""
    item = {f"f{i}": float(v) for i, v in enumerate(values)}
    item["bias"] = 1.0
    return item


@register_kind("crf")
class CrfKind(LearnedKind):
    """A linear-chain CRF over layers (labels stop/go), trained by crfsuite; scored in torch.

    The emission of label y at a layer is the sum over the layer's attributes (:func:`crf_item`)
    of weight(attribute, y) × value; the score at layer l is the forward algorithm's alpha at l
    normalised: P(stop at l | layers seq_start..l).
    """

    seq_start = 1
    score_meaning = "CRF marginal P(stop at l | layers seq_start..l)"
    crfsuite_file = "crf.crfsuite"

    def __init__(self, mean=None, scale=None, model_bytes: bytes | None = None, seq_start: int = 1):
        super().__init__(mean, scale)
        self.model_bytes = model_bytes
        self.seq_start = int(seq_start)
        self._cached_weights: dict | None = None

    def to_dict(self) -> dict:
        return {**super().to_dict(), "seq_start": self.seq_start, "crfsuite_file": self.crfsuite_file,
                "crfsuite_sha256": pf.sha256_bytes(self.model_bytes)}

    def files(self):
        return {self.crfsuite_file: self.model_bytes}

    @classmethod
    def check_dict(cls, path, meta):
        pf.positive_int(path, meta, "seq_start", 1)
        crfsuite.check_crfsuite_fields(path, meta)

    @classmethod
    def from_dict(cls, meta, path=None):
        if path is None:
            raise AdaInferError("a CRF policy is read from its file (its crfsuite model sits next to the JSON)")
        data = crfsuite.read_crfsuite_bytes(Path(path), meta)
        kind = cls(meta["scaler"]["mean"], meta["scaler"]["scale"], data, meta.get("seq_start", 1))
        kind._weights(source=path)  # a model whose labels or attributes are not ours fails now
        return kind

    @classmethod
    def check_files(cls, path, meta):
        crfsuite.read_crfsuite_bytes(Path(path), meta, smoke=False)

    def fit(self, X, y, c2: float = 0.1, max_iterations: int = 200):
        import sklearn_crfsuite

        x = np.asarray(X, dtype=np.float64)
        z = self._fit_scaler(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        xs = [[crf_item(v) for v in seq] for seq in z]
        ys = [[crfsuite.STOP if s else crfsuite.GO for s in seq] for seq in y]
        if y.all() or not y.any():  # crfsuite needs both labels: add one flipped dummy sequence
            xs.append(xs[0])
            ys.append([crfsuite.GO if s == crfsuite.STOP else crfsuite.STOP for s in ys[0]])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / self.crfsuite_file
            crf = sklearn_crfsuite.CRF(algorithm="lbfgs", c1=0.0, c2=c2, max_iterations=max_iterations,
                                       all_possible_transitions=True, model_filename=str(path))
            crf.fit(xs, ys)
            self.model_bytes = path.read_bytes()
        if not self.model_bytes.startswith(crfsuite.CRF_MAGIC):
            raise AdaInferError("crfsuite wrote an unexpected model file")
        self._tensors, self._cached_weights = {}, None
        return self

    def _weights(self, source="crfsuite model") -> dict:
        """Emission weights [F + 1, 2] (rows f0..f{F-1}, bias; columns stop, go) and transitions
        [2, 2] (from, to), read from the crfsuite model once."""
        if self._cached_weights is None:
            import pycrfsuite

            tagger = pycrfsuite.Tagger()
            try:
                tagger.open_inmemory(self.model_bytes)
                info = tagger.info()
            except Exception as error:  # noqa: BLE001  (crfsuite's own errors are not ours)
                raise AdaInferError(f"{source}: corrupt crfsuite model ({type(error).__name__}: {error})") from None
            finally:
                tagger.close()
            labels = [crfsuite.STOP, crfsuite.GO]
            if sorted(info.labels) != sorted(labels):
                raise AdaInferError(f"{source}: crfsuite model has labels {sorted(info.labels)}, expected {labels}")
            names = [f"f{i}" for i in range(len(self.mean))] + ["bias"]
            emission = torch.zeros(len(names), 2, dtype=torch.float64)
            for (attribute, label), weight in info.state_features.items():
                if attribute not in names:
                    raise AdaInferError(f"{source}: crfsuite model reads attribute {attribute!r}; "
                                        f"a policy's are {names[0]}..{names[-2]} and bias")
                emission[names.index(attribute), labels.index(label)] = weight
            transitions = torch.zeros(2, 2, dtype=torch.float64)
            for (src, dst), weight in info.transitions.items():
                transitions[labels.index(src), labels.index(dst)] = weight
            self._cached_weights = {"emission": emission, "transitions": transitions}
        return self._cached_weights

    def _build_tensors(self):
        weights = self._weights()
        mean = torch.tensor(self.mean, dtype=torch.float64)
        scale = torch.tensor(self.scale, dtype=torch.float64)
        emission = weights["emission"][:-1]
        # the scaler folded in: ((x - mean) / scale) @ W + b = x @ (W / scale) + (b - (mean / scale) @ W)
        return {"emission": emission / scale[:, None], "bias": weights["emission"][-1] - (mean / scale) @ emission,
                "transitions": weights["transitions"]}

    def step(self, alpha, x):
        t = self.tensors(x.device)
        x = x.to(torch.float64)
        x = torch.where(x.isnan(), t["mean"], x)  # a missing value sits at the mean, as in training
        emission = torch.addmm(t["bias"], x, t["emission"])  # [rows, 2]
        if alpha is not None:  # alpha_l(y) = logsumexp_y' (alpha_{l-1}(y') + transition(y', y)) + emission_l(y)
            emission = emission + torch.logsumexp(alpha[:, :, None] + t["transitions"], dim=1)
        alpha = torch.log_softmax(emission, dim=1)  # normalised: log P(label at l | layers seq_start..l)
        return alpha, alpha[:, 0].exp()

