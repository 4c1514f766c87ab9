"""Early exit while generating: each new token stops at its own layer, the KV cache stays whole.

Knows nothing of lm-eval. Greedy decoding over a left-padded batch, as ``model.generate``
does it, with one difference: the token at each step runs layers one at a time and the exit
policy, consulted at that token's position, may stop it; its next-token logits then come
from that layer (final norm + head), exactly as for loglikelihood requests.

The catch (and why re-implementations of AdaInfer score 0 on GSM8K): later tokens attend
to this token at *every* layer, including the ones it skipped. Here the skipped layers' keys
and values are filled by CALM's state propagation (Schuster et al., 2022): the exit hidden
state goes through each skipped layer's input norm and K/V projections (and rotary
embedding), and nothing else of the layer runs. That costs 2·d·d_kv weights per skipped
layer, a few percent of a layer; recomputing the skipped layers properly would cost the
layers themselves and save nothing.

Generated tokens have no answer options, so a policy reading the option signals (``margin``,
...) is refused here, and so is one reading or answering off the SimLens continuation
(``simlens``: it is defined over a loglikelihood group's scored positions, not per generated
token); the others read their signals at each step's token.

The prompt runs at full depth except its last token: all prompt tokens but the last are
attended to by every later token at every layer. The last prompt token is the first step,
and its exit decides the first generated token like any other step.

Rows that exit leave the step's batch (the layers after run on the others only); rows that
finish (end-of-sequence token, or the caller's ``finished`` check, e.g. a stop string) leave
the generation, and get the pad token from then on, as in ``model.generate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from adainfer_lmeval.core.engine import EarlyExitEngine
from adainfer_lmeval.core.features import continuation_signals, option_signals
from adainfer_lmeval.core.kv_cache import RowCache
from adainfer_lmeval.errors import AdaInferError


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [rows, prompt width + steps]: the prompt, then the tokens, pad after a row ends
    exit_layers: list[list[int]]  # per row, per generated token: the layer its logits came from
    checks: list[list[int]]  # per row, per generated token: exit-head evaluations made for it
    pruned_checks: list[list[int]]  # per row, per generated token: of those, over K tokens only
    check_rows: list[list[int]]  # per row, per generated token: head rows its checks multiplied (check head rows)
    prompt_lengths: list[int]  # real (unpadded) prompt tokens per row


def refuse_loglikelihood_only(policy) -> None:
    """Generation has no answer options and no continuation read-out: a policy reading option
    or continuation signals, or reading its answer off the continuation, cannot run here."""
    continued = continuation_signals(policy.features)
    if continued:
        raise AdaInferError(
            f"policy={policy.name} reads the SimLens continuation ({', '.join(continued)}), defined over a loglikelihood "
            "group's answer options, not per generated token: generate_until tasks cannot use it; use threshold or static"
        )
    if policy.exit_readout == "continuation":
        raise AdaInferError(
            f"policy={policy.name} answers off the SimLens continuation (readout=continuation), which carries a "
            "loglikelihood request's scored positions, not generated tokens: generate_until tasks cannot use it; "
            "drop readout=continuation"
        )
    reads = option_signals(policy.features)
    if reads:
        raise AdaInferError(
            f"policy={policy.name} reads answer options ({', '.join(reads)}); generate_until tasks have none: "
            "use threshold or static"
        )


class EarlyExitGenerator:
    """Generation with ``engine``'s model, policy and exit checks (read from it at each step)."""

    def __init__(self, engine: EarlyExitEngine):
        self.engine = engine

    @property
    def stack(self):
        return self.engine.stack

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        max_new_tokens: int,
        eos_token_ids: Iterable[int] = (),
        pad_token_id: int = 0,
        finished: Callable[[list[int]], bool] | None = None,
    ) -> GenerationOutput:
        """Greedy generation of up to ``max_new_tokens`` per row of a left-padded batch.

        ``finished(tokens_so_far)``: the caller's per-row stop check (stop strings); a row also
        ends at any of ``eos_token_ids``.
        """
        refuse_loglikelihood_only(self.engine.policy)
        stack = self.stack
        rows, width = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # Slot s of a row holds a real token when the mask says so (prompt) or s >= width
        # (generated; rows that ended are never read again).
        valid = torch.ones(rows, width + max_new_tokens, dtype=torch.bool, device=device)
        valid[:, :width] = attention_mask.bool()
        # Positions as model.generate computes them: real tokens counted, padding at 1.
        positions = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 1)
        cache = RowCache(stack.num_layers, rows, width + max_new_tokens)
        eos = set(int(t) for t in eos_token_ids)

        if width > 1:  # every prompt token but the last, at full depth, into the cache
            hidden = stack.embed(input_ids[:, : width - 1], positions[:, : width - 1])
            inputs = stack.cached_layer_inputs(hidden, positions[:, : width - 1], 0, valid[:, : width - 1])
            cache.at(0)
            for index in range(stack.num_layers):
                hidden = stack.run_layer(index, hidden, inputs, cache)

        generated: list[list[int]] = [[] for _ in range(rows)]
        exit_layers: list[list[int]] = [[] for _ in range(rows)]
        checks: list[list[int]] = [[] for _ in range(rows)]
        pruned_checks: list[list[int]] = [[] for _ in range(rows)]
        check_head_rows: list[list[int]] = [[] for _ in range(rows)]
        current = input_ids[:, width - 1].clone()
        running = torch.arange(rows, device=device)
        for step in range(max_new_tokens):
            slot = width - 1 + step
            logits, layers, counts, pruned_counts, head_row_counts = self._step(current[running], running, slot, positions, valid, cache)
            tokens = logits.argmax(-1)
            current[running] = tokens
            still = []
            # One host copy per step for all rows: reading tokens[k] one by one would sync a GPU per row.
            for k, (row, token) in enumerate(zip(running.tolist(), tokens.tolist())):
                generated[row].append(token)
                exit_layers[row].append(layers[k])
                checks[row].append(counts[k])
                pruned_checks[row].append(pruned_counts[k])
                check_head_rows[row].append(head_row_counts[k])
                done = token in eos or (finished is not None and finished(generated[row]))
                still.append(not done)
            running = running[torch.tensor(still, dtype=torch.bool, device=device)]
            if running.numel() == 0:
                break

        steps = max(len(g) for g in generated)
        sequences = torch.full((rows, width + steps), pad_token_id, dtype=input_ids.dtype, device=device)
        sequences[:, :width] = input_ids
        for row, tokens in enumerate(generated):
            sequences[row, width : width + len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
        prompt_lengths = attention_mask.long().sum(-1).tolist()
        return GenerationOutput(sequences, exit_layers, checks, pruned_checks, check_head_rows, prompt_lengths)

    def _step(self, tokens, rows, slot, positions, valid, cache):
        """One token per row in ``rows`` at cache slot ``slot``: (logits [n, vocab], exit layers, checks)."""
        stack = self.stack
        num_layers = stack.num_layers
        n = tokens.shape[0]
        step_positions = positions[rows, slot : slot + 1]
        hidden = stack.embed(tokens.unsqueeze(1), step_positions)
        inputs = stack.cached_layer_inputs(hidden, step_positions, slot, valid[rows, : slot + 1])

        logits = torch.empty(n, stack.vocab_size, device=tokens.device)
        exit_layers = [num_layers] * n
        step = self.engine.exit_step(n, tokens.device)
        alive = torch.arange(n, device=tokens.device)  # step rows still running layers
        step.remember(hidden[:, -1], alive)  # layer 1 compares against the embeddings (layer 0)

        for layer in range(1, num_layers + 1):
            hidden = stack.run_layer(layer - 1, hidden, inputs, cache.at(slot, rows[alive]))
            state = hidden[:, -1]
            if layer == num_layers:
                logits[alive] = stack.exit_logits(state).to(logits.dtype)
                break
            if not step.consults_at(layer):
                step.remember(state, alive)
                continue
            stop, check_logits = step.decide(layer, state, alive)
            if not bool(stop.any()):
                continue
            leaving = alive[stop]
            exit_logits = check_logits[stop] if check_logits is not None else stack.exit_logits(state[stop])
            logits[leaving] = exit_logits.to(logits.dtype)
            for k in leaving.tolist():
                exit_layers[k] = layer
            # CALM state propagation: the exit state fills the keys/values of layers layer+1..L.
            leaving_inputs = inputs.select(stop)
            cache.at(slot, rows[leaving])
            for index in range(layer, num_layers):
                stack.fill_kv(index, hidden[stop], leaving_inputs, cache)
            keep = ~stop
            if not bool(keep.any()):
                break
            hidden, alive, inputs = hidden[keep], alive[keep], inputs.select(keep)
        checks, pruned_checks, check_head_rows, *_ = step.counts()  # no options here: no options-only checks, no continuation
        return logits, exit_layers, checks, pruned_checks, check_head_rows
