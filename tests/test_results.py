"""Exit statistics in lm-eval's results, samples and command line (tiny model, tiny local task)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest

import adainfer_lmeval  # noqa: F401

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_sentiment.jsonl"


def _task(name: str = "tiny_sentiment") -> dict:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(FIXTURE)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{text}} . question : positive or negative ? answer :",
        "doc_to_target": "label",
        "doc_to_choice": ["negative", "positive"],
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()  # indexing lm-eval's tasks takes ~12 s: do it once


def _evaluate(task_manager, model: str, model_args: str) -> dict:
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=[_task()], device="cpu", batch_size=4,
        log_samples=True, task_manager=task_manager,
    )


def _splitting_threshold(task_manager, folder) -> tuple[dict, str]:
    """A top-prob threshold under which the tiny model's documents exit at different layers."""
    for tau in (0.01, 0.015, 0.02, 0.03, 0.04, 0.06):
        args = f"pretrained={folder},policy=threshold,top_prob={tau}"
        results = _evaluate(task_manager, "adainfer", args)
        histogram = results["adainfer"]["tasks"]["tiny_sentiment"]["exit_layer_histogram"]
        if len(histogram) > 1:
            return results, args
    pytest.fail("no threshold split the documents across layers")


def test_results_carry_exit_statistics_that_match_the_samples(task_manager, tiny_model_dirs):
    results, _ = _splitting_threshold(task_manager, tiny_model_dirs["llama"])
    samples = results["samples"]["tiny_sentiment"]
    row = results["results"]["tiny_sentiment"]
    summary = results["adainfer"]["tasks"]["tiny_sentiment"]

    layers = [layer for s in samples for layer in s["exit_layers"]]
    assert summary["requests"] == len(layers) == 12
    assert row["layers_mean,none"] == pytest.approx(sum(layers) / len(layers))
    assert row["layers_saved_pct,none"] == pytest.approx(100 * (1 - sum(layers) / len(layers) / 4))
    assert summary["mean_layers"] == row["layers_mean,none"]
    # The choices of one document share one decision.
    assert all(len(set(s["exit_layers"])) == 1 for s in samples)
    # lm-eval's accuracy is what the logged log-probs say.
    recomputed = [
        float(max(range(2), key=lambda i: s["resps"][i][0][0]) == s["target"]) for s in samples
    ]
    assert row["acc,none"] == pytest.approx(sum(recomputed) / len(recomputed))
    assert results["adainfer"]["policy"]["name"] == "threshold"


def test_full_depth_run_equals_hf_backend_run(task_manager, tiny_model_dirs):
    folder = tiny_model_dirs["gpt2"]
    ours = _evaluate(task_manager, "adainfer", f"pretrained={folder},policy=full")
    reference = _evaluate(task_manager, "hf", f"pretrained={folder}")
    assert ours["results"]["tiny_sentiment"]["acc,none"] == reference["results"]["tiny_sentiment"]["acc,none"]
    for mine, theirs in zip(ours["samples"]["tiny_sentiment"], reference["samples"]["tiny_sentiment"]):
        assert [r[0][0] for r in mine["resps"]] == pytest.approx([r[0][0] for r in theirs["resps"]], abs=1e-4)
    assert ours["results"]["tiny_sentiment"]["layers_saved_pct,none"] == 0.0
    assert "adainfer" not in reference


def test_command_line_writes_results_and_prints_the_table(tiny_model_dirs, tmp_path):
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "tiny_sentiment.yaml").write_text(json.dumps(_task()))  # JSON is YAML
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "adainfer_lmeval", "run", "--model", "adainfer",
        "--model_args", f"pretrained={tiny_model_dirs['llama']},policy=threshold,gap=0.9",
        "--tasks", "tiny_sentiment", "--include_path", str(task_dir), "--device", "cpu",
        "--output_path", str(out), "--log_samples", "--limit", "4",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "layers_saved_pct" in done.stdout
    result_files = list(out.rglob("results_*.json"))
    sample_files = list(out.rglob("samples_tiny_sentiment_*.jsonl"))
    assert result_files and sample_files
    saved = json.loads(result_files[0].read_text())
    assert saved["adainfer"]["tasks"]["tiny_sentiment"]["requests"] == 8
    first = json.loads(sample_files[0].read_text().splitlines()[0])
    assert len(first["exit_layers"]) == 2


def test_command_line_refuses_unknown_model_args_in_one_line(tiny_model_dirs):
    command = [
        sys.executable, "-m", "adainfer_lmeval", "--model", "adainfer",
        "--model_args", f"pretrained={tiny_model_dirs['llama']},polcy=full", "--tasks", "sst2",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("adainfer-eval: error: unknown model arg(s) polcy; valid:")


def test_two_processes_with_accelerate_give_the_one_process_results(tiny_model_dirs, tmp_path):
    """Data-parallel evaluation (accelerate, 2 CPU processes) gathers every rank's exits."""
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "tiny_sentiment.yaml").write_text(json.dumps(_task()))
    saved = {}
    for processes in (1, 2):
        out = tmp_path / f"out{processes}"
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "adainfer_lmeval", "run", "--model", "adainfer",
            "--model_args", f"pretrained={tiny_model_dirs['llama']},policy=threshold,top_prob=0.03",
            "--tasks", "tiny_sentiment", "--include_path", str(task_dir), "--output_path", str(out),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        saved[processes] = json.loads(next(out.rglob("results_*.json")).read_text())
    one, two = saved[1], saved[2]
    assert two["results"]["tiny_sentiment"]["acc,none"] == one["results"]["tiny_sentiment"]["acc,none"]
    assert two["adainfer"]["tasks"] == one["adainfer"]["tasks"]
    assert two["adainfer"]["tasks"]["tiny_sentiment"]["requests"] == 12


def _generation_task() -> dict:
    return {
        "task": "tiny_continue",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(FIXTURE)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{text}} . question : positive or negative ? answer :",
        "doc_to_target": "{{['negative', 'positive'][label]}}",
        "generation_kwargs": {"until": ["."], "max_gen_toks": 6, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }


def _generate(task_manager, model: str, model_args: str, batch_size: int = 4) -> dict:
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=[_generation_task()], device="cpu", batch_size=batch_size,
        log_samples=True, task_manager=task_manager,
    )


def test_generation_results_count_token_layers(task_manager, tiny_model_dirs):
    folder = tiny_model_dirs["llama"]
    results = _generate(task_manager, "adainfer", f"pretrained={folder},policy=threshold,top_prob=0.03,min_layer=1")
    samples = results["samples"]["tiny_continue"]
    summary = results["adainfer"]["tasks"]["tiny_continue"]
    per_token = [layer for s in samples for layer in s["exit_layers"][0]]  # one request per doc: its tokens
    assert summary["generated_tokens"] == len(per_token) >= len(samples)
    assert len(set(per_token)) > 1, "the threshold should spread token exits over layers"
    assert summary["mean_layers"] == pytest.approx(sum(per_token) / len(per_token))
    assert sum(summary["exit_layer_histogram"].values()) == len(per_token)
    assert "note" not in results["adainfer"]


def test_generation_at_full_depth_equals_hf_backend(task_manager, tiny_model_dirs):
    folder = tiny_model_dirs["opt"]
    for batch_size in (1, 4):
        ours = _generate(task_manager, "adainfer", f"pretrained={folder},policy=full", batch_size)
        reference = _generate(task_manager, "hf", f"pretrained={folder}", batch_size)
        assert [s["resps"] for s in ours["samples"]["tiny_continue"]] == [
            s["resps"] for s in reference["samples"]["tiny_continue"]
        ]
        assert ours["adainfer"]["tasks"]["tiny_continue"]["layers_saved_pct"] == 0.0
