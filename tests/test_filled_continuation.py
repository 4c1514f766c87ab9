"""The filled continuation (experiments.filled_continuation) against references: the model's own
layers run over the whole row with the prompt held at the start layer's states, and, from layer
L-1, the full forward itself."""

from __future__ import annotations

import pytest
import torch

from adainfer_lmeval.core.architectures import DecoderStack
from adainfer_lmeval.experiments.filled_continuation import filled_carry

from conftest import ARCHITECTURES


def _states(stack, ids):
    hidden = stack.embed(ids)
    inputs = stack.layer_inputs(hidden)
    states = [hidden]
    for index in range(stack.num_layers):
        hidden = stack.run_layer(index, hidden, inputs)
        states.append(hidden)
    return states, inputs


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_filled_carries_equal_the_layers_run_with_the_prompt_held_at_the_start_layer(tiny_models, arch):
    stack = DecoderStack(tiny_models[arch])
    ids = torch.randint(4, stack.vocab_size, (1, 11), generator=torch.Generator().manual_seed(3))
    decision = 7
    with torch.no_grad():
        states, inputs = _states(stack, ids)
        starts = list(range(1, stack.num_layers))
        carried = filled_carry(stack, states, decision, starts)
        for b, start in enumerate(starts):
            held = states[start]
            x = held.clone()
            for index in range(start, stack.num_layers):  # whole row; positions < decision reset to layer `start`
                out = stack.run_layer(index, x, inputs)
                x = held.clone()
                x[:, decision:] = out[:, decision:]
            torch.testing.assert_close(carried[b], x[0, decision:], atol=1e-5, rtol=1e-5)
        # from layer L-1 the prompt's states at L-1 are exact: the full forward
        last = filled_carry(stack, states, decision, [stack.num_layers - 1])
        torch.testing.assert_close(last[0], states[-1][0, decision:], atol=1e-5, rtol=1e-5)


def test_the_read_out_from_layer_L_minus_1_is_full_depth_and_nothing_is_read_below_the_first_carry(tiny_models):
    from adainfer_lmeval.experiments.collect import Example
    from adainfer_lmeval.experiments.filled_continuation import trace_filled

    stack = DecoderStack(tiny_models["llama"])
    prompt = torch.randint(4, stack.vocab_size, (6,), generator=torch.Generator().manual_seed(4)).tolist()
    options = [[5, 9, 7], [5, 8]]  # a shared first token: the margin is read one position on
    example = Example(task="t", doc_id=0, num_fewshot=0, rows=[prompt + o[:-1] for o in options],
                      decision=[len(prompt) - 1] * 2, continuations=options, gold=0)
    L = stack.num_layers
    logits, lls = trace_filled(stack, example, from_layer=L - 1)
    torch.testing.assert_close(torch.tensor(lls[L - 2]), torch.tensor(lls[L - 1]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(logits[L - 2]), torch.tensor(logits[L - 1]), atol=1e-4, rtol=1e-4)
    assert all(torch.tensor(lls[layer]).isnan().all() and torch.tensor(logits[layer]).isnan().all() for layer in range(L - 2))
    assert len(set(logits[L - 1])) == 2  # two options' different tokens at the margin position
