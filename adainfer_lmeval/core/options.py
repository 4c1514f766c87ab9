"""The answer options' distribution at one layer: the signal behind ``policy=margin``.

A loglikelihood group (the answer options of one question) is judged at its *margin position*:
the first position where the options' continuations differ (the decision position when their
first tokens differ; later when they share a first token, as PIQA's options mostly do). Up to
that position every option's row holds the same tokens, so one hidden state serves them all,
and each option's logit there is one head row: its token at that position. A softmax over those
K logits is the options' distribution; its margin (top minus second probability) says how
settled the answer is; how its argmax and the distribution move from one consulted layer to the
next say it too (``option_change``, ``option_kl``). Pure torch: the engine computes them online
and the study offline, from the same functions, so the two agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def option_probs(option_logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over each row's valid options: [n, K] float32, 0 where ``valid`` is false.

    ``option_logits`` [n, K] (any float dtype), ``valid`` [n, K] bool (groups have different
    numbers of options; the rest is padding)."""
    masked = option_logits.float().masked_fill(~valid, float("-inf"))
    probs = torch.softmax(masked, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)  # a row with no valid option: all zeros


def option_margin(probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Top minus second option probability per row: [n] float32; NaN for a row with fewer than
    two options (no choice to be settled: a margin policy never stops on it)."""
    if probs.shape[-1] < 2:
        return torch.full(probs.shape[:1], float("nan"), device=probs.device)
    top2 = probs.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    return torch.where(valid.sum(-1) >= 2, margin, torch.full_like(margin, float("nan")))


def option_change(probs: torch.Tensor, previous: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """1.0 where the options' argmax differs from ``previous``'s (the distribution at the
    layer consulted before), else 0.0: [n] float32; NaN for a row with fewer than two options."""
    changed = (probs.argmax(-1) != previous.argmax(-1)).float()
    return torch.where(valid.sum(-1) >= 2, changed, torch.full_like(changed, float("nan")))


def option_kl(probs: torch.Tensor, previous: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """KL(previous || probs) over each row's options: [n] float32; NaN for a row with fewer than
    two options. A probability that underflowed to 0 counts as the smallest normal float, so
    the divergence stays finite."""
    tiny = torch.finfo(torch.float32).tiny
    kl = (torch.xlogy(previous, previous) - torch.xlogy(previous, probs.clamp_min(tiny))).sum(-1)
    return torch.where(valid.sum(-1) >= 2, kl, torch.full_like(kl, float("nan")))


@dataclass
class AnswerOptions:
    """Per group of one engine batch: the options' tokens at the margin position, and where that
    position is (the decision position plus ``offsets``; see the module docstring)."""

    tokens: torch.Tensor  # [G, K] long, padded with 0 past a group's options
    valid: torch.Tensor  # [G, K] bool: which entries are options
    offsets: torch.Tensor  # [G] long

    @classmethod
    def from_lists(cls, tokens: list[list[int]], offsets: list[int], device=None) -> "AnswerOptions":
        """From one token list per group (one entry per option) and one offset per group."""
        width = max(1, max(len(t) for t in tokens))
        ids = torch.zeros(len(tokens), width, dtype=torch.long)
        valid = torch.zeros(len(tokens), width, dtype=torch.bool)
        for g, group_tokens in enumerate(tokens):
            ids[g, : len(group_tokens)] = torch.tensor(group_tokens, dtype=torch.long)
            valid[g, : len(group_tokens)] = True
        return cls(ids.to(device), valid.to(device), torch.tensor(offsets, dtype=torch.long, device=device))
