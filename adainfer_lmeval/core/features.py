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
    # p1 and gap need only the top two logits and the log-partition: a full-vocabulary
    # softmax per check would materialise [rows, vocab] probabilities for two numbers.
    logits = logits.float()
    rows = len(logits)
    log_z = None
    top2 = None
    columns = []
    for name in names:
        if name in ("p1", "gap", "entropy") and log_z is None:
            log_z = torch.logsumexp(logits, dim=-1)
        if name in ("p1", "gap"):
            if top2 is None:
                top2 = torch.exp(logits.topk(2, dim=-1).values - log_z[:, None])
            columns.append(top2[:, 0] if name == "p1" else top2[:, 0] - top2[:, 1])
        elif name == "entropy":
            # H = log Z - E_p[logit]; the softmax is formed only for the policies that ask.
            probs = torch.exp(logits - log_z[:, None])
            columns.append(log_z - (probs * logits).sum(-1))
        elif name == "cosine":
            if previous_hidden is None:
                columns.append(torch.zeros(rows, device=logits.device))
            else:
                columns.append(
                    torch.nn.functional.cosine_similarity(hidden.float(), previous_hidden.float(), dim=-1)
                )
        elif name == "depth":
            columns.append(torch.full((rows,), layer / num_layers, device=logits.device))
        else:
            raise KeyError(f"unknown exit feature {name!r}; known: {', '.join(FEATURE_NAMES)}")
    return torch.stack(columns, dim=-1)
