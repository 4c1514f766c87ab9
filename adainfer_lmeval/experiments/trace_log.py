"""The trace log of a collection: traced examples, one JSON line each, so collections resume.

:func:`adainfer_lmeval.experiments.collect.collect` appends every traced batch to
``<out>.traces.jsonl`` and, before tracing, fills the examples the log already holds: an
interrupted collection (a killed job, a full disk, ^C) resumes where it stopped, and a larger
``--docs`` with the same seed traces only the documents the smaller one lacked. Hours of a
1.5B model's traces on a CPU are not lost to one failure.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from adainfer_lmeval.core.features import FEATURE_NAMES


class TraceLog:
    """Traced examples (:class:`~adainfer_lmeval.experiments.collect.Example`), one JSON line each.

    A line is keyed by the model (identity and schema version) and by what the model saw (task,
    document, shots, every option's token row, gold), so a line from another model, prompt or
    truncation never fills an example. A line that does not parse (the process died while
    writing it) or whose shapes do not fit its example is skipped: the example is traced again.
    """

    TRACED = ("features", "top1", "option_ll", "option_logits")

    def __init__(self, path: Path, identity, schema_version: int):
        """``identity``: the model's :class:`~adainfer_lmeval.core.exit_policy.ModelIdentity`."""
        self.path = path
        self._model = [schema_version, identity.name, identity.model_type, identity.num_layers,
                       identity.hidden_size, identity.vocab_size]
        self.num_layers = identity.num_layers
        self._lines: dict[str, dict] | None = None

    def key(self, ex) -> str:
        # the decision positions too: the same rows split otherwise into context and continuation
        return hashlib.sha256(json.dumps([self._model, ex.seen(), ex.decision]).encode()).hexdigest()

    def _read(self) -> dict[str, dict]:
        if self._lines is None:
            self._lines = {}
            if self.path.exists():
                with open(self.path, encoding="utf-8", errors="replace") as f:
                    for line in f:
                        try:
                            record = json.loads(line)
                            self._lines[str(record["key"])] = record
                        except (ValueError, KeyError, TypeError):
                            continue  # a torn or foreign line: its example is traced again
        return self._lines

    def _fits(self, ex, record: dict) -> bool:
        """Whether the record has the shapes and number types a traced ``ex`` has."""
        layers, options = self.num_layers, len(ex.rows)
        return (_table(record.get("features"), layers, len(FEATURE_NAMES)) and _table([record.get("top1")], 1, layers)
                and _table(record.get("option_ll"), layers, options) and _table(record.get("option_logits"), layers, options))

    def restore(self, examples: list) -> list:
        """Fill the examples the log holds; return the ones still to trace."""
        lines = self._read()
        pending = []
        for ex in examples:
            record = lines.get(self.key(ex))
            if record is not None and self._fits(ex, record):
                for name in self.TRACED:
                    setattr(ex, name, record[name])
            else:
                pending.append(ex)
        return pending

    def append(self, examples: list) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for ex in examples:
                f.write(json.dumps({"key": self.key(ex), **{name: getattr(ex, name) for name in self.TRACED}}) + "\n")
            f.flush()


def _table(rows, height: int, width: int) -> bool:
    """``rows`` is a ``height`` x ``width`` list of numbers (NaN included, as JSON writes it)."""
    return (isinstance(rows, list) and len(rows) == height
            and all(isinstance(r, list) and len(r) == width
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r) for r in rows))


def trace_log_path(out: Path) -> Path:
    return out.with_name(out.name + ".traces.jsonl")
