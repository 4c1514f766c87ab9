"""The continuation read-out (SimLens): a few tokens carried through the remaining layers alone.

At layer l the lens reads a row's answer off its layer-l state through the final norm and head.
SimLens (Ma et al., 2025, arXiv 2507.17618) instead takes the start token and the answer
position out of the prompt and runs just them through layers l+1..L: the rest of the prompt
has already been read into their states, and the upper layers still get to turn them into the
last layer's answer. Here the carried tokens of a row are its first token (position 0, the
global condition the paper's ablation finds the answer needs) and the span ``first..last`` of
positions whose predictions the caller reads: the decision position for a single-token answer,
up to the margin position when the options share a first token, or every scored position
when the exit answer's log-likelihoods come from the continuation.

Rows carry spans of different lengths; a shorter row is right-padded with copies of its last
token, which causal attention keeps from changing any real one (a padded copy only sees what
is before it). A row is charged its own carried tokens × remaining layers, padding not
counted (as the engine's layer FLOPs count a row's real tokens), so a row's cost does not
depend on what it was batched with.

:func:`fill_carry` is the *filled* variant (the carried positions attend to the whole prompt, its
keys and values projected from the exit layer's states): more faithful to full depth than
SimLens on every study cell measured (``reports/study/README.md``). The engine asks
:func:`continue_rows` for either (a policy's ``continuation_carry``); a filled row is charged
its carried tokens × layers run, attending to its prompt and carried tokens, plus its prompt
tokens' key/value projections at every layer run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adainfer_lmeval.core.kv_cache import RowCache


@dataclass
class Continuation:
    """The last-layer states of the carried tokens of ``rows`` rows."""

    states: torch.Tensor  # [rows, q, d] at layer num_layers
    offsets: torch.Tensor  # [rows]: index along q of each row's position ``first``
    tokens: list[int]  # per row: its carried tokens (padding not counted)
    layers_run: int  # the remaining layers every row was carried through
    # per row: the prompt tokens its carried ones attend to, their keys and values projected at
    # every layer run (filled); 0 for SimLens, whose carries attend to each other only
    prompt_tokens: list[int]

    @property
    def token_layers(self) -> list[int]:
        """Per row: carried tokens × layers run (what the accounting prices)."""
        return [t * self.layers_run for t in self.tokens]

    def at(self, steps: torch.Tensor) -> torch.Tensor:
        """States [rows, d] at ``first + steps`` (``steps`` [rows], 0 = the position ``first``)."""
        index = self.offsets + steps
        return self.states[torch.arange(len(index), device=index.device), index]

    def span(self, row: int, length: int) -> torch.Tensor:
        """Row ``row``'s states [length, d] at positions ``first .. first+length-1``."""
        start = int(self.offsets[row])
        return self.states[row, start : start + length]


def carried_positions(first: list[int], last: list[int]) -> tuple[list[list[int]], list[int], list[int]]:
    """What each row carries: token 0 and positions ``first[i]..last[i]`` (inclusive), as
    (positions right-padded with copies of the last to one width, the index along them of
    position ``first``, the row's real tokens)."""
    positions = [([0] if lo > 0 else []) + list(range(lo, hi + 1)) for lo, hi in zip(first, last)]
    width = max(len(p) for p in positions)
    padded = [p + [p[-1]] * (width - len(p)) for p in positions]
    return padded, [1 if lo > 0 else 0 for lo in first], [len(p) for p in positions]


def carry(stack, layer: int, hidden: torch.Tensor, first: list[int], last: list[int],
          rows: torch.Tensor | None = None) -> Continuation:
    """Carry token 0 and positions ``first[i]..last[i]`` (inclusive) of each row of ``hidden``
    [batch, T, d] (layer ``layer``'s states; ``rows``: the rows to carry, default all) through
    layers ``layer+1..L`` (:meth:`DecoderStack.continue_from`).

    ``first``/``last`` are Python ints (host lists): the carried positions are built on the host
    so that no device value is read per row. Only the carried tokens' states are gathered, not
    the rows' whole prompts.
    """
    padded, offsets, tokens = carried_positions(first, last)
    index = torch.tensor(padded, dtype=torch.long, device=hidden.device)
    if rows is None:
        rows = torch.arange(len(padded), device=hidden.device)
    states = stack.continue_from(layer, hidden[rows[:, None], index], index)
    offsets = torch.tensor(offsets, dtype=torch.long, device=hidden.device)
    return Continuation(states, offsets, tokens, stack.num_layers - layer, [0] * len(tokens))


def continue_rows(stack, kind: str, layer: int, hidden: torch.Tensor, first: list[int], last: list[int],
                  rows: torch.Tensor) -> Continuation:
    """Rows ``rows`` of ``hidden`` (layer ``layer``'s states, right-padded, positions = indices)
    continued from ``layer`` to the last layer, positions ``first[i]..last[i]`` read: by
    :func:`carry` (``kind`` "simlens") or :func:`fill_carry` ("filled"), as one
    :class:`Continuation`."""
    if kind == "simlens":
        return carry(stack, layer, hidden, first, last, rows=rows)
    states = fill_carry(stack, hidden, [layer] * len(first), first, last, rows=rows)
    offsets = torch.zeros(len(first), dtype=torch.long, device=hidden.device)  # the span starts at ``first``
    return Continuation(states, offsets, [hi - lo + 1 for lo, hi in zip(first, last)], stack.num_layers - layer, list(first))


def fill_carry(stack, states: torch.Tensor, layers: list[int], first: list[int], last: list[int],
               last_layers: int | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The *filled* continuation: each row's positions ``first[i]..last[i]`` carried from layer
    ``layers[i]`` through the remaining layers while attending to the row's whole prompt (positions
    before ``first[i]``), whose keys and values at every layer run are projected from its layer-l
    states (CALM's state propagation, :meth:`DecoderStack.fill_kv`, as generation fills the layers
    an exited token skipped). From layer L-1 this is the full forward exactly; from earlier layers
    only the prompt's upper-layer states are approximated, none of it is left out (SimLens, above,
    leaves it out).

    ``states`` [rows, T, d]: each row's states at its own layer ``layers[i]`` (right-padded rows,
    positions = indices); ``rows``: the rows of ``states`` to carry (default all; only their prompts
    and spans are gathered, not whole rows). ``last_layers`` = K: a carry from l < L - K skips layers l+1..L-K and runs
    only the model's last K layers on the layer-l states; None runs every remaining one.

    Returns the carried positions' last-layer states [rows, W, d] (W the widest span; a shorter row
    is right-padded with copies of its last position, which causal attention keeps from changing
    any real one). Rows with different prompt lengths are batched left-aligned in the cache (row i's
    prompt ends at the same slot for every row), so slot distances are position distances and
    sliding windows see the tokens where they were. The carries of all rows run together: each
    layer's weights are read once for the batch.
    """
    device, L = states.device, stack.num_layers
    batch = len(layers)
    prompt_width = max(first)
    pad = torch.tensor([prompt_width - f for f in first], device=device)[:, None]  # empty slots before row i's prompt
    slots = torch.arange(prompt_width, device=device)[None, :]
    prompt_positions = (slots - pad).clamp(min=0)  # [rows, P]
    prompt_valid = slots >= pad
    spans = [list(range(lo, hi + 1)) for lo, hi in zip(first, last)]
    width = max(len(span) for span in spans)
    carried_at = torch.tensor([span + [span[-1]] * (width - len(span)) for span in spans], dtype=torch.long, device=device)
    index = (torch.arange(batch, device=device) if rows is None else rows)[:, None]
    prompt = states[index, prompt_positions]  # the prompt held at each row's start layer
    carried = states[index, carried_at].clone()
    valid = torch.cat([prompt_valid, torch.ones_like(carried_at, dtype=torch.bool)], 1)
    cache = RowCache(L, batch, valid.shape[1])
    runs_from = [layer if last_layers is None else max(layer, L - last_layers) for layer in layers]
    running = None
    for layer_index in range(min(runs_from), L):  # computes layer layer_index + 1
        joined = [b for b, start in enumerate(runs_from) if start <= layer_index]
        if joined != running:  # masks and positions change only when rows join (the engine's all start at once)
            running = joined
            active = None if len(joined) == batch else torch.tensor(joined, device=device)
            pick = (lambda t: t) if active is None else (lambda t: t[active])  # noqa: E731
            if prompt_width > 0:
                prompt_inputs = stack.cached_layer_inputs(pick(prompt), pick(prompt_positions), 0, pick(prompt_valid))
            carried_inputs = stack.cached_layer_inputs(pick(carried), pick(carried_at), prompt_width, pick(valid))
        if prompt_width > 0:
            stack.fill_kv(layer_index, pick(prompt), prompt_inputs, cache.at(0, active))
        out = stack.run_layer(layer_index, pick(carried), carried_inputs, cache.at(prompt_width, active))
        if active is None:
            carried = out
        else:
            carried[active] = out
    return carried
