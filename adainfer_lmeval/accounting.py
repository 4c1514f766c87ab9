"""What an early exit saved: layers and analytic FLOPs per request, summaries per task.

FLOPs are counted the honest way: the exit layers actually run, plus the exit head and
softmax at every layer where the policy was consulted (the price of deciding), plus the head
at the scored positions. The full-depth reference runs every layer and the head at the scored
positions only. Both use 2 FLOPs per multiply-add and ignore norms and elementwise work.
"""

from __future__ import annotations

from dataclasses import dataclass

SOFTMAX_FLOPS_PER_WORD = 5  # exp, sum, divide, and a top-2 scan over the vocabulary


@dataclass(frozen=True)
class CostModel:
    num_layers: int
    layer_params: int  # weights multiplied per token per layer
    attention_width: int  # heads × head_dim
    head_params: int  # weights multiplied per position by the exit head
    vocab_size: int

    @classmethod
    def from_stack(cls, stack) -> "CostModel":
        return cls(
            num_layers=stack.num_layers,
            layer_params=stack.layer_matmul_params(),
            attention_width=stack.attention_width(),
            head_params=stack.head_matmul_params(),
            vocab_size=stack.vocab_size,
        )

    def layer_flops(self, tokens: int) -> float:
        """One decoder layer over a causal sequence of ``tokens`` tokens."""
        projections = 2 * self.layer_params * tokens
        attention = 2 * 2 * self.attention_width * tokens * (tokens + 1) / 2  # QK^T and AV
        return projections + attention

    def head_flops(self, positions: int, with_softmax: bool = False) -> float:
        flops = 2 * self.head_params * positions
        if with_softmax:
            flops += SOFTMAX_FLOPS_PER_WORD * self.vocab_size * positions
        return flops

    def request(self, tokens: int, exit_layer: int, scored: int, checks: float, share: int = 1) -> "ExitRecord":
        """The record of one request that ran ``exit_layer`` layers over ``tokens`` tokens.

        ``share``: requests scored off the same computed row (identical inputs, as with
        single-token answer choices) split its cost; ``checks`` is this request's part of its
        group's exit-head evaluations.
        """
        rows = (exit_layer * self.layer_flops(tokens) + self.head_flops(scored)) / share
        flops = rows + self.head_flops(1, with_softmax=True) * checks
        full = (self.num_layers * self.layer_flops(tokens) + self.head_flops(scored)) / share
        return ExitRecord(float(exit_layer), self.num_layers, flops, full, checks)


@dataclass
class ExitRecord:
    """How deep one request went, and what that cost against full depth."""

    layers: float  # layers run (a mean over windows for rolling loglikelihood)
    num_layers: int
    flops: float
    full_flops: float
    checks: float = 0.0  # exit-head evaluations charged to this request
    full_depth_generation: bool = False  # generated at full depth (no early exit yet)

    @staticmethod
    def merge(records: list["ExitRecord"]) -> "ExitRecord":
        """One record for a request made of several forward passes (rolling windows)."""
        return ExitRecord(
            layers=sum(r.layers for r in records) / len(records),
            num_layers=records[0].num_layers,
            flops=sum(r.flops for r in records),
            full_flops=sum(r.full_flops for r in records),
            checks=sum(r.checks for r in records),
            full_depth_generation=any(r.full_depth_generation for r in records),
        )


def summarize(records: list[ExitRecord]) -> dict:
    """Per-task figures: requests, mean layers used, % layers saved, % FLOPs saved."""
    if not records:
        return {"requests": 0}
    num_layers = records[0].num_layers
    mean_layers = sum(r.layers for r in records) / len(records)
    flops = sum(r.flops for r in records)
    full = sum(r.full_flops for r in records)
    histogram: dict[str, int] = {}
    for r in records:
        key = str(int(r.layers)) if float(r.layers).is_integer() else f"{r.layers:.2f}"
        histogram[key] = histogram.get(key, 0) + 1
    return {
        "requests": len(records),
        "num_layers": num_layers,
        "mean_layers": mean_layers,
        "layers_saved_pct": 100.0 * (1.0 - mean_layers / num_layers),
        "flops_saved_pct": 100.0 * (1.0 - flops / full) if full else 0.0,
        "exit_layer_histogram": dict(sorted(histogram.items(), key=lambda kv: float(kv[0]))),
        "full_depth_generation": any(r.full_depth_generation for r in records),
    }
