"""The answer options' distribution at one layer: the signal behind ``policy=margin``.

A loglikelihood group (the answer options of one question) is judged at its *margin position*:
the first position where the options' continuations differ (the decision position when their
first tokens differ; later when they share a first token, as PIQA's options mostly do). Up to
that position every option's row holds the same tokens, so one hidden state serves them all,
and each option's logit there is one head row: its token at that position. A softmax over those
K logits is the options' distribution; its margin (top minus second probability) says how
settled the answer is. Pure torch: the engine computes it online and the study offline, from the
same functions, so the two agree exactly.
"""

from __future__ import annotations

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
