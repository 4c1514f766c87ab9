"""check_clusters=C: a row's first check picks its candidates from balanced head clusters."""

from __future__ import annotations

import pytest
import torch

from adainfer_lmeval.core.accounting import CostModel
from adainfer_lmeval.core.architectures import DecoderStack
from adainfer_lmeval.core.exit_checks import ExitCheckConfig
from adainfer_lmeval.core.engine import EarlyExitEngine, ExitBatch
from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.core.generation import EarlyExitGenerator
from adainfer_lmeval.core.head_clusters import HeadClusters, kmeans
from adainfer_lmeval.adapter.model_args import split_model_args
from adainfer_lmeval.policies import build_policy
from conftest import ARCHITECTURES
from test_engine import Recorder, _rows


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAINFER_CACHE", str(tmp_path / "cache"))


def test_kmeans_partitions_the_rows():
    points = torch.randn(203, 12, generator=torch.Generator().manual_seed(0))
    centroids, assign = kmeans(points, 10)
    assert centroids.shape == (10, 12) and assign.shape == (203,)
    for c in assign.unique().tolist():  # each centroid is its members' mean
        torch.testing.assert_close(centroids[c], points[assign == c].mean(0))
    assert torch.equal(kmeans(points, 10)[1], assign), "deterministic"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_probing_every_cluster_gives_the_full_heads_top_k(tiny_models, arch):
    stack = DecoderStack(tiny_models[arch])
    clusters = HeadClusters.for_head(stack.head.weight, 16)
    hidden = torch.randn(5, stack.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ids, logits, rows = clusters.with_probes(16).pick(stack, hidden, 8)
        full = stack.exit_logits(hidden).topk(8, dim=-1)
    torch.testing.assert_close(logits, full.values, atol=1e-5, rtol=1e-5)
    assert torch.equal(ids.sort(dim=1).values, full.indices.sort(dim=1).values)
    assert rows.tolist() == [16 + stack.vocab_size] * 5
    # Probing fewer clusters multiplies fewer head rows (and at least K), and its logits are exact.
    with torch.no_grad():
        ids, logits, rows = clusters.with_probes(2).pick(stack, hidden, 8)
        torch.testing.assert_close(logits, stack.exit_logits(hidden).gather(1, ids), atol=1e-5, rtol=1e-5)
    normed = stack.final_norm(hidden)
    norms = stack.head.weight.norm(dim=1)
    for c in range(16):  # a cluster's score scale is its largest row norm
        assert clusters.scale[c] == norms[clusters.assign == c].max()
    for row in range(5):
        probed = ((normed[row] @ clusters.directions.T) * clusters.scale).argsort(descending=True)
        sizes = clusters.sizes[probed]
        n = max(2, int((sizes.cumsum(0) < 8).sum()) + 1)
        assert int(rows[row]) == 16 + int(sizes[:n].sum()) < 16 + stack.vocab_size
        assert set(ids[row].tolist()) <= set(torch.isin(clusters.assign, probed[:n]).nonzero().squeeze(1).tolist())


def test_partition_is_cached_and_a_torn_cache_file_is_rebuilt(tiny_models, tmp_path):
    weight = DecoderStack(tiny_models["llama"]).head.weight
    first = HeadClusters.for_head(weight, 16)
    files = list((tmp_path / "cache" / "head_clusters").glob("*.safetensors"))
    assert len(files) == 1
    second = HeadClusters.for_head(weight, 16)
    assert torch.equal(first.assign, second.assign) and torch.equal(first.directions, second.directions)
    assert torch.equal(first.scale, second.scale)
    files[0].write_bytes(b"not a safetensors file")
    rebuilt = HeadClusters.for_head(weight, 16)
    assert torch.equal(rebuilt.assign, first.assign)
    with pytest.raises(AdaInferError, match="check_clusters=1 must be between 2"):
        HeadClusters.for_head(weight, 1)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "opt"])
def test_engine_with_head_clusters(tiny_models, arch):
    """No check uses the full head; probing every cluster picks check_vocab's candidates."""
    model = tiny_models[arch]
    rows = _rows(8, 6, model.config.vocab_size)
    decisions = [len(r) - 2 for r in rows]
    batch = ExitBatch.from_rows(rows, decisions)
    plain, clustered = Recorder(), Recorder()
    EarlyExitEngine(model, plain, checks=ExitCheckConfig(vocab=8)).run(batch)
    engine = EarlyExitEngine(model, clustered, checks=ExitCheckConfig(vocab=8, clusters=16))
    engine.head_clusters = engine.head_clusters.with_probes(16)
    out = engine.run(batch)
    vocab = engine.stack.vocab_size
    assert out.checks == [3] * len(rows) and out.pruned_checks == [3] * len(rows)  # all over K tokens
    assert out.check_rows == [(16 + vocab) + 2 * 8] * len(rows)
    # Same candidates, so the later (pruned) checks agree exactly; the first picked check reads
    # the softmax over its K candidates where check_vocab alone reads the full vocabulary's.
    for layer in (2, 3):
        torch.testing.assert_close(clustered.seen[layer], plain.seen[layer], atol=1e-5, rtol=1e-5)
    assert bool((clustered.seen[1][:, 0] >= plain.seen[1][:, 0] - 1e-6).all())
    # With the default probes the engine runs, exits, and the answer at an exit is the layer's
    # full-vocabulary lens (the same check as for check_vocab alone).
    policy = build_policy("threshold", {"gap": 0.0, "min_layer": 2})
    exits = EarlyExitEngine(model, policy, checks=ExitCheckConfig(vocab=8, clusters=16)).run(batch)
    static = EarlyExitEngine(model, build_policy("static", {"layer": 2})).run(batch)
    assert exits.exit_layers == [2] * len(rows)
    for got, want in zip(exits.logits, static.logits):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_generation_with_head_clusters(tiny_models):
    model = tiny_models["llama"]
    ids = torch.tensor([[5, 6, 7, 8], [0, 9, 10, 11]])
    mask = (ids != 0).long()
    policy = build_policy("threshold", {"gap": 0.0, "min_layer": 2})
    out = EarlyExitGenerator(EarlyExitEngine(model, policy, checks=ExitCheckConfig(vocab=8, clusters=16))).generate(ids, mask, 4, pad_token_id=0)
    static = EarlyExitGenerator(EarlyExitEngine(model, build_policy("static", {"layer": 2}))).generate(ids, mask, 4, pad_token_id=0)
    assert torch.equal(out.sequences, static.sequences)
    assert all(layers == [2] * 4 for layers in out.exit_layers)


def test_cost_of_a_picked_check(tiny_models):
    stack = DecoderStack(tiny_models["opt"])  # OPT: the project_out before the head counts too
    costs = CostModel.from_stack(stack, check_vocab=8)
    d, vocab = stack.hidden_size, stack.vocab_size
    project_out = 2 * (stack.head_matmul_params() - vocab * stack.head.in_features)
    full = costs.check_flops(1)
    assert full == costs.head_flops(1, with_softmax=True)
    # counted head rows replace the default (V for a full check, K for a pruned one)
    assert costs.check_flops(3, 2) == costs.check_flops(3, 2, head_rows=vocab + 16)
    picked = costs.check_flops(3, 3, head_rows=100 + 16)
    assert picked == 2 * stack.head.in_features * 116 + 3 * project_out + 5 * 8 * 3
    assert picked < costs.check_flops(3, 2) < costs.check_flops(3)
    # generation: an exit at a check over K tokens pays the head once more for the answer
    one = costs.generation(4, [2], [1], [1], [100]).flops - costs.generation(4, [2], [0], [0], [0]).flops
    assert one == pytest.approx(costs.check_flops(1, 1, 100) + costs.head_flops(1))


def test_model_args():
    with pytest.raises(AdaInferError, match="check_clusters needs check_vocab"):
        split_model_args("threshold", {"gap": 0.5, "check_clusters": 256})
    with pytest.raises(AdaInferError, match="check_clusters='x' must be an integer"):
        split_model_args("threshold", {"gap": 0.5, "check_vocab": 64, "check_clusters": "x"})
    with pytest.raises(AdaInferError, match="check_probes needs check_clusters"):
        split_model_args("threshold", {"gap": 0.5, "check_vocab": 64, "check_probes": 8})
    _, checks, rest = split_model_args("threshold", {"gap": 0.5, "check_vocab": "64", "check_clusters": 256,
                                                     "check_probes": 8, "batch_size": 2})
    assert checks == ExitCheckConfig(vocab=64, clusters=256, probes=8) and rest == {"batch_size": 2}


def test_backend_passes_the_check_args(tiny_model_dirs):
    from adainfer_lmeval.adapter.backend import AdaInferLM

    lm = AdaInferLM(pretrained=str(tiny_model_dirs["llama"]), policy="threshold", gap=0.5, min_layer=2,
                    check_vocab=8, check_clusters=16, check_probes=3, batch_size=1, device="cpu")
    clusters = lm.engine.head_clusters
    assert (lm.engine.checks.vocab, clusters.clusters, clusters.probes) == (8, 16, 3)
    assert lm.get_model_info()["adainfer"]["check_clusters"] == {"clusters": 16, "probes": 3}


def test_exit_check_config_parses_once_and_round_trips():
    config = ExitCheckConfig.from_model_args({"check_vocab": "64", "check_clusters": 0, "gap": 0.5})
    assert config == ExitCheckConfig(vocab=64) and config.model_args() == {
        "check_vocab": 64, "check_clusters": None, "check_probes": None}
    assert ExitCheckConfig.from_model_args(config.model_args()) == config
    with pytest.raises(AdaInferError, match="check_probes needs check_clusters"):
        ExitCheckConfig(vocab=8, probes=2)  # built directly, it is checked the same way
    with pytest.raises(AdaInferError, match="check_vocab=50 must be below the model's vocabulary"):
        ExitCheckConfig(vocab=50).check_against(50)
