"""AdaInfer early-exit inference as an lm-evaluation-harness backend.

Importing the package registers the lm-eval model ``adainfer`` lazily (:mod:`.adapter.startup_hook`: a
placeholder goes into lm-eval's model registry when lm-eval fills it), so ``import
adainfer_lmeval`` imports neither lm-eval nor torch, and ``lm_eval.simple_evaluate(model=
"adainfer", ...)`` works after it. The exit statistics go into lm-eval's results from the moment
an adainfer model is built. An installed copy needs no import at all: its start-up hook does the
same for the plain ``lm_eval`` command.
"""

from adainfer_lmeval.adapter import startup_hook as _startup_hook

_startup_hook.install()

__all__ = ["AdaInferLM"]


def __getattr__(name: str):
    if name == "AdaInferLM":  # the backend needs lm-eval, torch and transformers: loaded on use
        from adainfer_lmeval.adapter.backend import AdaInferLM

        return AdaInferLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
