"""How plain lm-eval finds ``adainfer`` without being edited, and what an adainfer run sets up.

lm-eval 0.4.13 reads no entry points: its model registry knows only what was registered by
something imported before. An installed copy of this package puts ``adainfer_lmeval_hook.pth``
into site-packages (see ``setup.py``); Python runs its ``import`` line at every start-up, which
calls :func:`install`, as ``import adainfer_lmeval`` does. That puts a finder on
``sys.meta_path`` which answers no import until lm-eval's own modules load, and then:

- right after ``lm_eval.models`` (the module that fills lm-eval's model registry) has run, it
  registers a lazy placeholder, the string :data:`BACKEND`, under ``adainfer``: lm-eval imports
  the backend (torch, transformers) only when that name is looked up, and the backend's
  ``@register_model`` upgrades the placeholder to the class. (The registry module itself is too
  early: ``get_model`` imports ``lm_eval.models`` only while the registry is empty, so a
  placeholder there would hide ``hf`` and every other built-in model.)
- right after ``lm_eval.config.evaluate_config`` (the CLI's run configuration) has run, a run
  with ``--model adainfer`` gets what ``adainfer-eval`` gives it before lm-eval builds its task
  index: this package's ``tasks/`` folder on the include path (the offline task configs; a
  user's own ``--include_path`` still wins) and, when the offline data is fetched, no Hub
  look-ups (:func:`prepare_adainfer_run`).

lm-eval versions that discover the ``lm_eval.models`` entry point themselves (upstream PR #4013)
find the same class through pyproject.toml; a name already there is left alone.

Imported at every interpreter start-up: only ``sys`` at module level, and it never imports
lm-eval or torch itself (the callbacks run when lm-eval is already being imported).
"""

import sys

MODEL = "adainfer"
BACKEND = "adainfer_lmeval.adapter.backend:AdaInferLM"  # the same target as the entry point in pyproject.toml
_CLI_CONFIG = "lm_eval.config.evaluate_config"


def install() -> None:
    """Register ``adainfer`` with lm-eval now if lm-eval is loaded, else when it loads (idempotent)."""
    pending = {}
    for name, callback in _CALLBACKS.items():
        module = sys.modules.get(name)
        if module is None:
            pending[name] = callback
        else:
            _run(callback, module)
    if pending and not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(pending))


class _AfterImport:
    """A meta-path finder that lets the other finders load a watched module, then runs a callback
    on the executed module. Every other import costs one dict lookup; it leaves ``sys.meta_path``
    once all its modules have been seen."""

    def __init__(self, callbacks: dict) -> None:
        self._callbacks = dict(callbacks)

    def find_spec(self, name, path=None, target=None):
        callback = self._callbacks.get(name)
        if callback is None:
            return None
        spec = self._spec_from_others(name, path, target)
        loader = getattr(spec, "loader", None)
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:  # nothing to wrap: lm-eval loads as it would without us
            return spec

        def exec_then_callback(module):
            exec_module(module)
            _run(callback, module)

        try:
            loader.exec_module = exec_then_callback  # this spec's own loader instance
        except (AttributeError, TypeError):
            return spec
        del self._callbacks[name]
        if not self._callbacks and self in sys.meta_path:
            sys.meta_path.remove(self)
        return spec

    def _spec_from_others(self, name, path, target):
        for finder in list(sys.meta_path):
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or find_spec is None or _is_after_import(finder):
                continue
            spec = find_spec(name, path, target)
            if spec is not None:
                return spec
        return None


def _is_after_import(finder) -> bool:
    """Whether ``finder`` is an ``_AfterImport``, ours or another copy's of this package (an
    editable install beside a checkout on ``PYTHONPATH``): two such finders asking each other
    would recurse without end, so each asks only the finders that really load modules."""
    kind = type(finder)
    return kind.__qualname__ == "_AfterImport" and kind.__module__.startswith("adainfer_lmeval")


def _run(callback, module) -> None:
    try:
        callback(module)
    except Exception as error:  # never break lm-eval's own import
        import warnings

        warnings.warn(f"adainfer-lmeval could not hook into lm-eval ({callback.__name__}): {error!r}", stacklevel=2)


def _register_model(_models_module) -> None:
    from lm_eval.api.registry import model_registry  # already loaded: lm_eval.models imports it

    if MODEL not in model_registry:
        model_registry.register(MODEL, target=BACKEND)


def _wrap_cli_config(module) -> None:
    import functools

    config = getattr(module, "EvaluatorConfig", None)
    original = getattr(config, "process_tasks", None)
    if original is None or getattr(original, "_adainfer", False):
        return

    @functools.wraps(original)
    def process_tasks(self, *args, **kwargs):
        if getattr(self, "model", None) != MODEL:
            return original(self, *args, **kwargs)
        given = self.include_path
        prepare_adainfer_run(results_hook=False)  # the Hub switched off before tasks load their data
        self.include_path = with_task_folder(given)
        try:
            return original(self, *args, **kwargs)
        finally:
            self.include_path = given

    process_tasks._adainfer = True
    config.process_tasks = process_tasks


_CALLBACKS = {"lm_eval.models": _register_model, _CLI_CONFIG: _wrap_cli_config}


# ---- what an adainfer run needs (called when lm-eval is loaded; these may import anything) ------


def prepare_adainfer_run(results_hook: bool = True) -> None:
    """Called when an adainfer model is built (and by the CLI hook before tasks are indexed):
    installs the exit statistics into lm-eval's results (:func:`.results.install`) and, if
    this package's offline benchmark data is fetched, sets the Hugging Face offline switches
    (:func:`adainfer_lmeval.offline.environment.configure_offline_environment`; an explicit ``HF_HUB_OFFLINE=0`` wins),
    as ``adainfer-eval`` does, so that no run waits on Hub look-ups that cannot succeed."""
    if results_hook:
        from adainfer_lmeval.adapter import results as exit_report

        exit_report.install()
    global _OFFLINE_CHECKED
    if not _OFFLINE_CHECKED:
        _OFFLINE_CHECKED = True
        from adainfer_lmeval.offline.data.availability import data_status
        from adainfer_lmeval.offline.environment import configure_offline_environment

        if any(row["present"] for row in data_status()):
            configure_offline_environment()


_OFFLINE_CHECKED = False


def with_task_folder(include_path):
    """``include_path`` (None, a path or a list) with this package's ``tasks/`` folder first:
    later paths override earlier ones in lm-eval's task index, so a user's own configs win."""
    from pathlib import Path

    from adainfer_lmeval.paths import tasks_dir

    ours = tasks_dir()
    if include_path is None:
        given = []
    elif isinstance(include_path, (str, Path)):
        given = [include_path]
    else:
        given = list(include_path)
    if any(Path(p).resolve() == ours.resolve() for p in given):
        return include_path
    return [str(ours), *map(str, given)]
