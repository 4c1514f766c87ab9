"""The answers the ``adainfer`` model hands to lm-eval: the plain ``(logprob, is_greedy)`` /
float / str lm-eval's metrics expect, each carrying its request's :class:`ExitRecord` as an
attribute (read by :mod:`.results`).

lm-eval's ``--use_cache`` pickles these (sqlite): each ``__reduce__`` rebuilds the value
together with its exit record, so answers served from the cache still report their exit layers
and FLOPs.
"""

from __future__ import annotations

from adainfer_lmeval.core.accounting import ExitRecord


class ScoredContinuation(tuple):
    """``(logprob, is_greedy)`` as lm-eval expects, with the request's ``exit`` record."""

    def __new__(cls, logprob: float, is_greedy: bool, exit: ExitRecord):
        obj = super().__new__(cls, (logprob, is_greedy))
        obj.exit = exit
        return obj

    def __reduce__(self):
        return (type(self), (self[0], self[1], self.exit))


class ScoredFloat(float):
    """A rolling loglikelihood, with the request's ``exit`` record."""

    def __new__(cls, value: float, exit: ExitRecord):
        obj = super().__new__(cls, value)
        obj.exit = exit
        return obj

    def __reduce__(self):
        return (type(self), (float(self), self.exit))


class GeneratedText(str):
    """A generation, with the request's ``exit`` record.

    ``exit`` may be missing: with no filter, lm-eval casts the gold answer with
    ``type(result)(gold)``, which must give a plain string's equal.
    """

    def __new__(cls, value: str, exit: ExitRecord | None = None):
        obj = super().__new__(cls, value)
        obj.exit = exit
        return obj

    def __reduce__(self):
        return (type(self), (str(self), self.exit))
