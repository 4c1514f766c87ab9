"""The one request encoder (truncation, decision positions, groups, packing) against HFLM's own behaviour."""

from __future__ import annotations

import pytest
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from adainfer_lmeval.adapter import request_encoding as re_
from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.core.stages import StageClock, stage


def test_truncation_keeps_the_last_tokens_and_drops_the_last():
    tokens, decision = re_.truncate([1, 2, 3, 4, 5], [6, 7], max_length=4)
    assert tokens == [3, 4, 5, 6] and decision == 2
    assert tokens[decision] == 5  # the decision position reads the last context token, predicting 6
    tokens, decision = re_.truncate([1, 2], [3], max_length=10)
    assert tokens == [1, 2] and decision == 1
    with pytest.raises(AdaInferError, match="empty context or continuation"):
        re_.truncate([], [3], 10)
    with pytest.raises(AdaInferError, match="does not fit max_length=3"):
        re_.truncate([1, 2], [3, 4, 5, 6, 7], 3)


def test_groups_share_the_decision_and_identical_rows():
    # doc A: two single-token options (one row) and a two-token one; doc B: another context
    pairs = [([1, 2, 3], [9]), ([1, 2, 3], [8]), ([1, 2, 3], [7, 6]), ([4, 5], [9])]
    enc = re_.encode(pairs, max_length=16)
    assert enc.rows == [[1, 2, 3], [1, 2, 3], [1, 2, 3, 7], [4, 5]] and enc.decisions == [2, 2, 2, 1]
    assert [[row.requests for row in g.rows] for g in enc.groups] == [[[0, 1], [2]], [[3]]]
    assert [g.requests for g in enc.groups] == [3, 1]
    # the same prompt under two keys (two documents) stays two groups
    keyed = re_.group_rows([[1, 2], [1, 2]], [1, 1], keys=["a", "b"])
    assert len(keyed) == 2 and len(re_.group_rows([[1, 2], [1, 2]], [1, 1])) == 1
    # rows that differ before the decision position are not one group
    assert len(re_.group_rows([[1, 2, 3], [1, 4, 3]], [2, 2])) == 2


def test_groups_know_their_answer_options_at_the_margin_position():
    # options sharing a first token (one row for [5, 6] and [5, 8]: same row), one prefix of another, none shared
    pairs = [([1, 2], [5, 6]), ([1, 2], [5, 7, 9]), ([1, 2], [5, 8]), ([3, 4], [6]), ([3, 4], [6, 2]), ([9], [4]), ([9], [7, 7])]
    enc = re_.encode(pairs, max_length=16)
    by_context = {tuple(g.rows[0].tokens[: g.rows[0].decision + 1]): g for g in enc.groups}
    shared, prefix, plain = by_context[(1, 2)], by_context[(3, 4)], by_context[(9,)]
    assert shared.continuations == [[5, 6], [5, 7, 9], [5, 8]], "options in request order"
    assert (shared.margin_offset, shared.option_tokens) == (1, [6, 7, 8])
    assert (prefix.margin_offset, prefix.option_tokens) == (0, [6, 6])  # never differ where both have a token
    assert (plain.margin_offset, plain.option_tokens) == (0, [4, 7])
    (batch,) = list(enc.batches(rows_per_batch=16))
    assert batch.option_tokens == [g.option_tokens for g in batch.groups]
    assert batch.margin_offsets == [g.margin_offset for g in batch.groups]
    assert re_.EngineBatch(re_.group_rows(enc.rows, enc.decisions)).option_tokens is None  # no continuations given


def test_packing_is_longest_first_and_keeps_groups_whole():
    rows = [[1] * 3, [2] * 5, [2] * 5 + [7], [3] * 4, [4] * 5]
    decisions = [2, 4, 4, 3, 4]
    groups = re_.group_rows(rows, decisions)
    assert [g.width for g in groups] == [6, 5, 4, 3]  # the 5-token rows 2 and 4 differ: two groups
    assert [g.rows[0].requests for g in groups] == [[1], [4], [3], [0]]
    batches = list(re_.pack(groups, rows_per_batch=2))
    assert [[len(g.rows) for g in b.groups] for b in batches] == [[2], [1, 1], [1]]
    first = batches[0]
    assert first.row_groups == [0, 0] and first.group_requests == [2, 2] and first.decisions == [4, 4]
    assert [len(b.rows) for b in re_.pack(groups, rows_per_batch=1)] == [2, 1, 1, 1]  # too big: alone
    # a token budget closes a batch before rows x width would pass it
    assert [len(b.groups) for b in re_.pack(groups, 16, tokens_per_batch=12)] == [1, 2, 1]
    # count: the collector counts answer options, not distinct rows
    assert [len(b.groups) for b in re_.pack(groups, 3, count=lambda g: g.requests + 1)] == [1, 1, 1, 1]


def _hflm(folder, **kwargs):
    return HFLM(pretrained=str(folder), device="cpu", batch_size=1, **kwargs)


def test_tokenized_requests_are_what_loglikelihood_hands_over(tiny_model_dirs):
    from adainfer_lmeval.adapter.loglikelihood import tokenized_requests

    class Recording(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            self.seen = list(requests)
            return [(0.0, False)] * len(requests)

    lm = Recording(pretrained=str(tiny_model_dirs["llama"]), device="cpu", batch_size=1)
    instances = [Instance("loglikelihood", {}, args, idx=i) for i, args in
                 enumerate([("the quick brown", " fox"), ("a film ", "that"), ("", " empty context")])]
    lm.loglikelihood(instances, disable_tqdm=True)
    assert tokenized_requests(lm, instances) == lm.seen
    assert lm.seen[2][1] == [lm.prefix_token_id]


def test_rows_are_the_inputs_hflm_scores(tiny_model_dirs):
    """HFLM's own forward inputs (logits cache off: one input per request) are the encoder's rows."""
    lm = _hflm(tiny_model_dirs["llama"], max_length=8, logits_cache=False)
    seen = []
    forward = lm._model_call

    def recording(inps, *args, **kwargs):
        seen.extend(tuple(row) for row in inps.tolist())
        return forward(inps, *args, **kwargs)

    lm._model_call = recording
    pairs = [([4, 5, 6, 7, 8, 9, 10, 11], [12, 13]), ([5, 6], [7]), ([20, 21, 22, 23, 24, 25, 26, 27, 28], [29])]
    lm._loglikelihood_tokens([((None, None), c, k) for c, k in pairs], disable_tqdm=True)
    encoded = re_.encode(pairs, lm.max_length)
    assert sorted(seen) == sorted(tuple(row) for row in encoded.rows)
    assert encoded.rows[0] == [5, 6, 7, 8, 9, 10, 11, 12] and encoded.decisions == [6, 1, 7]


def test_stage_clock_times_the_engine_and_costs_nothing_when_off(tiny_model_dirs):
    from adainfer_lmeval.adapter.backend import AdaInferLM

    assert stage("layers") is stage("emit")  # one shared do-nothing context when no clock runs
    lm = AdaInferLM(pretrained=str(tiny_model_dirs["llama"]), device="cpu", batch_size=4, policy="threshold",
                    gap=0.0, min_layer=1)
    requests = [((None, None), [5, 6, 7], [8]), ((None, None), [5, 6, 7], [9]), ((None, None), [3, 4], [5, 6])]
    with StageClock() as clock:
        with pytest.raises(AdaInferError, match="already running"):
            StageClock().__enter__()
        out = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    layers = lm.engine.num_layers
    assert all(r.exit.layers == 1 for r in out)  # gap >= 0 always holds: every group leaves at layer 1
    assert clock.calls["engine_run"] == 1 and clock.calls["layers"] == 1 and clock.calls["emit"] == 1
    assert clock.calls["check_head"] == 1 and clock.rows["check_head"] == 2  # one speaker per group
    assert clock.calls["check_features"] == 1 and clock.calls["embed"] == 1
    assert clock.seconds["engine_run"] >= sum(clock.seconds[k] for k in ("layers", "emit", "check_head", "embed"))
    with StageClock() as after:  # a clock that has stopped hears nothing more
        pass
    lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert after.calls == {} and clock.calls["engine_run"] == 1 and layers > 1
