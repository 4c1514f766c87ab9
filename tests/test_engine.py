"""The early-exit engine against the model's own forward, for every supported architecture."""

from __future__ import annotations

import pytest
import torch

from adainfer_lmeval.core.architectures import DecoderStack
from adainfer_lmeval.core.exit_checks import ExitCheckConfig
from adainfer_lmeval.core.engine import EarlyExitEngine, ExitBatch
from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.policies import ExitPolicy, build_policy

from conftest import ARCHITECTURES


def _rows(seed: int, count: int, vocab: int, low: int = 5, high: int = 20) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=g).tolist()
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]


class Recorder(ExitPolicy):
    """Consults every layer, never stops, and keeps the features it saw."""

    features = ("p1", "gap")

    def __init__(self):
        self.seen = {}

    def decide(self, layer, num_layers, history):
        self.seen[layer] = history[:, layer].clone()
        return torch.zeros(history.shape[0], dtype=torch.bool)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_full_depth_equals_model_forward(tiny_models, arch):
    model = tiny_models[arch]
    rows = _rows(0, 5, model.config.vocab_size)
    engine = EarlyExitEngine(model, build_policy("full", {}))
    out = engine.run(ExitBatch.from_rows(rows, [0] * len(rows)))
    for row, logits in zip(rows, out.logits):
        with torch.no_grad():
            reference = model(torch.tensor([row])).logits[0]
        torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    assert out.exit_layers == [engine.num_layers] * len(rows)
    assert out.checks == [0] * len(rows)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("layer", [1, 2, 3])
def test_static_exit_equals_lens_on_hidden_state(tiny_models, arch, layer):
    model = tiny_models[arch]
    row = _rows(1, 1, model.config.vocab_size)[0]
    out = EarlyExitEngine(model, build_policy("static", {"layer": layer})).run(ExitBatch.from_rows([row], [3]))
    with torch.no_grad():
        hidden = model(torch.tensor([row]), output_hidden_states=True).hidden_states[layer][0]
        reference = DecoderStack(model).exit_logits(hidden[3:])
    assert out.exit_layers == [layer]
    torch.testing.assert_close(out.logits[0], reference, atol=1e-5, rtol=1e-5)


def _mixed_threshold(model, rows, decisions):
    """A gap threshold under which rows of this batch exit at different layers."""
    recorder = Recorder()
    EarlyExitEngine(model, recorder).run(ExitBatch.from_rows(rows, decisions))
    gaps = torch.stack([recorder.seen[layer] for layer in sorted(recorder.seen)], dim=1)[:, :, 1]  # the gap column
    best = gaps.max(dim=1).values.sort().values
    middle = len(best) // 2
    # Halfway between two rows' best gaps: no row sits on the threshold, where batched and
    # unbatched float noise could decide differently.
    return float(best[middle - 1] + best[middle]) / 2


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_padded_batch_matches_batch_of_one(tiny_models, arch):
    model = tiny_models[arch]
    rows = _rows(2, 8, model.config.vocab_size)
    decisions = [len(r) - 1 - (i % 3) for i, r in enumerate(rows)]
    tau = _mixed_threshold(model, rows, decisions)
    engine = EarlyExitEngine(model, build_policy("threshold", {"gap": tau, "min_layer": 1}))
    batched = engine.run(ExitBatch.from_rows(rows, decisions))
    singles = [engine.run(ExitBatch.from_rows([r], [d])) for r, d in zip(rows, decisions)]
    assert batched.exit_layers == [s.exit_layers[0] for s in singles]
    assert len(set(batched.exit_layers)) > 1, "the threshold should split the batch across layers"
    for logits, single in zip(batched.logits, singles):
        torch.testing.assert_close(
            torch.log_softmax(logits, -1), torch.log_softmax(single.logits[0], -1), atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_rows_that_exit_get_exactly_their_layers_lens(tiny_models, arch):
    model = tiny_models[arch]
    rows = _rows(3, 8, model.config.vocab_size)
    decisions = [len(r) - 2 for r in rows]
    tau = _mixed_threshold(model, rows, decisions)
    out = EarlyExitEngine(model, build_policy("threshold", {"gap": tau})).run(ExitBatch.from_rows(rows, decisions))
    for row, decision, layer, logits in zip(rows, decisions, out.exit_layers, out.logits):
        with torch.no_grad():
            hidden = model(torch.tensor([row]), output_hidden_states=True).hidden_states
        reference = model(torch.tensor([row])).logits[0, decision:] if layer == 4 else \
            DecoderStack(model).exit_logits(hidden[layer][0, decision:])
        torch.testing.assert_close(logits, reference.detach(), atol=1e-4, rtol=1e-4)


def test_group_shares_one_decision_and_pays_for_it_once(tiny_models):
    model = tiny_models["llama"]
    context = _rows(4, 1, model.config.vocab_size, 8, 9)[0]
    choices = [[10, 11], [12], [13, 14, 15], [16]]
    rows = [context + c for c in choices] + [context[:5] + [20, 21]]
    decisions = [len(context)] * 4 + [5]
    groups = [0, 0, 0, 0, 1]
    recorder = Recorder()
    out = EarlyExitEngine(model, recorder).run(ExitBatch.from_rows(rows, decisions, groups))
    assert all(v.shape[0] == 2 for v in recorder.seen.values()), "one speaker per group"
    assert out.checks == [3, 3, 3, 3, 3]  # layers 1..3 consulted once per group


def test_threshold_validation_errors_are_one_line(tiny_models):
    with pytest.raises(AdaInferError, match="min_layer=9"):
        EarlyExitEngine(tiny_models["llama"], build_policy("threshold", {"gap": 0.5, "min_layer": 9}))


def test_unsupported_architecture_is_refused():
    import transformers as tf

    config = tf.BloomConfig(vocab_size=50, hidden_size=16, n_layer=2, n_head=2)
    model = tf.AutoModelForCausalLM.from_config(config)
    with pytest.raises(AdaInferError, match="supported: llama"):
        DecoderStack(model)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_trace_sees_what_exits_would_see(tiny_models, arch):
    """trace() gives, per layer, the logits a static exit there gives and the features a policy sees."""
    from adainfer_lmeval.core.features import FEATURE_NAMES

    model = tiny_models[arch]
    rows = _rows(5, 3, model.config.vocab_size)
    decisions = [len(r) - 3 for r in rows]
    batch = ExitBatch.from_rows(rows, decisions)
    views = list(EarlyExitEngine(model, build_policy("full", {})).trace(batch))
    assert [v.layer for v in views] == [1, 2, 3, 4]

    class AllFeatures(Recorder):
        features = FEATURE_NAMES

    recorder = AllFeatures()
    EarlyExitEngine(model, recorder).run(batch)
    for view in views:
        if view.layer < 4:
            static = EarlyExitEngine(model, build_policy("static", {"layer": view.layer})).run(batch)
            for mine, theirs in zip(view.logits, static.logits):
                torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(view.features, recorder.seen[view.layer], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_over_a_token_subset_equal_the_full_heads(tiny_models, arch):
    stack = DecoderStack(tiny_models[arch])
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(3, stack.hidden_size, generator=g)
    ids = torch.randint(0, stack.vocab_size, (3, 5), generator=g)
    with torch.no_grad():
        full = stack.exit_logits(hidden)
        subset = stack.exit_logits_over(hidden, ids)
    torch.testing.assert_close(subset, full.gather(1, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "opt"])
def test_pruned_vocabulary_checks(tiny_models, arch):
    """check_vocab=K: the first check is full, later ones read K tokens; answers still full-vocabulary."""
    model = tiny_models[arch]
    rows = _rows(8, 6, model.config.vocab_size)
    decisions = [len(r) - 2 for r in rows]
    recorder = Recorder()
    out = EarlyExitEngine(model, recorder, checks=ExitCheckConfig(vocab=8)).run(ExitBatch.from_rows(rows, decisions))
    assert out.checks == [3] * len(rows) and out.pruned_checks == [2] * len(rows)
    # Layer 1's features are the full-vocabulary ones; later p1s come from a softmax over 8 tokens.
    full = Recorder()
    EarlyExitEngine(model, full).run(ExitBatch.from_rows(rows, decisions))
    torch.testing.assert_close(recorder.seen[1], full.seen[1])
    assert bool((recorder.seen[2][:, 0] >= full.seen[2][:, 0] - 1e-6).all()), "p1 over K tokens >= p1 over all"
    # A row that exits at a pruned check still gets its layer's full-vocabulary lens.
    tau = _mixed_threshold(model, rows, decisions)
    pruned = EarlyExitEngine(model, build_policy("threshold", {"gap": tau, "min_layer": 1}), checks=ExitCheckConfig(vocab=8))
    exits = pruned.run(ExitBatch.from_rows(rows, decisions))
    for row, decision, layer, logits in zip(rows, decisions, exits.exit_layers, exits.logits):
        static = EarlyExitEngine(model, build_policy("static", {"layer": layer})) if layer < 4 else \
            EarlyExitEngine(model, build_policy("full", {}))
        reference = static.run(ExitBatch.from_rows([row], [decision])).logits[0]
        torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
    batched = [pruned.run(ExitBatch.from_rows([r], [d])).exit_layers[0] for r, d in zip(rows, decisions)]
    assert batched == exits.exit_layers
