"""Exit policies: given the features of the layers run so far, stop now or go on.

A policy knows nothing of transformers or lm-eval: it sees torch tensors of the signals it names
in ``features`` (registered in :mod:`adainfer_lmeval.core.features`: the paper's
:data:`~adainfer_lmeval.core.features.FEATURE_NAMES` and the answer-option ones) and answers per row.

- :mod:`.registry`: ``policy=<name>`` -> a class; :func:`register_policy` adds a name.
- :mod:`.rules`: ``full``, ``static``, ``threshold``, ``margin``, ``simlens`` (no training).
- :mod:`.learned`: the learned kinds (``svm``, ``crf``, ``margin``; ``file`` for any policy
  file), one module each, as estimators with ``fit`` / ``decision_function``.
- :mod:`.files`: where policy files live and how they are read safely (JSON, never pickles);
  :mod:`.crfsuite_check`: a CRF's crfsuite model, checked before crfsuite opens it.
"""

from adainfer_lmeval.core.exit_policy import ExitPolicy, ModelIdentity
from adainfer_lmeval.policies.registry import build_policy, policy_arg_names, register_policy, registered_policies
from adainfer_lmeval.policies import rules  # noqa: F401  (registers full, static, threshold, margin, simlens)

__all__ = ["ExitPolicy", "ModelIdentity", "build_policy", "policy_arg_names", "register_policy", "registered_policies"]
