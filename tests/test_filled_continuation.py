"""The filled continuation (experiments.filled_continuation) against references: the model's own
layers run over the whole row with the prompt held at the start layer's states, and, from layer
L-1, the full forward itself."""

from __future__ import annotations

import json

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


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_carry_through_the_last_k_layers_skips_to_them_with_the_prompt_held_at_the_start_layer(tiny_models, arch):
    stack = DecoderStack(tiny_models[arch])
    L = stack.num_layers
    ids = torch.randint(4, stack.vocab_size, (1, 9), generator=torch.Generator().manual_seed(5))
    decision = 5
    with torch.no_grad():
        states, inputs = _states(stack, ids)
        starts = list(range(1, L))
        carried = filled_carry(stack, states, decision, starts, last_layers=1)
        for b, start in enumerate(starts):
            # the last layer alone over the whole row at layer `start`'s states: its K/V are the
            # prompt's projected from them, as a fill writes them
            out = stack.run_layer(L - 1, states[start], inputs)
            torch.testing.assert_close(carried[b], out[0, decision:], atol=1e-5, rtol=1e-5)
        # K at least the remaining layers: the filled carry itself
        torch.testing.assert_close(filled_carry(stack, states, decision, starts, last_layers=L),
                                   filled_carry(stack, states, decision, starts), atol=1e-6, rtol=1e-6)


def test_last_layers_is_a_comma_list_of_counts_or_all_and_anything_else_is_one_line():
    from adainfer_lmeval.errors import AdaInferError
    from adainfer_lmeval.experiments.filled_continuation import parse_last_layers, readout_name

    assert parse_last_layers("1, 2,all") == [1, 2, None]
    assert [readout_name(k) for k in parse_last_layers("all,3")] == ["filled", "last3"]
    for bad in ("0", "x", "1,,2", "-1"):
        with pytest.raises(AdaInferError, match="--last-layers"):
            parse_last_layers(bad)


def test_the_read_out_from_layer_L_minus_1_is_full_depth_and_nothing_is_read_below_the_first_carry(tiny_models):
    from adainfer_lmeval.experiments.collect import Example
    from adainfer_lmeval.experiments.filled_continuation import trace_filled

    stack = DecoderStack(tiny_models["llama"])
    prompt = torch.randint(4, stack.vocab_size, (6,), generator=torch.Generator().manual_seed(4)).tolist()
    options = [[5, 9, 7], [5, 8]]  # a shared first token: the margin is read one position on
    example = Example(task="t", doc_id=0, num_fewshot=0, rows=[prompt + o[:-1] for o in options],
                      decision=[len(prompt) - 1] * 2, continuations=options, gold=0)
    L = stack.num_layers
    logits, lls = trace_filled(stack, example, from_layer=L - 1, kinds=[None])[None]
    # several read-outs from one forward per row give what each gives alone
    together = trace_filled(stack, example, from_layer=1, kinds=[None, 1])
    for k in (None, 1):
        torch.testing.assert_close(torch.tensor(together[k]), torch.tensor(trace_filled(stack, example, 1, [k])[k]))
    torch.testing.assert_close(torch.tensor(lls[L - 2]), torch.tensor(lls[L - 1]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(logits[L - 2]), torch.tensor(logits[L - 1]), atol=1e-4, rtol=1e-4)
    assert all(torch.tensor(lls[layer]).isnan().all() and torch.tensor(logits[layer]).isnan().all() for layer in range(L - 2))
    assert len(set(logits[L - 1])) == 2  # two options' different tokens at the margin position


def test_the_command_writes_its_tables_as_json_and_the_figure_draws_them(tiny_model_dirs, tmp_path, monkeypatch, capsys):
    """End to end on a tiny model's study-style SST-2 cell: the filled read-outs collected beside
    it, the JSON they are reported in and the figure drawn from it; from layer L-1 the filled and
    the last-layer carries are full depth itself, so they agree with it on every document."""
    import json

    from adainfer_lmeval.adapter import backend
    from adainfer_lmeval.experiments import filled_continuation, readout_plot
    from adainfer_lmeval.experiments.collect import collect
    from adainfer_lmeval.experiments.collect_continuation import collect_continuation
    from adainfer_lmeval.experiments.study_tasks import StudyTask, doc_filter_for

    folder = str(tiny_model_dirs["llama"])
    real = backend.AdaInferLM
    lm = real(pretrained=folder, policy="full", batch_size=1, device="cpu")
    for role in ("train", "test"):
        path = tmp_path / "collect" / "tiny" / f"sst2@0-{role}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        collect(folder, ["sst2"], [0], 6, path, seed=0, doc_filter=doc_filter_for(StudyTask.parse("sst2"), role), quiet=True)
        collect_continuation(lm, path)
    monkeypatch.setattr(backend, "AdaInferLM", lambda **kw: real(**{**kw, "pretrained": folder}))
    out = tmp_path / "tiny_sst2.json"
    args = ["--model", "tiny", "--task", "sst2@0", "--collect-dir", str(tmp_path / "collect"), "--from-layer", "2",
            "--last-layers", "1,all", "--max-changed", "0.5", "--json", str(out)]
    assert filled_continuation.main(args) == 0
    assert f"wrote {tmp_path / 'collect'}" in capsys.readouterr().out
    assert (tmp_path / "collect" / "tiny" / "sst2@0-test-last1.parquet").exists()
    run = json.loads(out.read_text())
    L = run["num_layers"]
    for role in ("train", "test"):
        agree = run["agreement"][role]
        assert sorted(agree) == ["filled", "last1", "lens", "simlens"]
        assert all(len(shares) == L - 1 for shares in agree.values())  # layers 2..L
        assert agree["filled"][L - 1 - 2] == 1.0 and agree["last1"][L - 1 - 2] == 1.0
    assert {r["readout"] for r in run["rows"]} == {"simlens", "last1", "filled"} and run["max_changed"] == 0.5
    from adainfer_lmeval.experiments.training_data import load_data, with_continuation

    test_path = tmp_path / "collect" / "tiny" / "sst2@0-test.parquet"
    data = with_continuation(load_data(test_path), test_path)
    last1 = filled_continuation.read_filled(data, test_path, 2, 1).continuation
    filled = filled_continuation.read_filled(data, test_path, 2, None).continuation
    # the study's costs: a last-layer carry runs one layer (none from L), the filled one L - l
    assert last1.remaining_layers(L)[0].tolist() == [1.0] * (L - 1) + [0.0]
    assert filled.remaining_layers(L)[0].tolist() == [float(L - l) for l in range(1, L + 1)]
    capsys.readouterr()
    assert filled_continuation.main(args) == 0  # a second run reads the files back, traces nothing
    assert f"wrote {tmp_path / 'collect'}" not in capsys.readouterr().out

    png = tmp_path / "fig.png"
    assert readout_plot.main([str(out), "--out", str(png)]) == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "bad.json").write_text('{"model": "m"}')
    assert readout_plot.main([str(tmp_path / "bad.json"), "--out", str(png)]) == 2
    assert "bad.json: not a filled-continuation result" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_rows_of_different_prompts_spans_and_start_layers_carry_in_one_batch_as_each_alone(tiny_models, arch):
    """The core's batched fill (prompts left-aligned in the cache, spans right-padded): every row
    equals its own carry, for prompts longer than the tiny models' sliding window (6) and a row
    with no prompt at all."""
    from adainfer_lmeval.core.continuation import fill_carry

    stack = DecoderStack(tiny_models[arch])
    L = stack.num_layers
    ids = torch.randint(4, stack.vocab_size, (1, 14), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        states, _ = _states(stack, ids)
        cases = [(1, 9, 13), (L - 1, 3, 4), (2, 0, 2), (1, 12, 12)]  # (start layer, first, last)
        for last_layers in (None, 1):
            held = torch.cat([states[layer] for layer, _, _ in cases])
            batched = fill_carry(stack, held, *map(list, zip(*cases)), last_layers=last_layers)
            for b, (layer, first, last) in enumerate(cases):
                alone = fill_carry(stack, states[layer], [layer], [first], [last], last_layers=last_layers)
                torch.testing.assert_close(batched[b, : last - first + 1], alone[0], atol=1e-5, rtol=1e-5)
            # from layer L-1 the carry is full depth itself
            torch.testing.assert_close(batched[1, :2], states[-1][0, 3:5], atol=1e-5, rtol=1e-5)


def test_an_interrupted_read_out_resumes_where_it_stopped_and_gives_what_one_run_gives(tiny_model_dirs, tmp_path, monkeypatch):
    """write_filled keeps each document's read-out as it goes: killed after three documents, a
    re-run reads those back (a torn last line is read out again), traces only the rest, writes the
    files an uninterrupted run writes, and removes what it resumed from."""
    import pyarrow.parquet as pq

    from adainfer_lmeval.adapter.backend import AdaInferLM
    from adainfer_lmeval.experiments import filled_continuation as fc
    from adainfer_lmeval.experiments.collect import collect

    folder = str(tiny_model_dirs["llama"])
    lm = AdaInferLM(pretrained=folder, policy="full", batch_size=1, device="cpu")
    once, resumed = tmp_path / "once" / "c.parquet", tmp_path / "resumed" / "c.parquet"
    for path in (once, resumed):
        path.parent.mkdir()
        collect(folder, ["sst2"], [0], 6, path, seed=0, quiet=True)
    fc.write_filled(lm, once, 2, [None, 1], log=lambda _: None)

    real, traced = fc.trace_filled, []

    def dies_after_three(*args):
        if len(traced) == 3:
            raise KeyboardInterrupt
        traced.append(args[1].doc_id)
        return real(*args)

    monkeypatch.setattr(fc, "trace_filled", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        fc.write_filled(lm, resumed, 2, [None, 1], log=lambda _: None)
    log = resumed.with_name("c-filled.resume.jsonl")
    assert len(log.read_text().splitlines()) == 3 and not fc.filled_path(resumed).exists()
    log.write_text(log.read_text()[:-40])  # the last line torn, as by a kill mid-write
    traced.clear()
    monkeypatch.setattr(fc, "trace_filled", lambda *args: traced.append(args[1].doc_id) or real(*args))
    messages = []
    fc.write_filled(lm, resumed, 2, [None, 1], log=messages.append)
    assert len(traced) == 6 - 2 and "(2 read back from c-filled.resume.jsonl)" in messages[-1]
    # records appended after a torn line start on a line of their own
    torn = tmp_path / "torn.jsonl"
    torn.write_text('{"key": "a", "re')
    resume = fc.ResumeLog(torn, ["run"], 4)
    example = type("E", (), {"task": "t", "doc_id": 0, "num_fewshot": 0, "rows": [[1], [2]]})()
    table = [[0.5, 0.25]] * 4
    resume.append(example, [None], {None: (table, table)})
    assert fc.ResumeLog(torn, ["run"], 4).get(example, [None]) == {None: (table, table)}
    for k in (None, 1):
        mine, theirs = pq.read_table(fc.filled_path(resumed, k)).to_pydict(), pq.read_table(fc.filled_path(once, k)).to_pydict()
        assert json.dumps(mine) == json.dumps(theirs)
    assert not log.exists()
