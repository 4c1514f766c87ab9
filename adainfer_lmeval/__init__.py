"""AdaInfer early-exit inference as an lm-evaluation-harness backend.

Importing the package registers the lm-eval model ``adainfer`` and the exit statistics that
go into lm-eval's results, so ``lm_eval.simple_evaluate(model="adainfer", ...)`` works after
``import adainfer_lmeval``.
"""

from . import exit_report as _exit_report
from . import learned_policies as _learned_policies  # noqa: F401  (registers policy=svm, crf, file)
from .lm_backend import AdaInferLM  # noqa: F401  (registers "adainfer" with lm-eval)

_exit_report.install()

__all__ = ["AdaInferLM"]
