"""Nothing lost, nothing crashes, nothing silently wrong (issue 13, backend and CLI side):
``--use_cache``, ``batch_size=auto``, NaN log-probabilities and one-line errors for bad input."""

from __future__ import annotations

import pickle
import sqlite3
from pathlib import Path

import lm_eval
import pytest
import torch
import transformers as tf
from lm_eval.api.instance import Instance

import adainfer_lmeval  # noqa: F401  (registers the model)
from adainfer_lmeval.cli import main as cli
from adainfer_lmeval.core.accounting import ExitRecord
from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.adapter.backend import AdaInferLM
from adainfer_lmeval.adapter.model_args import check_model_args, parse_model_args, split_model_args
from adainfer_lmeval.adapter.responses import GeneratedText, ScoredContinuation, ScoredFloat

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_sentiment.jsonl"
CONTEXTS = ["the quick brown fox jumps over", "question : what is the answer ? answer :", "a film that is great ,"]
CONTINUATIONS = [" the lazy dog", " yes", " positive negative"]


def _choice_task() -> dict:
    return {
        "task": "tiny_sentiment", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(FIXTURE)}},
        "test_split": "test", "output_type": "multiple_choice",
        "doc_to_text": "{{text}} . question : positive or negative ? answer :", "doc_to_target": "label",
        "doc_to_choice": ["negative", "positive"],
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }


def _generation_task() -> dict:
    return {
        "task": "tiny_generation", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(FIXTURE)}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{text}} . answer :",
        "doc_to_target": "{{'positive' if label else 'negative'}}",
        "generation_kwargs": {"until": ["."], "max_gen_toks": 4, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False)  # the tasks are dicts: no need to index lm-eval's


@pytest.fixture
def computed(monkeypatch):
    """The requests the model really computes, per call (served-from-cache ones never get here)."""
    seen: list[tuple[str, int]] = []
    score, generate = AdaInferLM._loglikelihood_tokens, AdaInferLM.generate_until

    def counting_score(self, requests, *args, **kwargs):
        seen.append(("loglikelihood", len(requests)))
        return score(self, requests, *args, **kwargs)

    def counting_generate(self, requests, *args, **kwargs):
        seen.append(("generate_until", len(requests)))
        return generate(self, requests, *args, **kwargs)

    monkeypatch.setattr(AdaInferLM, "_loglikelihood_tokens", counting_score)
    monkeypatch.setattr(AdaInferLM, "generate_until", counting_generate)
    return seen


def _evaluate(task_manager, model_args: str, cache: Path | None, tasks=None) -> dict:
    return lm_eval.simple_evaluate(
        model="adainfer", model_args=model_args, tasks=tasks or [_choice_task(), _generation_task()],
        device="cpu", batch_size=2, log_samples=True, task_manager=task_manager,
        use_cache=None if cache is None else str(cache),
    )


def _figures(results: dict) -> tuple:
    samples = {task: [(s["doc_id"], s["resps"], s["exit_layers"]) for s in found] for task, found in results["samples"].items()}
    tasks = {task: {k: v for k, v in row.items() if k != "alias"} for task, row in results["results"].items()}
    return tasks, results["adainfer"]["tasks"], samples


# ---- --use_cache ------------------------------------------------------------------------------


def test_responses_survive_pickling_with_their_exit_records():
    record = ExitRecord(layers=2, num_layers=4, flops=10.0, full_flops=20.0, checks=1.0, tokens=2, token_layers=(2, 3))
    for value in (ScoredContinuation(-1.5, True, record), ScoredFloat(-7.25, record), GeneratedText("yes", record)):
        back = pickle.loads(pickle.dumps(value))
        assert type(back) is type(value) and back == value and back.exit == record


def test_use_cache_serves_a_rerun_with_the_same_results_and_exit_statistics(task_manager, tiny_model_dirs, tmp_path, computed):
    args = f"pretrained={tiny_model_dirs['llama']},policy=threshold,top_prob=0.03"
    first = _evaluate(task_manager, args, tmp_path / "cache")
    assert [kind for kind, _ in computed] == ["loglikelihood", "generate_until"]
    computed.clear()
    second = _evaluate(task_manager, args, tmp_path / "cache")
    assert computed == [], "every answer should have been served from the cache"
    assert _figures(second) == _figures(first)
    assert second["adainfer"]["tasks"]["tiny_sentiment"]["requests"] == 2 * len(second["samples"]["tiny_sentiment"])
    assert second["adainfer"]["tasks"]["tiny_generation"]["requests"] == len(second["samples"]["tiny_generation"])
    # and the same answers without any cache
    assert _figures(_evaluate(task_manager, args, None)) == _figures(first)


def test_use_cache_never_serves_answers_of_other_model_args(task_manager, tiny_model_dirs, tmp_path, computed):
    folder, cache = tiny_model_dirs["llama"], tmp_path / "cache"
    full = _evaluate(task_manager, f"pretrained={folder},policy=full", cache)
    computed.clear()
    static = _evaluate(task_manager, f"pretrained={folder},policy=static,layer=1", cache)
    assert [kind for kind, _ in computed] == ["loglikelihood", "generate_until"], "another policy must be computed"
    assert all(layers == [1, 1] for *_, layers in _figures(static)[2]["tiny_sentiment"])
    computed.clear()
    again = _evaluate(task_manager, f"pretrained={folder},policy=full", cache)
    assert computed == [] and _figures(again) == _figures(full)
    # one file, one table per model-args digest
    tables = {row[0] for row in sqlite3.connect(str(cache) + "_rank0.db").execute("select name from sqlite_master where type='table'")}
    assert len({t for t in tables if t.startswith("adainfer_")}) == 2


def test_use_cache_resumes_a_killed_run_without_recomputing(task_manager, tiny_model_dirs, tmp_path, monkeypatch):
    from adainfer_lmeval.core.engine import EarlyExitEngine

    args = f"pretrained={tiny_model_dirs['llama']},policy=threshold,top_prob=0.03"
    rows_run: list[int] = []
    run = EarlyExitEngine.run

    def counting(self, batch):
        rows_run.append(batch.input_ids.shape[0])
        return run(self, batch)

    def dies_after_two_batches(self, batch):
        if len(rows_run) == 2:
            raise KeyboardInterrupt
        return counting(self, batch)

    monkeypatch.setattr(EarlyExitEngine, "run", counting)
    reference = _evaluate(task_manager, args, None, tasks=[_choice_task()])
    total, batches = sum(rows_run), len(rows_run)
    assert batches > 2
    rows_run.clear()
    monkeypatch.setattr(EarlyExitEngine, "run", dies_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        _evaluate(task_manager, args, tmp_path / "cache", tasks=[_choice_task()])
    done = sum(rows_run)
    rows_run.clear()
    monkeypatch.setattr(EarlyExitEngine, "run", counting)
    resumed = _evaluate(task_manager, args, tmp_path / "cache", tasks=[_choice_task()])
    assert sum(rows_run) == total - done, "the resumed run computes only what the killed one had not"
    assert _figures(resumed) == _figures(reference)


# ---- batch_size=auto ----------------------------------------------------------------------------


def _requests():
    return [Instance("loglikelihood", {}, (c, k), idx=0) for c in CONTEXTS for k in CONTINUATIONS]


def test_batch_size_auto_probes_at_the_longest_request_and_gives_the_same_answers(tiny_model_dirs):
    folder = str(tiny_model_dirs["llama"])
    auto = AdaInferLM(pretrained=folder, device="cpu", batch_size="auto", max_batch_size=4, policy="threshold", top_prob=0.03)
    assert auto.max_length >= 2048  # the probe must not run at this length
    probes = []
    call = auto._model_call
    auto._model_call = lambda inps, *a, **k: probes.append(tuple(inps.shape)) or call(inps, *a, **k)
    answers = auto.loglikelihood(_requests())
    longest = max(len(auto.tok_encode(c) + auto.tok_encode(k)) - 1 for c in CONTEXTS for k in CONTINUATIONS)
    assert probes and {shape[1] for shape in probes} == {longest}
    fixed = AdaInferLM(pretrained=folder, device="cpu", batch_size=8, policy="threshold", top_prob=0.03)
    reference = fixed.loglikelihood(_requests())
    assert [a.exit.layers for a in answers] == [r.exit.layers for r in reference]
    assert [a[0] for a in answers] == pytest.approx([r[0] for r in reference], abs=1e-5)

    # generation and rolling loglikelihood probe at their longest input too (HFLM: max_length)
    probes.clear()
    until = {"until": ["."], "max_gen_toks": 5, "do_sample": False}
    texts = auto.generate_until([Instance("generate_until", {}, (c, dict(until)), idx=0) for c in CONTEXTS])
    assert {shape[1] for shape in probes} == {max(len(auto.tok_encode(c)) for c in CONTEXTS) + 5}
    assert texts == fixed.generate_until([Instance("generate_until", {}, (c, dict(until)), idx=0) for c in CONTEXTS])
    probes.clear()
    rolling = [Instance("loglikelihood_rolling", {}, (c,), idx=0) for c in CONTEXTS]
    assert auto.loglikelihood_rolling(rolling) == pytest.approx(fixed.loglikelihood_rolling(rolling), abs=1e-5)
    assert {shape[1] for shape in probes} == {max(len(auto.tok_encode(c)) for c in CONTEXTS) + 1}


# ---- NaN in the log-probabilities ---------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_model_dir(tiny_model_dirs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("nan_model")
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, :4] = float("nan")  # a few garbage values
    model.save_pretrained(folder)
    tf.AutoTokenizer.from_pretrained(tiny_model_dirs["llama"]).save_pretrained(folder)
    return folder


def test_nan_log_probabilities_fail_the_run_in_one_line(nan_model_dir):
    lm = AdaInferLM(pretrained=str(nan_model_dir), device="cpu", batch_size=4)
    with pytest.raises(AdaInferError) as error:
        lm.loglikelihood(_requests())
    message = str(error.value)
    assert "NaN in the scored log-probabilities" in message and "\n" not in message
    lm._pretrained_name = "smollm2-135m"  # as if it were the zoo's copy: name the refetch
    with pytest.raises(AdaInferError, match=r"adainfer-eval models fetch smollm2-135m --force"):
        lm.loglikelihood(_requests())


# ---- one-line errors, early ---------------------------------------------------------------------


def _cli_error(capsys, argv: list[str]) -> str:
    """The one line ``adainfer-eval`` ends with (lm-eval's own log lines may come before it)."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and [line for line in lines if "error:" in line] == lines[-1:], lines
    assert lines[-1].startswith("adainfer-eval: error: ")
    return lines[-1]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if any weights load (range errors must come from the config alone)."""
    import functools

    from lm_eval.models.huggingface import HFLM

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(HFLM, "__init__", functools.wraps(HFLM.__init__)(refuse))  # same signature: same valid args


@pytest.mark.parametrize(
    "extra, message",
    [
        (",policy=threshold,gap=0.5,min_layer=0", "min_layer=0 must be >= 1"),
        (",policy=static,layer=999", "layer=999 is outside 1..4"),
        (",policy=static,layer=0", "layer=0 must be >= 1"),
        (",policy=threshold,gap=0.5,min_layer=1.5", "min_layer=1.5 is not a whole number"),
        (",policy=threshold,gap=0.5,min_layer=true", "min_layer=True is not a valid int"),
        (",policy=threshold,gap=nan", "gap=nan must be a finite number"),
        (",policy=threshold,gap=0.5,gap=0.9", "model arg gap is given twice (gap=0.5, gap=0.9)"),
        (",trust_remote_code", "model arg 'trust_remote_code' has no value"),
        (",check_vocab=100000", "check_vocab=100000 must be below the model's vocabulary"),
        (",check_vocab=8,check_clusters=1000", "check_clusters=1000 must be between 2 and"),
        (",check_vocab=8,check_clusters=4,check_probes=9", "check_probes=9 must be between 1 and check_clusters=4"),
        (",check_vocab=8,check_clusters=4,check_probes=0", "check_probes=0 must be an integer >= 1"),
        (",check_vocab=8,check_clusters=4,check_probes=2.5", "check_probes=2.5 must be an integer >= 1"),
    ],
)
def test_bad_model_args_are_refused_before_weights_load(tiny_model_dirs, capsys, no_model_load, extra, message):
    line = _cli_error(capsys, ["--model", "adainfer", "--model_args", f"pretrained={tiny_model_dirs['llama']}{extra}",
                               "--tasks", "tiny_sentiment", "--device", "cpu"])
    assert message in line
    with pytest.raises(AdaInferError) as error:  # the same from Python
        AdaInferLM.create_from_arg_string(f"pretrained={tiny_model_dirs['llama']}{extra}", {"device": "cpu"})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_unknown_model_and_missing_gpu_are_one_line(tiny_model_dirs, capsys, no_model_load):
    line = _cli_error(capsys, ["--model", "adainfer", "--model_args", "pretrained=nosuch", "--tasks", "tiny_sentiment"])
    assert "pretrained=nosuch is not a local model folder, a zoo model" in line and "adainfer-eval models list" in line
    if not torch.cuda.is_available():
        line = _cli_error(capsys, ["--model", "adainfer", "--model_args", f"pretrained={tiny_model_dirs['llama']}",
                                   "--tasks", "tiny_sentiment", "--device", "cuda"])
        assert "device=cuda: torch sees no CUDA GPU" in line and "--device cpu" in line
        with pytest.raises(AdaInferError, match="torch sees no CUDA GPU"):
            AdaInferLM(pretrained=str(tiny_model_dirs["llama"]), device="cuda")


def test_no_device_given_means_the_gpu_if_there_is_one(tiny_model_dirs):
    lm = AdaInferLM(pretrained=str(tiny_model_dirs["llama"]), batch_size=2)  # HFLM's default is "cuda"
    assert lm.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_flag_given_twice_with_different_values_is_one_line(tiny_model_dirs):
    with pytest.raises(AdaInferError, match=r"device is given twice: device=cpu in the model args and cuda by --device"):
        AdaInferLM.create_from_arg_string(f"pretrained={tiny_model_dirs['llama']},device=cpu", {"device": "cuda"})
    # what lm-eval's command line passes for absent flags (device cuda:0, batch size 1) yields to the model args
    lm = AdaInferLM.create_from_arg_string(f"pretrained={tiny_model_dirs['llama']},device=cpu,batch_size=3",
                                           {"device": "cuda:0", "batch_size": 1, "max_batch_size": None})
    assert lm.device.type == "cpu" and lm.batch_size == 3


def test_model_args_as_several_words_or_json_are_checked_too(tiny_model_dirs, capsys, no_model_load):
    folder = tiny_model_dirs["llama"]
    for words in ([f"pretrained={folder}", "policy=full", "gap=0.5"], ['{"pretrained": "%s", "policy": "full", "gap": 0.5}' % folder]):
        line = _cli_error(capsys, ["--model", "adainfer", "--model_args", *words, "--tasks", "tiny_sentiment"])
        assert "policy=full does not take gap" in line
    line = _cli_error(capsys, ["--model", "adainfer", "--model_args", f"pretrained={folder},gap=0.5", "gap=0.6",
                               "--tasks", "tiny_sentiment"])
    assert "model arg gap is given twice" in line


def test_task_not_available_offline_is_refused_before_a_model_loads(tiny_model_dirs, capsys, no_model_load):
    line = _cli_error(capsys, ["--model", "adainfer", "--model_args", f"pretrained={tiny_model_dirs['llama']}",
                               "--tasks", "winogrande", "--device", "cpu"])
    assert "task winogrande loads allenai/winogrande from the Hugging Face Hub" in line and "adainfer-eval data list" in line


def test_unknown_task_is_one_line(tiny_model_dirs, capsys, no_model_load):
    line = _cli_error(capsys, ["--model", "adainfer", "--model_args", f"pretrained={tiny_model_dirs['llama']}",
                               "--tasks", "nosuchtask", "--device", "cpu"])
    assert "unknown task(s) nosuchtask" in line and "adainfer-eval ls tasks" in line


def test_model_arg_parsing():
    assert parse_model_args("pretrained=x,gap=0.5,min_layer=2,flag=true") == {
        "pretrained": "x", "gap": 0.5, "min_layer": 2, "flag": True}
    check_model_args("policy=threshold,gap=0.5,min_layer=2.0,pretrained=smollm2-135m")  # 2.0 is a whole number
    _, checks, _ = split_model_args("full", {"check_vocab": 8, "check_clusters": 4, "check_probes": 1})
    assert checks.probes == 1  # one probed cluster is a valid choice


def test_bad_probe_count_is_reported_as_such_not_as_a_bad_cache(tiny_models, monkeypatch, tmp_path, capsys):
    from adainfer_lmeval.core import head_clusters as hc

    monkeypatch.setenv("ADAINFER_CACHE", str(tmp_path))
    weight = tiny_models["llama"].get_output_embeddings().weight
    hc.HeadClusters.for_head(weight, 8)  # builds and caches the clustering
    built = []
    monkeypatch.setattr(hc, "kmeans", lambda *a, **k: built.append(1) or pytest.fail("k-means re-run"))
    for probes in (9, 0, 2.5):
        with pytest.raises(AdaInferError, match=rf"check_probes={probes!r} must be an integer between 1 and check_clusters=8"):
            hc.HeadClusters.for_head(weight, 8, probes)
    assert "unreadable" not in capsys.readouterr().out and not built
    assert hc.HeadClusters.for_head(weight, 8, 3).probes == 3
