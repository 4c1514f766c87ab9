"""The paper's study (adainfer_lmeval.experiments.study*): splits, settings, layer mapping, oracle,
policies, operating points, offline exits.

Synthetic collections test the mechanics in seconds; a tiny random model checks that the option
margin the collector records gives, offline, the engine's own ``policy=margin`` exits and answers;
the ``real`` test checks once, on a slice of SST-2 with SmolLM2, that the offline evaluation of
every study policy (exit layers and accuracy computed from collected features) equals running the
same policy through lm-eval's ``adainfer`` backend.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adainfer_lmeval.adapter import request_encoding
from adainfer_lmeval.core.engine import EarlyExitEngine, ExitBatch
from adainfer_lmeval.core.features import FEATURE_NAMES
from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.experiments import study_policies as sp
from adainfer_lmeval.experiments import study_report as sr
from adainfer_lmeval.experiments import study_tasks as stt
from adainfer_lmeval.experiments.calibration import CRITERIA, evaluate, exit_layers
from adainfer_lmeval.experiments.collect import Example, trace_examples
from adainfer_lmeval.experiments.task_documents import sample_docs
from adainfer_lmeval.experiments.study_evaluation import run_study
from adainfer_lmeval.experiments.training_data import OPTION_SIGNALS, Data, option_signal_columns
from adainfer_lmeval.policies import build_policy

SIGNAL_NAMES = FEATURE_NAMES + ("margin",)


def synthetic(task: str, source: str, n: int, L: int, seed: int, doc_ids=None, model: str = "toy") -> Data:
    """Docs whose answer settles on the final one from a random layer on, confident from then."""
    rng = np.random.default_rng(seed)
    feats = np.zeros((n, L, len(SIGNAL_NAMES)))
    choice = np.zeros((n, L), dtype=int)
    gold = rng.integers(0, 2, n)
    for i in range(n):
        settle = rng.integers(2, L + 1)
        final = gold[i] if rng.random() < 0.85 else 1 - gold[i]
        for layer in range(1, L + 1):
            ok = layer >= settle
            p1 = (0.8 if ok else 0.3) + 0.1 * rng.random()
            margin = (0.7 if ok else 0.1) + 0.2 * rng.random()
            feats[i, layer - 1] = [p1, p1 - (0.2 if ok else 0.25), 1.0 if ok else 3.0, 0.9, layer / L, margin]
            choice[i, layer - 1] = final if ok else rng.integers(0, 2)
    ids = list(range(n)) if doc_ids is None else list(doc_ids)
    meta = {"model": {"name": model, "model_type": "llama", "num_layers": L, "hidden_size": 8, "vocab_size": 50}, "parts": []}
    return Data(feats, 100 + choice, choice, gold, 100 + gold, [f"{source}:{d}" for d in ids], [source] * n,
                np.zeros(n, dtype=int), np.full(n, 2), meta, SIGNAL_NAMES)


TASKS = [stt.StudyTask.parse(t) for t in ("sst2", "sst2@4", "arc_easy", "boolq")]
DEPTHS = {"small": 6, "deep": 9}


def plan(tasks=TASKS) -> list:
    return [stt.StudyModel(model, 24, tuple(tasks)) for model in DEPTHS]


def synthetic_collections() -> dict:
    out = {}
    for m, (model, L) in enumerate(DEPTHS.items()):
        for t, task in enumerate(TASKS):
            for r, role in enumerate(stt.ROLES):
                n = 30 if task.name == "sst2" else 24  # more of a cheap task
                if task.name == "sst2":
                    ids = [i for i in range(200) if stt.sst2_half(i) == role][:n]
                else:
                    ids = range(n)
                out[(model, task.label, role)] = synthetic(task.label, task.source(role), n, L, 100 * m + 10 * t + r, ids, model)
    return out


def test_study_tasks():
    parse = stt.StudyTask.parse
    assert parse("sst2@4") == stt.StudyTask("sst2", 4)
    assert parse("arc_easy").label == "arc_easy@0"
    assert parse("arc_easy").source("train") == "arc_easy_train"
    assert parse("arc_easy").source("test") == "arc_easy"
    assert parse("sst2").source("train") == "sst2"  # split in halves instead
    assert parse("mmlu").source("train") == "mmlu_dev_val" and parse("mmlu").source("test") == "mmlu"
    with pytest.raises(AdaInferError, match="no training documents"):
        parse("lambada_openai")
    with pytest.raises(AdaInferError, match="name\\[@shots\\]"):
        parse("sst2@four")
    assert parse("sst2@4:200") == stt.StudyTask("sst2", 4, 200)
    assert parse("sst2@4:200").label == "sst2@4"
    assert [parse(t).n_docs(40) for t in ("sst2", "sst2:200", "sst2@4:x2.5")] == [40, 200, 100]


def test_study_plan_groups_models_with_their_tasks():
    a, b = stt.parse_plan("a:10,b", "sst2,arc_easy@3:20")
    assert (a.name, a.docs, b.name, b.docs) == ("a", 10, "b", 60)
    assert a.tasks == b.tasks == (stt.StudyTask("sst2"), stt.StudyTask("arc_easy", 3, 20))
    small, big = stt.parse_plan("small:80;big:150", "sst2,piqa;mmlu")  # the i-th group runs the i-th tasks
    assert [t.label for t in small.tasks] == ["sst2@0", "piqa@0"] and [t.label for t in big.tasks] == ["mmlu@0"]
    assert [m.tasks for m in stt.parse_plan("a;b", "sst2")] == [(stt.StudyTask("sst2"),)] * 2  # one group serves all
    assert [(m.name, [t.label for t in m.tasks]) for m in stt.parse_plan(stt.DEFAULT_STUDY_MODELS, stt.DEFAULT_STUDY_TASKS)] == [
        ("smollm2-135m", ["sst2@0", "sst2@4", "arc_easy@0", "piqa@0"]),
        ("qwen2.5-coder-0.5b", ["sst2@0", "sst2@4", "arc_easy@0", "piqa@0"]), ("qwen2.5-coder-1.5b", ["mmlu@0", "sst2@4"])]
    with pytest.raises(AdaInferError, match="one task group per model group"):
        stt.parse_plan("a;b;c", "sst2;piqa")
    with pytest.raises(AdaInferError, match="names a model twice"):
        stt.parse_plan("a;a", "sst2;piqa")
    with pytest.raises(AdaInferError, match="bad model spec 'a:many'"):
        stt.parse_plan("a:many", "sst2")


def test_sst2_halves_partition_and_sampling_never_crosses():
    halves = [stt.sst2_half(i) for i in range(872)]
    # pinned: the split must never move, or reported test documents would leak into training
    assert halves[:12] == ["train", "test", "train", "test", "test", "train", "test", "test", "train", "test", "train", "test"]
    assert 380 < halves.count("train") < 492  # about half each
    assert halves != [stt.sst2_half(i, seed=1) for i in range(872)]  # the seed matters
    tasks = {"sst2": SimpleNamespace(eval_docs=list(range(872)))}
    task = stt.StudyTask.parse("sst2@4")
    train = sample_docs(tasks, "sst2", 300, 4, 0, stt.doc_filter_for(task, "train"))["sst2"]
    test = sample_docs(tasks, "sst2", 300, 4, 0, stt.doc_filter_for(task, "test"))["sst2"]
    assert len(train) == len(test) == 300
    assert not set(train) & set(test)
    assert all(halves[i] == "train" for i in train) and all(halves[i] == "test" for i in test)
    assert stt.doc_filter_for(stt.StudyTask.parse("arc_easy"), "train") is None  # a real train split


def test_training_sets_never_hold_the_test_task():
    collections = synthetic_collections()
    sets = stt.training_sets(collections, plan())
    for (model, task, setting), data in sets.items():
        test = collections[(model, task, "test")]
        name = task.split("@")[0]
        sources = set(data.source)
        if setting == "intra":
            assert sources == {stt.StudyTask.parse(task).source("train")}
        else:  # inter-task: every other task, never this one (nor its other shot count)
            assert not any(s.split("_train")[0] == name for s in sources)
            assert len(sources) == len({t.name for t in TASKS}) - 1 or name == "sst2"
            counts = [data.source.count(s) for s in sorted(sources)]  # the same number from every task
            assert counts == [24] * len(counts) or sorted(counts) == [24, 48]  # sst2@0 + sst2@4 share a source
        assert not set(data.keys) & set(test.keys), (model, task, setting)
        assert data.num_layers == DEPTHS[model]


def test_map_point_by_relative_depth():
    point = {"threshold": 0.5, "min_layer": 20}
    assert sp.map_point(point, 30, 24) == {"threshold": 0.5, "min_layer": 16}
    assert sp.map_point(point, 30, 30)["min_layer"] == 20
    assert sp.map_point({"threshold": 0.5, "min_layer": 29}, 30, 18)["min_layer"] == 17  # round(17.4), below L
    assert sp.map_point({"threshold": 0.5, "min_layer": 23}, 24, 18)["min_layer"] == 17  # clamped to L-1
    assert sp.map_point({"threshold": 0.5, "min_layer": 1}, 30, 18)["min_layer"] == 1


def test_oracle_exits_and_accuracy():
    data = synthetic("t", "t", 3, 4, 0)
    data.choice[:] = [[0, 1, 1, 1], [1, 1, 1, 1], [0, 1, 0, 1]]
    data.gold[:] = [1, 0, 1]
    exits = sp.oracle_exits(data)
    assert exits.tolist() == [2, 1, 4]
    result = evaluate(data, exits)
    assert result["policy_acc"] == result["full_acc"] == pytest.approx(2 / 3)
    assert result["agreement_with_full"] == 1.0
    assert result["layers_saved"] == pytest.approx(1 - 7 / 12)


def test_at_chance():
    assert sp.at_chance(0.55, 0.5, 40)  # 5 points above chance is within 2 stderr of 40 docs
    assert not sp.at_chance(0.80, 0.5, 40)


def settled_from_layer_3(n: int, changed_at_2: int, L: int = 6) -> Data:
    """``n`` docs whose answer is final from layer 3 on; at layer 2, ``changed_at_2`` of them
    answer otherwise; at layer 1 every answer is wrong."""
    data = synthetic("t", "t", n, L, 0)
    data.gold[:] = 1
    data.choice[:] = 1
    data.choice[:, 0] = 0
    data.choice[:changed_at_2, 1] = 0
    return data


def test_static_depth_and_the_guarantee_at_known_answers():
    # 200 docs, 2 of them (1%) changed at layer 2, none from layer 3. The empirical criteria allow
    # layer 2 (1% changed, accuracy -1 point). The guarantee tests each of the 5 min_layer paths at
    # 1 - 0.05 / 5 = 99% (Bonferroni): the bound of 2 changes in 200 is 4.1%, of 0 changes 2.3%, so
    # δ = 3% takes layer 3 and δ = 2% no point at all (full depth, not passed).
    data = settled_from_layer_3(200, 2)
    points = sp.fit_study_policy(data, "static", sp.CalibrationRules(max_changed=0.03))["points"]
    assert points["agreement"]["min_layer"] == points["accuracy"]["min_layer"] == 2
    guaranteed = points["guarantee"]
    assert (guaranteed["min_layer"], guaranteed["passed"], guaranteed["calibration_changed"]) == (3, True, 0)
    assert guaranteed["changed_upper_bound"] == pytest.approx(1 - 0.01 ** (1 / 200))
    strict = sp.fit_study_policy(data, "static", sp.CalibrationRules(max_changed=0.02))["points"]["guarantee"]
    assert strict["passed"] is False
    exits = exit_layers(sp.layer_scores("static", None, data), strict["threshold"], strict["min_layer"])
    assert (exits == data.num_layers).all()  # no point passes: full depth
    # static depth exits every document at its layer, whatever its signals say
    scores = sp.layer_scores("static", None, data)
    assert exit_layers(scores, points["guarantee"]["threshold"], 3).tolist() == [3] * 200


def test_the_guarantee_cannot_pass_at_the_studys_size():
    # 80 calibration docs that never change from layer 2 on: the empirical criterion exits there,
    # the guarantee at δ = 1% cannot (0 changes in 80 bound the rate at 5.6% on each of 5 paths at
    # 99%) and does at δ = 6%
    data = settled_from_layer_3(80, 0)
    assert sp.fit_study_policy(data, "static", sp.CalibrationRules())["points"]["agreement"]["min_layer"] == 2
    assert sp.fit_study_policy(data, "static", sp.CalibrationRules())["points"]["guarantee"]["passed"] is False
    loose = sp.fit_study_policy(data, "static", sp.CalibrationRules(max_changed=0.06))["points"]["guarantee"]
    assert loose["passed"] and loose["min_layer"] == 2
    assert loose["changed_upper_bound"] == pytest.approx(1 - 0.01 ** (1 / 80))


def test_run_study_rows():
    collections = synthetic_collections()
    models = list(DEPTHS)
    policies = ("svm", "threshold", "margin", "static")
    result = run_study(collections, plan(), sp.CalibrationRules(inner_folds=2), policies=policies, log=lambda m: None)
    rows = result["rows"]
    per_cell = 2 + len(policies) * len(sp.TRAINING_SETTINGS) * len(CRITERIA)  # full, oracle + policies x settings x criteria
    assert len(rows) == len(models) * len(TASKS) * per_cell
    for r in rows:
        test = collections[(r["model"], f"{r['task']}@{r['shots']}", "test")]
        assert r["n_test"] == len(test.keys) and r["layers"] == test.num_layers
        if r["policy"] in ("full", "oracle"):
            assert r["acc"] == r["full_acc"] and r["agreement"] == 1.0 and r["delta_se_points"] == 0.0
        if r["policy"] == "full":
            assert r["layers_saved"] == 0.0 and r["layers_saved_se"] == 0.0
        if r["setting"] == "inter-model":
            assert r["trained_model"] != r["model"]
            source = [s for s in rows if s["model"] == r["trained_model"] and s["task"] == r["task"] and s["shots"] == r["shots"]
                      and s["policy"] == r["policy"] and s["setting"] == "intra" and s["criterion"] == r["criterion"]][0]
            mapped = sp.map_point(source, DEPTHS[r["trained_model"]], DEPTHS[r["model"]])
            assert r["min_layer"] == mapped["min_layer"] and r["threshold"] == source["threshold"]
        elif r["setting"] in ("intra", "inter-task"):
            assert r["trained_model"] == r["model"]
        if r["criterion"] == "guarantee":  # 24-30 calibration docs: no point can pass at δ = 1%
            assert r["passed"] is False and r["mean_exit_layer"] == r["layers"]
    # the threshold and margin rules exit at the first layer >= min_layer whose signal reaches the threshold
    for policy, signal in (("threshold", "gap"), ("margin", "margin")):
        r = next(r for r in rows if (r["policy"], r["setting"], r["model"], r["criterion"]) == (policy, "intra", "deep", "accuracy"))
        test = collections[("deep", f"{r['task']}@{r['shots']}", "test")]
        values = test.feats[:, :, SIGNAL_NAMES.index(signal)]
        exits = []
        for doc in values:
            hit = [l for l in range(r["min_layer"], test.num_layers) if doc[l - 1] >= r["threshold"]]
            exits.append(hit[0] if hit else test.num_layers)
        assert r["mean_exit_layer"] == pytest.approx(np.mean(exits))
        n = len(exits)
        assert r["layers_saved_se"] == pytest.approx(np.std(1 - np.array(exits) / test.num_layers, ddof=1) / np.sqrt(n))
    static = [r for r in rows if r["policy"] == "static" and r["setting"] != "inter-model"]
    for r in static:  # static depth: every document at one layer (full depth where no layer passed)
        assert r["mean_exit_layer"] == (r["min_layer"] if r["threshold"] <= 1.0 else r["layers"])
    assert any(r["threshold"] == 1.0 and r["min_layer"] < r["layers"] for r in static)
    tables = sr.markdown_tables(result)
    # a row per criterion and setting, + the guarantee's reach (intra, inter-task) and the hindsight table
    assert tables.count("| small | arc_easy | 0 |") == len(sr.REPORTED_CRITERIA) * len(sp.TRAINING_SETTINGS) + 2 + 1
    assert "| small | arc_easy | 0 | intra | 24 | 5 | 17.5 |" in tables  # 1 - (0.05 / 5)^(1/24): the smallest reachable δ
    for h in result["hindsight"]:  # the point picked on the test documents is within 1 point there
        full = next(r for r in rows if r["model"] == h["model"] and f"{r['task']}@{r['shots']}" == h["task"] and r["policy"] == "full")
        assert h["acc"] >= full["full_acc"] - 0.01 - 1e-9 and 0 <= h["layers_saved"] < 1


def test_a_model_with_its_own_tasks_gets_inter_model_rows_from_every_model_that_ran_the_task():
    collections = synthetic_collections()
    big_tasks = (TASKS[1], TASKS[3])  # sst2@4 and boolq only
    for t, task in enumerate(big_tasks):
        for r, role in enumerate(stt.ROLES):
            ids = [i for i in range(200) if stt.sst2_half(i) == role][:30] if task.name == "sst2" else range(24)
            collections[("big", task.label, role)] = synthetic(task.label, task.source(role), len(ids), 12, 500 + 10 * t + r, ids, "big")
    study = plan() + [stt.StudyModel("big", 24, big_tasks)]
    result = run_study(collections, study, sp.CalibrationRules(inner_folds=2), policies=("margin",), log=lambda m: None)
    rows = [r for r in result["rows"] if r["setting"] == "inter-model" and r["criterion"] == "agreement"]
    sources = {(r["model"], r["task"], r["shots"]): set() for r in rows}
    for r in rows:
        sources[(r["model"], r["task"], r["shots"])].add(r["trained_model"])
    assert {cell for cell in sources if cell[0] == "big"} == {("big", "sst2", 4), ("big", "boolq", 0)}
    assert sources[("big", "sst2", 4)] == {"small", "deep"}
    assert sources[("small", "sst2", 4)] == {"deep", "big"} and sources[("small", "arc_easy", 0)] == {"deep"}
    for r in rows:  # each row is its source's intra-task point, min_layer moved by relative depth
        source = next(s for s in result["rows"] if (s["model"], s["task"], s["shots"], s["setting"], s["criterion"])
                      == (r["trained_model"], r["task"], r["shots"], "intra", "agreement"))
        depth = {**DEPTHS, "big": 12}
        assert r["min_layer"] == sp.map_point(source, depth[r["trained_model"]], depth[r["model"]])["min_layer"]
    tables = sr.markdown_tables(result)
    assert not any(r["model"] == "big" and r["task"] == "arc_easy" for r in result["rows"])
    for criterion in sr.REPORTED_CRITERIA:  # the inter-model table: one line per cell and source model
        section = tables.split(f"### Operating point `{criterion}`")[1].split("#### inter-model")[1].split("Mean over")[0]
        assert section.count("| big | small | sst2 | 4 |") == section.count("| big | deep | sst2 | 4 |") == 1
        small = [line.split(" | ")[1:4] for line in section.splitlines() if line.startswith("| small |")]
        assert small == [["deep", "arc_easy", "0"], ["big", "boolq", "0"], ["deep", "boolq", "0"], ["deep", "sst2", "0"],
                         ["big", "sst2", "4"], ["deep", "sst2", "4"]]
    summary = [s for s in sr.summary_rows(result["rows"], "agreement") if (s["policy"], s["setting"]) == ("margin", "inter-model")]
    above = [r for r in rows if not r["at_chance"]]
    assert summary[0]["cells"] == len(above)
    assert summary[0]["mean_layers_saved"] == pytest.approx(np.mean([r["layers_saved"] for r in above]))


def test_write_outputs(tmp_path):
    collections = synthetic_collections()
    result = run_study(collections, plan(TASKS[:3]), sp.CalibrationRules(inner_folds=2), policies=("threshold", "static"),
                       log=lambda m: None)
    written = sr.write_outputs(result, tmp_path, {"command": "python -m adainfer_lmeval.experiments.study test", "seconds": 1.0})
    assert {p.name for p in written} == {"results.json", "results.csv", "report.md", "accuracy_vs_layers_saved.png"}
    assert (tmp_path / "accuracy_vs_layers_saved.png").read_bytes()[:4] == b"\x89PNG"
    assert "python -m adainfer_lmeval.experiments.study test" in (tmp_path / "report.md").read_text()


# Per document: its answer options (continuation tokens); they first differ at 1, 0, 2, 0.
DOCUMENTS = [[[7, 8], [7, 9, 10], [7, 11]], [[12], [13, 14], [15, 16, 17]], [[20, 21, 22], [20, 21, 23]], [[40], [41]],
             [[50, 51], [52, 53]], [[60], [61], [62]]]


def test_collected_option_margin_gives_the_engines_margin_exits_and_answers(tiny_models):
    """The option logits the collector records, turned into margins as the study reads them, give
    the exit layers and answers of the engine's own ``policy=margin``."""
    model = tiny_models["llama"]
    vocab, L = model.config.vocab_size, model.config.num_hidden_layers
    g = torch.Generator().manual_seed(3)
    examples, pairs, keys = [], [], []
    for doc, options in enumerate(DOCUMENTS):
        context = torch.randint(70, vocab, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
        encoded = request_encoding.encode([(context, option) for option in options], max_length=64)
        examples.append(Example("toy", doc, 0, encoded.rows, encoded.decisions, encoded.continuations, 0))
        pairs += [(context, option) for option in options]
        keys += [doc] * len(options)
    trace_examples(EarlyExitEngine(model, build_policy("full", {})), examples, "cpu")
    assert [ex.margin_offset for ex in examples] == [1, 0, 2, 0, 0, 0]
    margins = option_signal_columns([ex.option_logits for ex in examples])[:, :, OPTION_SIGNALS.index("margin")]
    assert not np.isnan(margins).any() and margins.shape == (len(DOCUMENTS), L)
    min_layer = 2
    best = np.sort(margins[:, min_layer - 1 : L - 1].max(1))
    tau = float((best[len(best) // 2 - 1] + best[len(best) // 2]) / 2)  # between two documents: a mixed batch
    offline = exit_layers(margins[:, : L - 1], tau, min_layer)
    assert len(set(offline.tolist())) > 1, "tau should split the documents across layers"

    encoded = request_encoding.encode(pairs, max_length=64, keys=keys)
    (engine_batch,) = list(encoded.batches(rows_per_batch=64))
    batch = ExitBatch.from_rows(engine_batch.tokens, engine_batch.decisions, engine_batch.row_groups,
                                options=engine_batch.option_tokens, margin_offsets=engine_batch.margin_offsets)
    out = EarlyExitEngine(model, build_policy("margin", {"margin": tau, "min_layer": min_layer})).run(batch)
    for group, rows in zip(engine_batch.groups, _rows_by_group(engine_batch)):
        doc = keys[group.rows[0].requests[0]]
        assert {out.exit_layers[r] for r in rows} == {int(offline[doc])}, doc
        # the answer the engine's exit logits give (summed loglikelihoods) is the collected choice there
        lls = {}
        for r, row in zip(rows, group.rows):
            logps = F.log_softmax(out.logits[r].float(), dim=-1)
            for i in row.requests:
                cont = torch.tensor(pairs[i][1])
                lls[i] = float(logps[: len(cont)].gather(1, cont.unsqueeze(1)).sum())
        engine_answer = int(np.argmax([lls[i] for i in sorted(lls)]))  # requests in option order
        collected = examples[doc].option_ll[int(offline[doc]) - 1]
        assert engine_answer == int(np.argmax(collected)), doc


def _rows_by_group(engine_batch) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in engine_batch.groups]
    for r, g in enumerate(engine_batch.row_groups):
        out[g].append(r)
    return out


@pytest.mark.real
def test_offline_evaluation_equals_the_backend(tmp_path):
    """Policies fitted offline give the same exit layers and answers through lm-eval's backend."""
    from adainfer_lmeval.experiments.collect import collect
    from adainfer_lmeval.experiments.study_backend import BACKEND_POLICIES, backend_check
    from adainfer_lmeval.adapter.backend import AdaInferLM
    from adainfer_lmeval.experiments.collect_continuation import collect_continuation
    from adainfer_lmeval.experiments.training_data import load_data, with_continuation
    from adainfer_lmeval.offline.models.fetch import fetch_model

    model = str(fetch_model("smollm2-135m"))
    task = stt.StudyTask.parse("sst2")
    train_path = tmp_path / "train.parquet"
    collect(model, ["sst2"], [0], 16, train_path, doc_filter=stt.doc_filter_for(task, "train"), quiet=True)
    collect_continuation(AdaInferLM(pretrained=model, policy="full", batch_size=1, device="cpu"), train_path)
    train = with_continuation(load_data(train_path), train_path)  # policy=simlens answers with the continuation
    fitted = {policy: sp.fit_study_policy(train, policy, sp.CalibrationRules(inner_folds=2)) for policy in BACKEND_POLICIES}
    for fit in fitted.values():  # an operating point that exits at various layers (not at the last)
        fit["points"]["accuracy"].update(min_layer=10)
    fitted["threshold"]["points"]["accuracy"]["threshold"] = 0.3
    fitted["margin"]["points"]["accuracy"]["threshold"] = float(np.median(train.feats[:, 10:29, train.columns(["margin"])[0]]))
    fitted["static"]["points"]["accuracy"].update(threshold=1.0, min_layer=17)
    fitted["simlens"]["points"]["accuracy"]["threshold"] = float(np.median(train.continuation.margin[:, 10:29]))
    fitted["margin_simlens"]["points"]["accuracy"]["threshold"] = fitted["margin"]["points"]["accuracy"]["threshold"]
    fitted["simlens_static"]["points"]["accuracy"].update(threshold=1.0, min_layer=17)
    report = backend_check(model, task, 12, fitted, train, tmp_path)
    for policy, r in report.items():
        assert r["docs"] == 12
        assert r["exits_equal"], (policy, r["offline_exits"], r["backend_exits"])
        assert r["answers_equal"] and r["offline_acc"] == r["backend_acc"], policy
    assert any(e < 30 for r in report.values() for e in r["backend_exits"])  # they really exit early
    assert len(set(report["margin"]["backend_exits"])) > 1  # the margin splits the documents
    assert set(report["static"]["backend_exits"]) == {17}
    assert len(set(report["simlens"]["backend_exits"])) > 1  # the continuation's margin splits them too
    # readout=continuation: the lens rules' exits, the continuation's answers
    assert report["margin_simlens"]["backend_exits"] == report["margin"]["backend_exits"]
    assert set(report["simlens_static"]["backend_exits"]) == {17}
    # svm_options ran as a policy file reading the shipped files' eight signals
    import json

    from adainfer_lmeval.core.features import FEATURE_NAMES
    from adainfer_lmeval.experiments.training_data import OPTION_SIGNALS

    written = json.loads((tmp_path / "policies" / "svm_options" / "svm.json").read_text())
    assert written["features"] == list(FEATURE_NAMES + OPTION_SIGNALS) and len(written["coef"]) == 8


def test_a_file_collected_before_option_logits_is_collected_again(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from adainfer_lmeval.experiments.collect import SCHEMA_VERSION, read_collection

    path = tmp_path / "old.parquet"
    study = {"task": "sst2@0", "role": "test", "docs": 4, "seed": 0}
    table = pa.table({"task": ["sst2"]}).replace_schema_metadata(
        {b"adainfer": json.dumps({"schema_version": SCHEMA_VERSION - 1, "study": study}).encode()})
    pq.write_table(table, path)
    with pytest.raises(AdaInferError, match=f"collected with schema {SCHEMA_VERSION - 1}.*option_logits.*collect it again"):
        read_collection(path)
    said = []
    assert stt._needs_collecting(path, 4, 0, said.append)
    assert said == [f"  {path}: collected with schema {SCHEMA_VERSION - 1}, this version reads {SCHEMA_VERSION}; collecting again"]
