"""scripts/bench_against_commit.py: each worker process measures the checkout it is given.

The script's one way to go wrong silently is to import this checkout's package in both
workers (the editable install points here), comparing the code with itself. Two stand-in
checkouts whose backends make different numbers of Python calls per pass, one in the layout
after the redesign and one in the flat layout before it, must each report their own count.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import bench_against_commit  # noqa: E402

STAND_IN = textwrap.dedent('''
    def _tick():
        return None


    class AdaInferLM:
        def __init__(self, **kwargs):
            pass

        def _loglikelihood_tokens(self, requests, disable_tqdm=False):
            for _ in range({calls}):
                _tick()
            return []
''')


def _checkout(root: Path, module: str, calls: int) -> Path:
    path = root / "adainfer_lmeval" / module
    path.parent.mkdir(parents=True, exist_ok=True)
    for folder in {root / "adainfer_lmeval", path.parent}:
        (folder / "__init__.py").touch()
    path.write_text(STAND_IN.format(calls=calls))
    return root


def test_each_worker_imports_the_checkout_it_is_given(tiny_model_dirs, tmp_path):
    after = _checkout(tmp_path / "after", "adapter/backend.py", calls=40)
    before = _checkout(tmp_path / "before", "lm_backend.py", calls=7)
    args = argparse.Namespace(model_dir=str(tiny_model_dirs["llama"]), batch_sizes=[1], repeats=1, calls_only=True)
    counts = {name: bench_against_commit.run_worker(root, args)["1"]
              for name, root in {"after": after, "before": before}.items()}
    per_variant = {name: {c["calls"] for c in variants.values()} for name, variants in counts.items()}
    assert len(per_variant["after"]) == len(per_variant["before"]) == 1  # the same pass for every variant
    # 33 more calls per pass: the stand-ins' loops, and nothing from this checkout's backend
    assert per_variant["after"].pop() - per_variant["before"].pop() == 40 - 7
