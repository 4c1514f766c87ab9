"""The SimLens continuation read-out (DecoderStack.continue_from) against the model's own forward.

References: carrying *every* token on from layer k reproduces the full forward (nothing was
left out); carrying a subset from layer 0 is the model's forward over just those tokens at
their original positions (what "alone" means).
"""

from __future__ import annotations

import pytest
import torch

from adainfer_lmeval.core.architectures import DecoderStack

from conftest import ARCHITECTURES


def _ids(vocab: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (2, length), generator=g)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_carrying_every_token_from_layer_k_is_the_full_forward(tiny_models, arch):
    model = tiny_models[arch]
    stack = DecoderStack(model)
    ids = _ids(stack.vocab_size, 10)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        positions = torch.arange(10).expand(2, -1)
        for k in range(stack.num_layers):  # hidden_states[L] is already through the final norm
            final = stack.continue_from(k, out.hidden_states[k], positions)
            torch.testing.assert_close(stack.exit_logits(final), out.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_subset_carried_from_layer_0_is_the_forward_over_that_subset(tiny_models, arch):
    model = tiny_models[arch]
    stack = DecoderStack(model)
    ids = _ids(stack.vocab_size, 12, seed=1)
    # the start token and a few later positions, within the tiny models' sliding window (6)
    keep = torch.tensor([[0, 4, 5], [0, 2, 3]])
    picked = torch.gather(ids, 1, keep)
    with torch.no_grad():
        reference = model(picked, position_ids=keep).logits
        hidden = stack.embed(picked, positions=keep)
        final = stack.continue_from(0, hidden, keep)
    torch.testing.assert_close(stack.exit_logits(final), reference, atol=1e-4, rtol=1e-4)


def test_sliding_windows_count_the_original_positions(tiny_models):
    """Mistral slides every layer (window 6): the start token, 7 positions before the carried
    answer tokens, is outside their window, so carrying it changes nothing for them."""
    stack = DecoderStack(tiny_models["mistral"])
    ids = _ids(stack.vocab_size, 12, seed=2)
    with torch.no_grad():
        hidden = stack.embed(ids)
        for layer in range(2):
            hidden = stack.run_layer(layer, hidden, stack.layer_inputs(hidden))
        keep = torch.tensor([[0, 7, 8]] * 2)
        carried = torch.gather(hidden, 1, keep[..., None].expand(-1, -1, hidden.shape[-1]))
        with_start = stack.continue_from(2, carried, keep)
        without = stack.continue_from(2, carried[:, 1:], keep[:, 1:])
    torch.testing.assert_close(with_start[:, 1:], without, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_carry_pads_without_changing_a_row(tiny_models, arch):
    """Two rows carried together (spans of different lengths, so one is padded) read what each
    reads carried alone; the row's span is its token 0 and positions first..last."""
    from adainfer_lmeval.core.continuation import carry

    stack = DecoderStack(tiny_models[arch])
    ids = _ids(stack.vocab_size, 12, seed=3)
    with torch.no_grad():
        hidden = tiny_models[arch](ids, output_hidden_states=True).hidden_states[2]
        both = carry(stack, 2, hidden, first=[5, 8], last=[9, 8])
        alone = [carry(stack, 2, hidden[i : i + 1], first=[f], last=[l]) for i, (f, l) in enumerate([(5, 9), (8, 8)])]
        manual = stack.continue_from(2, hidden[:1, [0, 5, 6, 7, 8, 9]], torch.tensor([[0, 5, 6, 7, 8, 9]]))
    torch.testing.assert_close(both.span(0, 5), alone[0].span(0, 5))
    torch.testing.assert_close(both.span(1, 1), alone[1].span(0, 1))
    torch.testing.assert_close(both.span(0, 5), manual[0, 1:])
    torch.testing.assert_close(both.at(torch.tensor([4, 0])), torch.stack([manual[0, 5], alone[1].span(0, 1)[0]]))
    assert both.token_layers == [6 * 2, 2 * 2]  # carried tokens (padding not counted) x 2 remaining layers


def test_carry_of_chosen_rows_is_the_carry_of_those_rows_alone(tiny_models):
    """``rows=`` carries some rows of a batch's states (what the engine passes for its speakers
    and its stopping rows) as carrying those rows sliced out would, in the order given."""
    from adainfer_lmeval.core.continuation import carry

    stack = DecoderStack(tiny_models["llama"])
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(4, stack.vocab_size, (3, 10), generator=g)
    with torch.no_grad():
        hidden = tiny_models["llama"](ids, output_hidden_states=True).hidden_states[1]
        chosen = carry(stack, 1, hidden, first=[6, 3], last=[8, 3], rows=torch.tensor([2, 0]))
        sliced = carry(stack, 1, hidden[[2, 0]], first=[6, 3], last=[8, 3])
    torch.testing.assert_close(chosen.states, sliced.states)
    assert chosen.tokens == sliced.tokens == [4, 2]
    # and the rows were not all the same (the test would pass for any row order otherwise)
    assert not torch.allclose(chosen.span(0, 1), carry(stack, 1, hidden[[0]], first=[6], last=[8]).span(0, 1))
