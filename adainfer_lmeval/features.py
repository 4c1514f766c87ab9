"""Per-layer exit features, read off the exit logits at the decision position.

The paper's features are the top probability p1 and the gap p1 - p2 of the softmax over the
full vocabulary; entropy, the cosine similarity of consecutive hidden states and the relative
depth are the extra ones its ablation weighs. Only the features a policy asks for are computed.
"""

from __future__ import annotations

import torch

FEATURE_NAMES = ("p1", "gap", "entropy", "cosine", "depth")


def compute_features(
    names: tuple[str, ...],
    logits: torch.Tensor,
    hidden: torch.Tensor,
    previous_hidden: torch.Tensor | None,
    layer: int,
    num_layers: int,
) -> torch.Tensor:
    """Features ``names`` for each row: a float32 tensor [rows, len(names)].

    ``logits`` are the exit logits [rows, vocab]; ``hidden``/``previous_hidden`` the hidden
    states of this layer and the one before at the decision position [rows, hidden].
    """
    probs = torch.softmax(logits.float(), dim=-1)
    columns = []
    top2 = None
    for name in names:
        if name in ("p1", "gap"):
            if top2 is None:
                top2 = probs.topk(2, dim=-1).values
            columns.append(top2[:, 0] if name == "p1" else top2[:, 0] - top2[:, 1])
        elif name == "entropy":
            columns.append(-(probs * torch.log(probs.clamp_min(1e-30))).sum(-1))
        elif name == "cosine":
            if previous_hidden is None:
                columns.append(torch.zeros(len(probs), device=probs.device))
            else:
                columns.append(
                    torch.nn.functional.cosine_similarity(hidden.float(), previous_hidden.float(), dim=-1)
                )
        elif name == "depth":
            columns.append(torch.full((len(probs),), layer / num_layers, device=probs.device))
        else:
            raise KeyError(f"unknown exit feature {name!r}; known: {', '.join(FEATURE_NAMES)}")
    return torch.stack(columns, dim=-1)
