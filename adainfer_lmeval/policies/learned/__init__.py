"""AdaInfer's learned stop policies: one estimator class per kind, fitted by training.

- :mod:`.base`: :class:`~.base.LearnedKind` (``fit`` / ``decision_function`` / ``to_dict``),
  :func:`~.base.register_kind`, the policy wrapper and ``policy=file`` (any policy file).
- :mod:`.svm`: ``policy=svm``, AdaInfer's linear SVM on one layer's signals.
- :mod:`.crf`: ``policy=crf``, a linear-chain CRF over layers (the prefix marginal, carried).
- :mod:`.margin`: a calibrated answer-option margin file, run as the ``policy=margin`` rule.

A new kind is one class in a module of its own here, imported below; importing this package
registers every kind.
"""

from adainfer_lmeval.policies.learned import crf, margin, svm  # noqa: F401  (registers the kinds)
