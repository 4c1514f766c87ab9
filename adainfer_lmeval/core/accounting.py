"""What an early exit saved: layers and analytic FLOPs per request, summaries per task.

FLOPs are counted the honest way: the exit layers actually run, plus the exit head and
softmax at every layer where the policy was consulted (the price of deciding), plus the head
at the scored positions, plus the tokens carried on alone through the layers above the one
they were taken from (the SimLens continuation: its checks' and its exit read-out's; a filled
continuation's also the prompt's key/value projections at every layer it runs). The
full-depth reference runs every layer and the head at the scored positions only. Both use 2
FLOPs per multiply-add and ignore norms and elementwise work.
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
    kv_params: int = 0  # weights multiplied per token to fill one skipped layer's keys/values
    head_width: int = 0  # the head's input width (OPT: its word_embed_proj_dim, after project_out)
    check_vocab: int | None = None  # K of a pruned-vocabulary check (see .checks); None: full head


    @classmethod
    def from_stack(cls, stack, check_vocab: int | None = None) -> "CostModel":
        return cls(
            num_layers=stack.num_layers,
            layer_params=stack.layer_matmul_params(),
            attention_width=stack.attention_width(),
            head_params=stack.head_matmul_params(),
            vocab_size=stack.vocab_size,
            kv_params=stack.kv_matmul_params(),
            head_width=stack.head.in_features,
            check_vocab=check_vocab,
        )

    def layer_flops(self, tokens: int) -> float:
        """One decoder layer over a causal sequence of ``tokens`` tokens."""
        projections = 2 * self.layer_params * tokens
        attention = 2 * 2 * self.attention_width * tokens * (tokens + 1) / 2  # QK^T and AV
        return projections + attention

    def step_flops(self, context: int) -> float:
        """One decoder layer for one new token attending to ``context`` earlier tokens (cached)."""
        return 2 * self.layer_params + 2 * 2 * self.attention_width * (context + 1)

    def continuation_flops(self, token_layers: float, carried: int, prompt: int = 0) -> float:
        """``token_layers`` token-layers of a continuation whose carries hold ``carried`` tokens:
        each token-layer multiplies one layer's matrices for one token and attends to (at most)
        the ``carried`` tokens beside it and the ``prompt`` tokens of a filled carry, whose keys
        and values it projects at every layer run (token_layers / carried of them)
        (:mod:`.continuation`)."""
        attending = token_layers * (2 * self.layer_params + 2 * 2 * self.attention_width * (carried + prompt))
        layers_run = token_layers / carried if carried else 0.0
        return attending + layers_run * prompt * 2 * self.kv_params

    def head_flops(self, positions: int, with_softmax: bool = False) -> float:
        flops = 2 * self.head_params * positions
        if with_softmax:
            flops += SOFTMAX_FLOPS_PER_WORD * self.vocab_size * positions
        return flops

    def check_flops(self, checks: float, pruned: float = 0.0, head_rows: float | None = None,
                    vocab_free: float = 0.0) -> float:
        """``checks`` exit checks, ``pruned`` of them reading ``check_vocab`` tokens only and
        ``vocab_free`` of them no vocabulary at all (a policy reading answer options only: one
        head row per option).

        ``head_rows``: the head rows they multiplied, as counted by the checks (a first check
        picked from head clusters multiplies the centroids and the probed clusters' rows; a
        check reading answer options adds a row per option); by default the full head for a
        full check and K rows for a pruned one (the default knows no options: pass the count
        where checks read them). Softmax and top-2 run over the vocabulary for a full check
        and over K tokens for a pruned one; the softmax over a few options is elementwise work.
        """
        k = self.check_vocab or self.vocab_size
        full = checks - pruned - vocab_free
        if head_rows is None:
            head_rows = full * self.vocab_size + pruned * k
        extra = self.head_params - self.vocab_size * self.head_width  # OPT's project_out, if any
        return 2 * (head_rows * self.head_width + extra * checks) + SOFTMAX_FLOPS_PER_WORD * (full * self.vocab_size + pruned * k)

    def request(self, tokens: int, exit_layer: int, scored: int, checks: float, share: int = 1, pruned: float = 0.0,
                head_rows: float | None = None, vocab_free: float = 0.0, check_continuation: tuple[float, int, int] = (0.0, 0, 0),
                exit_continuation: tuple[int, int, int] = (0, 0, 0)) -> "ExitRecord":
        """The record of one request that ran ``exit_layer`` layers over ``tokens`` tokens.

        ``share``: requests scored off the same computed row (identical inputs, as with
        single-token answer choices) split its cost; ``checks`` is this request's part of its
        group's exit-head evaluations, ``check_continuation`` (token-layers, carried tokens, prompt
        tokens filled per layer) its part of their continuations'. ``exit_continuation`` (the same):
        the row's exit read-out off the continuation, split like the row.
        """
        row_continuation = self.continuation_flops(*exit_continuation)
        rows = (exit_layer * self.layer_flops(tokens) + self.head_flops(scored) + row_continuation) / share
        flops = rows + self.check_flops(checks, pruned, head_rows, vocab_free) + self.continuation_flops(*check_continuation)
        full = (self.num_layers * self.layer_flops(tokens) + self.head_flops(scored)) / share
        carried = check_continuation[0] + exit_continuation[0] / share
        return ExitRecord(float(exit_layer), self.num_layers, flops, full, checks, continuation_token_layers=carried)


    def generation(self, prompt_tokens: int, exit_layers: list[int], checks: list[int], pruned: list[int] | None = None,
                   head_rows: list[int] | None = None) -> "ExitRecord":
        """The record of one generation request: the prompt, then one step per generated token.

        The prompt's tokens but the last run every layer (later tokens attend to them
        everywhere). Step t feeds one token (the last prompt token, then each generated one)
        with ``prompt_tokens - 1 + t`` tokens before it in the cache: it runs its exit layer's
        layers, fills the keys/values of the layers it skipped, pays the exit head and softmax
        per check, and the head once more only when it ran to the last layer.
        """
        prefill = self.num_layers * self.layer_flops(prompt_tokens - 1) if prompt_tokens > 1 else 0.0
        flops = full = prefill
        pruned = pruned or [0] * len(checks)
        head_rows = head_rows or [None] * len(checks)
        for step, (layer, check, pruned_check, rows) in enumerate(zip(exit_layers, checks, pruned, head_rows)):
            per_layer = self.step_flops(prompt_tokens - 1 + step)
            flops += layer * per_layer + (self.num_layers - layer) * 2 * self.kv_params
            flops += self.check_flops(check, pruned_check, rows)
            # the head once more where no full check's logits could serve: at the last layer,
            # and at an exit whose check read K tokens only
            flops += self.head_flops(1) if layer == self.num_layers or pruned_check else 0.0
            full += self.num_layers * per_layer + self.head_flops(1)
        tokens = len(exit_layers)
        mean = sum(exit_layers) / tokens if tokens else float(self.num_layers)
        return ExitRecord(mean, self.num_layers, flops, full, float(sum(checks)), tokens=tokens, token_layers=tuple(exit_layers))


@dataclass
class ExitRecord:
    """How deep one request went, and what that cost against full depth."""

    layers: float  # layers run (a mean over windows for rolling loglikelihood)
    num_layers: int
    flops: float
    full_flops: float
    checks: float = 0.0  # exit-head evaluations charged to this request
    full_depth_generation: bool = False  # generated at full depth by model.generate (sampling)
    tokens: int = 0  # generated tokens (generation requests only)
    token_layers: tuple = ()  # per generated token: its exit layer
    continuation_token_layers: float = 0.0  # tokens carried on alone x layers (SimLens), this request's part

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
            tokens=sum(r.tokens for r in records),
            token_layers=tuple(layer for r in records for layer in r.token_layers),
            continuation_token_layers=sum(r.continuation_token_layers for r in records),
        )


def summarize(records: list[ExitRecord]) -> dict:
    """Per-task figures: requests, mean layers used, % layers saved, % FLOPs saved.

    For generation the unit is the generated token: mean layers, layers saved and the
    histogram count token-layers (a 40-token answer weighs 40 times a 1-token one).
    """
    if not records:
        return {"requests": 0}
    num_layers = records[0].num_layers
    per_token = [layer for r in records for layer in r.token_layers]
    units = per_token if per_token else [r.layers for r in records]
    mean_layers = sum(units) / len(units)
    flops = sum(r.flops for r in records)
    full = sum(r.full_flops for r in records)
    histogram: dict[str, int] = {}
    for layers in units:
        key = str(int(layers)) if float(layers).is_integer() else f"{layers:.2f}"
        histogram[key] = histogram.get(key, 0) + 1
    summary = {
        "requests": len(records),
        "num_layers": num_layers,
        "mean_layers": mean_layers,
        "layers_saved_pct": 100.0 * (1.0 - mean_layers / num_layers),
        "flops_saved_pct": 100.0 * (1.0 - flops / full) if full else 0.0,
        "exit_layer_histogram": dict(sorted(histogram.items(), key=lambda kv: float(kv[0]))),
        "full_depth_generation": any(r.full_depth_generation for r in records),
    }
    if per_token:
        summary["generated_tokens"] = len(per_token)
    return summary
