"""``policy=svm``: AdaInfer's linear SVM on one layer's features."""

from __future__ import annotations

import numpy as np
import torch

from adainfer_lmeval.policies import files as pf
from adainfer_lmeval.policies.learned.base import LearnedKind, register_kind


@register_kind("svm")
class SvmKind(LearnedKind):
    """AdaInfer's linear SVM on single layers: score = coef · standardized features + intercept."""

    score_meaning = "SVM decision value"

    def __init__(self, mean=None, scale=None, coef=None, intercept: float = 0.0):
        super().__init__(mean, scale)
        self.coef = None if coef is None else [float(v) for v in coef]
        self.intercept = float(intercept)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "coef": list(self.coef), "intercept": self.intercept}

    @classmethod
    def check_dict(cls, path, meta):
        pf.vector(path, meta, "coef", len(meta["features"]))
        pf.number(path, meta, "intercept")

    @classmethod
    def from_dict(cls, meta, path=None):
        return cls(meta["scaler"]["mean"], meta["scaler"]["scale"], meta["coef"], meta["intercept"])

    def fit(self, X, y, C: float = 0.1):
        from sklearn.svm import LinearSVC

        x = np.asarray(X, dtype=np.float64).reshape(-1, X.shape[-1])
        t = np.asarray(y).reshape(-1)
        z = self._fit_scaler(x)
        if t.all() or not t.any():  # one class only: a constant score
            self.coef, self.intercept = [0.0] * x.shape[1], 1.0 if t.all() else -1.0
        else:
            clf = LinearSVC(C=C, class_weight="balanced", max_iter=20000).fit(z, t)
            self.coef, self.intercept = clf.coef_[0].tolist(), float(clf.intercept_[0])
        self._tensors = {}
        return self

    def _build_tensors(self):
        return {"coef": torch.tensor(self.coef, dtype=torch.float64)}

    def step(self, state, x):
        return None, self.standardize(x) @ self.tensors(x.device)["coef"] + self.intercept


