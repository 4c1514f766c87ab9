"""Per-token early exit while generating, against references built without the KV cache."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

from adainfer_lmeval.core.architectures import DecoderStack
from adainfer_lmeval.core.exit_checks import ExitCheckConfig
from adainfer_lmeval.core.engine import EarlyExitEngine
from adainfer_lmeval.core.generation import EarlyExitGenerator
from adainfer_lmeval.policies import ExitPolicy, build_policy

from conftest import ARCHITECTURES


def _left_padded(vocab: int, seed: int = 0, rows: int = 3, width: int = 9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, rows):
        mask[row, : 2 * row + 1] = 0  # rows of different lengths, padded on the left
    return ids.masked_fill(mask == 0, 0), mask


def _generator(model, policy):
    return EarlyExitGenerator(EarlyExitEngine(model, policy))


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("rows", [1, 3])
def test_full_depth_equals_model_generate(tiny_models, arch, rows):
    model = tiny_models[arch]
    ids, mask = _left_padded(model.config.vocab_size, rows=rows)
    out = _generator(model, build_policy("full", {})).generate(ids, mask, 12, pad_token_id=0)
    reference = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    assert torch.equal(out.sequences, reference)
    assert all(layers == [4] * 12 for layers in out.exit_layers)
    assert all(c == [0] * 12 for c in out.checks)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_full_depth_equals_model_generate_with_eager_attention(tiny_model_dirs, arch):
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch], attn_implementation="eager").eval()
    ids, mask = _left_padded(model.config.vocab_size, seed=1)
    out = _generator(model, build_policy("full", {})).generate(ids, mask, 10, pad_token_id=0)
    reference = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    assert torch.equal(out.sequences, reference)


def _truncated(model, layers: int):
    """The model with only its first ``layers`` decoder layers (its own norm and head on top)."""
    short = copy.deepcopy(model)
    stack = DecoderStack(short)
    del stack.layers[layers:]
    short.config.num_hidden_layers = layers
    if getattr(short.config, "layer_types", None):
        short.config.layer_types = short.config.layer_types[:layers]
    return short


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2", "opt"])
def test_static_exit_generates_what_the_truncated_model_generates(tiny_models, arch):
    """Every token exits at layer 2: the text is the greedy text of the 2-layer model."""
    model = tiny_models[arch]
    ids, mask = _left_padded(model.config.vocab_size, seed=2)
    out = _generator(model, build_policy("static", {"layer": 2})).generate(ids, mask, 10, pad_token_id=0)
    reference = _truncated(model, 2).generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    assert torch.equal(out.sequences, reference)
    assert all(layers == [2] * 10 for layers in out.exit_layers)


def _calm_reference_logits(model, tokens: list[int], exits: list[int]) -> torch.Tensor:
    """Next-token logits of the last token, recomputed from scratch without a cache.

    ``exits[j]``: the layer token j exited at. CALM's state propagation means: from its exit
    on, a token's hidden state stays frozen; later layers still project it to keys and values
    (for the tokens after it) but its own output there is discarded.
    """
    stack = DecoderStack(model)
    with torch.no_grad():
        hidden = stack.embed(torch.tensor([tokens]))
        inputs = stack.layer_inputs(hidden)
        frozen = torch.tensor(exits)
        for layer in range(1, stack.num_layers + 1):
            new = stack.run_layer(layer - 1, hidden, inputs)
            keep = (frozen < layer).view(1, -1, 1)
            hidden = torch.where(keep, hidden, new)
            if layer == exits[-1]:
                return stack.exit_logits(hidden[0, -1])
    raise AssertionError("exit layer beyond the model's depth")


def _threshold_between(model, ids, mask) -> float:
    """A gap threshold at which the tokens of this generation exit at different layers."""
    class Recorder(ExitPolicy):
        features = ("gap",)
        seen: list = []

        def decide(self, layer, num_layers, history):
            self.seen.append(history[:, layer, 0])
            return torch.zeros(history.shape[0], dtype=torch.bool)

    recorder = Recorder()
    recorder.seen = []
    _generator(model, recorder).generate(ids, mask, 8, pad_token_id=0)
    gaps = torch.cat(recorder.seen).sort().values
    return float(gaps[len(gaps) // 2 - 1] + gaps[len(gaps) // 2]) / 2


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_mixed_exits_match_a_cache_free_calm_reference(tiny_models, arch):
    """Tokens exit at different layers; each one's token equals the cache-free recomputation."""
    model = tiny_models[arch]
    ids, mask = _left_padded(model.config.vocab_size, seed=3)
    tau = _threshold_between(model, ids, mask)
    out = _generator(model, build_policy("threshold", {"gap": tau, "min_layer": 1})).generate(ids, mask, 8, pad_token_id=0)
    all_exits = [layer for layers in out.exit_layers for layer in layers]
    assert len(set(all_exits)) > 1, "the threshold should spread exits over layers"
    assert min(all_exits) < 4
    width = ids.shape[1]
    for row in range(ids.shape[0]):
        prompt = ids[row][mask[row].bool()].tolist()
        generated = out.sequences[row, width:].tolist()
        exits = out.exit_layers[row]
        for step, token in enumerate(generated):
            tokens = prompt + generated[:step]
            # prompt tokens ran every layer; the last prompt token and each generated one exited
            per_token = [4] * (len(prompt) - 1) + exits[: step + 1]
            logits = _calm_reference_logits(model, tokens, per_token)
            assert int(logits.argmax()) == token, f"row {row} step {step}"


def test_rows_end_at_eos_and_at_the_callers_stop_check(tiny_models):
    model = tiny_models["llama"]
    ids, mask = _left_padded(model.config.vocab_size, seed=4)
    free = _generator(model, build_policy("full", {})).generate(ids, mask, 10, pad_token_id=0)
    width = ids.shape[1]
    eos = int(free.sequences[0, width + 2])  # row 0's third token plays end-of-sequence
    out = _generator(model, build_policy("full", {})).generate(
        ids, mask, 10, eos_token_ids=[eos], pad_token_id=0, finished=lambda tokens: len(tokens) >= 5
    )
    reference = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=eos
    )
    for row in range(ids.shape[0]):
        ours = out.sequences[row, width:].tolist()
        theirs = reference[row, width:].tolist()
        n = len(out.exit_layers[row])
        assert n <= 5 and ours[:n] == theirs[:n]
        assert all(t == 0 for t in ours[n:]), "pad after a row ends"
        ended_at_eos = theirs[:n][-1] == eos
        assert ended_at_eos or n == 5
    assert len(out.exit_layers[0]) == 3  # row 0 stops at its end-of-sequence token


def test_token_oracle_layers_follow_the_lens_of_the_full_forward(tiny_models):
    from adainfer_lmeval.experiments.generation_oracle import token_oracle_layers
    from adainfer_lmeval.experiments.oracle import oracle_layer

    model = tiny_models["qwen2"]
    ids, mask = _left_padded(model.config.vocab_size, seed=5)
    out = _generator(model, build_policy("full", {})).generate(ids, mask, 6, pad_token_id=0)
    width = ids.shape[1]
    prompts = [ids[r][mask[r].bool()].tolist() for r in range(ids.shape[0])]
    generations = [out.sequences[r, width:].tolist() for r in range(ids.shape[0])]
    layers = token_oracle_layers(EarlyExitEngine(model, build_policy("full", {})), prompts, generations, "cpu")
    stack = DecoderStack(model)
    for prompt, generated, per_token in zip(prompts, generations, layers):
        with torch.no_grad():
            hidden = model(torch.tensor([prompt + generated[:-1]]), output_hidden_states=True).hidden_states
        for t, token in enumerate(generated):
            position = len(prompt) - 1 + t
            tops = [int(stack.exit_logits(hidden[layer][0, position]).argmax()) for layer in range(1, 4)]
            tops.append(token)  # the last layer's top-1 is the generated token
            assert per_token[t] == oracle_layer(tops)


def test_pruned_vocabulary_checks_while_generating(tiny_models):
    model = tiny_models["llama"]
    ids, mask = _left_padded(model.config.vocab_size, seed=6)
    tau = _threshold_between(model, ids, mask)
    policy = build_policy("threshold", {"gap": tau, "min_layer": 1})
    out = EarlyExitGenerator(EarlyExitEngine(model, policy, checks=ExitCheckConfig(vocab=8))).generate(ids, mask, 8, pad_token_id=0)
    for layers, checks, pruned in zip(out.exit_layers, out.checks, out.pruned_checks):
        for layer, check, pruned_check in zip(layers, checks, pruned):
            assert check == min(layer, 3) and pruned_check == check - 1  # only a token's first check is full
    # each token is still the argmax of its exit layer's full-vocabulary lens (CALM reference)
    width = ids.shape[1]
    for row in range(ids.shape[0]):
        prompt = ids[row][mask[row].bool()].tolist()
        generated = out.sequences[row, width:].tolist()
        for step, token in enumerate(generated):
            per_token = [4] * (len(prompt) - 1) + out.exit_layers[row][: step + 1]
            assert int(_calm_reference_logits(model, prompt + generated[:step], per_token).argmax()) == token


def test_cost_ratios_command(tiny_model_dirs, tiny_models, capsys):
    from adainfer_lmeval.experiments import costs

    assert costs.main([str(tiny_model_dirs["llama"])]) == 0
    stack = DecoderStack(tiny_models["llama"])
    out = capsys.readouterr().out
    assert f"head {stack.head_matmul_params():,} ({stack.head_matmul_params() / stack.layer_matmul_params():.1f}x a layer)" in out
    assert f"K/V fill of a skipped layer {stack.kv_matmul_params():,}" in out


def test_generator_reads_policy_and_checks_from_its_engine(tiny_models):
    """A policy swapped on the engine (as gpu_check does) is the one the generator consults."""
    model = tiny_models["llama"]
    ids, mask = _left_padded(model.config.vocab_size, seed=7)
    engine = EarlyExitEngine(model, build_policy("full", {}), checks=ExitCheckConfig(vocab=8))
    generator = EarlyExitGenerator(engine)
    swapped = build_policy("static", {"layer": 2})
    swapped.bind(engine.stack.identity())
    engine.policy = swapped
    out = generator.generate(ids, mask, 3, pad_token_id=0)
    assert out.exit_layers == [[2, 2, 2]] * ids.shape[0]
    assert out.checks == [[0, 0, 0]] * ids.shape[0]  # a static policy reads no features
