"""Loglikelihood requests as the early-exit engine runs them: rows, groups, batches.

Knows neither torch nor lm-eval: it takes the token ids lm-eval's ``TemplateLM.loglikelihood``
produced (``context_enc``, ``continuation_enc``) and returns the engine's batches. One place
for what the backend, the feature collector and the benchmark all need:

* **left truncation as HFLM does it**: the row is context+continuation minus its last token,
  keeping the last ``max_length`` tokens (:func:`truncate`);
* **the decision position**: the position predicting the first continuation token; the row's
  scored positions run from there to its end;
* **groups**: requests with the same tokens up to the decision position (the answer options of
  one question) share one exit decision; within a group, requests whose rows are identical
  (single-token options: the row is the context) share one row, as HFLM's logits cache does;
* **answer options**: a group's continuations are its options; the engine's option signals read
  them at the group's margin position, where they first differ (:func:`margin_offset`);
* **packing**: groups longest first (as HFLM: the first batch is the largest, so memory trouble
  shows early), whole groups per batch, up to a row (and optionally a token) budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterator, Sequence

from adainfer_lmeval.errors import AdaInferError


def truncate(context_enc: Sequence[int], continuation_enc: Sequence[int], max_length: int) -> tuple[list[int], int]:
    """(the input row, its decision position) of one request, truncated on the left as HFLM's
    ``_loglikelihood_tokens`` does."""
    if not context_enc or not continuation_enc:
        raise AdaInferError("a loglikelihood request has an empty context or continuation")
    tokens = (list(context_enc) + list(continuation_enc))[-(max_length + 1) :][:-1]
    decision = len(tokens) - len(continuation_enc)
    if decision < 0:  # HFLM would slice past the row's start
        raise AdaInferError(
            f"a loglikelihood continuation of {len(continuation_enc)} tokens does not fit max_length={max_length}; "
            "raise max_length or shorten the continuation"
        )
    return tokens, decision


def margin_offset(continuations: Sequence[Sequence[int]]) -> int:
    """How many tokens past the decision position the options of one group first differ.

    0 when their first tokens differ (or there are fewer than two distinct options); j when
    they share their first j tokens. Where one option is a prefix of another they never differ
    at a position both have, and the decision position (0) is used. Up to the decision position
    plus j, every option's row holds the same tokens (see :mod:`adainfer_lmeval.core.options`).
    """
    distinct = {tuple(c) for c in continuations}
    if len(distinct) < 2:
        return 0
    shortest = min(len(c) for c in distinct)
    for j in range(shortest):
        if len({c[j] for c in distinct}) > 1:
            return j
    return 0


@dataclass
class SharedRow:
    """One input row of the engine and the requests scored off it."""

    tokens: list[int]
    decision: int
    requests: list[int] = field(default_factory=list)  # indices into the caller's requests


@dataclass
class RequestGroup:
    """Rows sharing one exit decision (same tokens up to the decision position).

    ``continuations``: per request, in request order, its continuation tokens (where known): the
    group's answer options, for the option signals.
    """

    rows: list[SharedRow]
    continuations: list[list[int]] | None = None

    @property
    def margin_offset(self) -> int:
        """How far past the decision position the options first differ (:func:`margin_offset`)."""
        return margin_offset(self.continuations)

    @property
    def option_tokens(self) -> list[int]:
        """Per option (request): its token at the margin position."""
        offset = self.margin_offset
        return [continuation[offset] for continuation in self.continuations]

    @property
    def width(self) -> int:
        return max(len(row.tokens) for row in self.rows)

    @property
    def requests(self) -> int:
        return sum(len(row.requests) for row in self.rows)


@dataclass
class EngineBatch:
    """Whole groups, rows group by group: what ``ExitBatch.from_rows`` takes, and the way back."""

    groups: list[RequestGroup]

    @property
    def rows(self) -> list[SharedRow]:
        return [row for group in self.groups for row in group.rows]

    @property
    def tokens(self) -> list[list[int]]:
        return [row.tokens for row in self.rows]

    @property
    def decisions(self) -> list[int]:
        return [row.decision for row in self.rows]

    @property
    def row_groups(self) -> list[int]:
        """Per row: its group's index within this batch."""
        return [g for g, group in enumerate(self.groups) for _ in group.rows]

    @property
    def group_requests(self) -> list[int]:
        """Per row: how many requests its group holds (they share the group's check costs)."""
        return [group.requests for group in self.groups for _ in group.rows]

    @property
    def option_tokens(self) -> list[list[int]] | None:
        """Per group: its options' tokens at its margin position (None: continuations unknown)."""
        if any(group.continuations is None for group in self.groups):
            return None
        return [group.option_tokens for group in self.groups]

    @property
    def margin_offsets(self) -> list[int] | None:
        """Per group: its margin position minus its decision position (None: continuations unknown)."""
        if any(group.continuations is None for group in self.groups):
            return None
        return [group.margin_offset for group in self.groups]


def group_rows(rows: Sequence[Sequence[int]], decisions: Sequence[int],
               keys: Sequence[Hashable] | None = None,
               continuations: Sequence[Sequence[int]] | None = None) -> list[RequestGroup]:
    """Requests ``i`` (row ``rows[i]``, decision ``decisions[i]``) in groups, longest group first.

    A group is the requests with the same tokens up to the decision position (and the same
    ``keys[i]``, where given: e.g. the document, so two documents with the same prompt stay two
    groups). Same prefix means same decision position, so identical rows in a group are one row.
    Groups keep their first request's order among groups of one length. ``continuations[i]``,
    where given, become the groups' answer options.
    """
    grouped: dict[tuple, dict[tuple, SharedRow]] = {}
    for i, (tokens, decision) in enumerate(zip(rows, decisions)):
        key = (None if keys is None else keys[i], tuple(tokens[: decision + 1]))
        unique = grouped.setdefault(key, {})
        row = unique.get(tuple(tokens))
        if row is None:
            row = unique[tuple(tokens)] = SharedRow(list(tokens), int(decision))
        row.requests.append(i)
    groups = [RequestGroup(list(unique.values())) for unique in grouped.values()]
    if continuations is not None:
        for group in groups:
            group.continuations = [list(continuations[i]) for i in sorted(i for row in group.rows for i in row.requests)]
    return sorted(groups, key=lambda group: -group.width)


def pack(groups: Sequence[RequestGroup], rows_per_batch: int, tokens_per_batch: int | None = None,
         count: Callable[[RequestGroup], int] = lambda group: len(group.rows)) -> Iterator[EngineBatch]:
    """Batches of whole groups, in order: a batch closes before a group that would take it past
    ``rows_per_batch`` rows (``count`` says how many a group takes) or past ``tokens_per_batch``
    padded tokens (rows x the widest row). A group too big for any batch goes alone."""
    batch: list[RequestGroup] = []
    size = width = 0
    for group in groups:
        n, wide = count(group), max(width, group.width)
        over_tokens = tokens_per_batch is not None and (size + n) * wide > tokens_per_batch
        if batch and (size + n > rows_per_batch or over_tokens):
            yield EngineBatch(batch)
            batch, size, wide = [], 0, group.width
        batch.append(group)
        size += n
        width = wide
    if batch:
        yield EngineBatch(batch)


@dataclass
class EncodedRequests:
    """Requests ``(context_enc, continuation_enc)`` as the engine's rows (see :func:`encode`)."""

    rows: list[list[int]]
    decisions: list[int]
    continuations: list[list[int]]
    groups: list[RequestGroup]

    def batches(self, rows_per_batch: int, tokens_per_batch: int | None = None) -> Iterator[EngineBatch]:
        return pack(self.groups, rows_per_batch, tokens_per_batch)


def encode(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int,
           keys: Sequence[Hashable] | None = None) -> EncodedRequests:
    """Truncate, group and order ``(context_enc, continuation_enc)`` pairs (``keys``: see
    :func:`group_rows`)."""
    rows, decisions = [], []
    for context_enc, continuation_enc in pairs:
        tokens, decision = truncate(context_enc, continuation_enc, max_length)
        rows.append(tokens)
        decisions.append(decision)
    continuations = [list(c) for _, c in pairs]
    return EncodedRequests(rows, decisions, continuations, group_rows(rows, decisions, keys, continuations))
