"""Collect per-layer exit features from lm-eval tasks, for training stop classifiers.

One command runs a model over (a sample of) an lm-eval task's documents with exactly the
prompts the evaluation uses: lm-eval builds the task's requests (``task.build_all_requests``
with the task's few-shot setting and lm-eval's default few-shot seed), lm-eval's
``TemplateLM.loglikelihood`` tokenizes them for the
:class:`~adainfer_lmeval.adapter.backend.AdaInferLM` instance, :mod:`adainfer_lmeval.adapter.request_encoding` truncates
them as HFLM does and makes the answer options of a document one group, and
:meth:`EarlyExitEngine.trace` gives every layer's view. Per example and per layer it records:

* the exit features (:data:`~adainfer_lmeval.core.features.FEATURE_NAMES`) at the decision
  position (the position predicting the first continuation token);
* the layer's full-vocabulary top-1 token at that position;
* the per-option loglikelihood at that layer (summed over the continuation tokens, as
  lm-eval's ``acc`` does) and the layer's chosen option (their argmax);
* each option's logit at the group's margin position (the first position where the options
  differ, :func:`~adainfer_lmeval.adapter.request_encoding.margin_offset` tokens past the
  decision position): the answer-option signal of :mod:`adainfer_lmeval.core.options`, read from
  the option's own row, as the engine reads it online;

plus the gold option, each option's first token and a hash of the token rows. The output is
a parquet file (one row per example; list columns over layers) whose schema metadata names
the model, tasks, shots, seed and package versions. Nothing is pickled.

Traced batches also go to ``<out>.traces.jsonl`` as they finish, so an interrupted or enlarged
collection resumes (:mod:`adainfer_lmeval.experiments.trace_log`).

    python -m adainfer_lmeval.experiments.collect --model smollm2-135m \
        --tasks arc_easy_train,boolq_train --shots 0,5 --docs 100 --out feats.parquet
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.offline.pypi import package_versions
from adainfer_lmeval.core.features import FEATURE_NAMES
from adainfer_lmeval.adapter import request_encoding as request_encoding
from adainfer_lmeval.experiments.task_documents import DEFAULT_FEWSHOT_SEED, load_tasks, sample_docs, task_instances
from adainfer_lmeval.experiments.trace_log import TraceLog, trace_log_path

SCHEMA_VERSION = 2  # 2: option_logits, margin_offset


@dataclass
class Example:
    """One document: its option rows (token lists sharing a decision position) and gold."""

    task: str
    doc_id: int
    num_fewshot: int
    rows: list[list[int]]
    decision: list[int]
    continuations: list[list[int]]
    gold: int
    source: str = ""  # the task or group named on the command line
    # filled by the trace
    features: list[list[float]] = field(default_factory=list)  # [L][F]
    top1: list[int] = field(default_factory=list)  # [L]
    option_ll: list[list[float]] = field(default_factory=list)  # [L][options]
    option_logits: list[list[float]] = field(default_factory=list)  # [L][options] at the margin position

    def seen(self) -> list:  # the example's identity: what the model saw and the gold it is scored against
        return [self.task, self.doc_id, self.num_fewshot, self.rows, self.gold]

    @property
    def margin_offset(self) -> int:
        return request_encoding.margin_offset(self.continuations)


def _gold_index(task, doc, choices: list[str]) -> int:
    gold = task.doc_to_target(doc)
    if isinstance(gold, list):
        gold = gold[0]
    if isinstance(gold, str):
        gold = choices.index(gold) if gold in choices else -1
    return int(gold) if 0 <= int(gold) < len(choices) else -1


def build_examples(lm, task, name: str, doc_ids: list[int], shots: int, fewshot_seed: int) -> list[Example]:
    """The task's lm-eval requests for ``doc_ids``, tokenized as AdaInferLM scores them."""
    from adainfer_lmeval.adapter.loglikelihood import tokenized_requests

    examples = []
    for doc_id, insts in task_instances(lm, task, doc_ids, shots, fewshot_seed).items():
        doc = insts[0].doc
        choices = task.doc_to_choice(doc)
        encoded = request_encoding.encode([(c, k) for _, c, k in tokenized_requests(lm, insts)], lm.max_length)
        if len(encoded.groups) != 1:  # options that do not share the decision prefix are not one group
            continue
        gold = _gold_index(task, doc, choices)
        if gold < 0:
            continue
        examples.append(Example(name, int(doc_id), int(task.get_config("num_fewshot") or 0), encoded.rows, encoded.decisions,
                                encoded.continuations, gold))
    return examples


@torch.no_grad()
def trace_examples(engine, examples: list[Example], device, rows_per_batch=16, tokens_per_batch=4096, progress=None, on_batch=None):
    """Fill each example's per-layer features, top-1 tokens, option loglikelihoods and option logits
    (``on_batch(examples)`` gets each batch's examples once they are filled)."""
    from adainfer_lmeval.core.engine import ExitBatch

    # One group per document (two documents with the same prompt stay two); identical rows
    # (single-token options: every row is the context) run once: the model is causal, so this
    # changes nothing but the cost. --rows-per-batch counts answer options.
    options = [(ex, j) for ex in examples for j in range(len(ex.rows))]
    groups = request_encoding.group_rows([ex.rows[j] for ex, j in options], [ex.decision[j] for ex, j in options],
                                         keys=[id(ex) for ex, _ in options])
    for engine_batch in request_encoding.pack(groups, rows_per_batch, tokens_per_batch, count=lambda g: g.requests):
        batch = ExitBatch.from_rows(engine_batch.tokens, engine_batch.decisions, engine_batch.row_groups, device=device)
        # (example, option, batch row) per option, in option order; an example's first row speaks for it
        row_of = sorted((i, r) for r, row in enumerate(engine_batch.rows) for i in row.requests)
        owners = [(*options[i], r) for i, r in row_of]
        batch_examples = list({id(ex): ex for ex, _, _ in owners}.values())
        first = {}
        for ex, _, i in owners:
            first.setdefault(id(ex), i)
        for ex in batch_examples:
            ex.features, ex.top1, ex.option_ll, ex.option_logits = [], [], [], []
        offsets = {id(ex): ex.margin_offset for ex in batch_examples}
        for view in engine.trace(batch):
            feats = view.features.float().cpu()
            logps = [F.log_softmax(lg.float(), dim=-1) for lg in view.logits]
            lls: dict[int, list[float]] = {}
            logits: dict[int, list[float]] = {}
            for ex, j, i in owners:
                cont = torch.tensor(ex.continuations[j], dtype=torch.long, device=logps[i].device)
                lls.setdefault(id(ex), []).append(float(logps[i].gather(1, cont.unsqueeze(1)).sum()))
                at = offsets[id(ex)]
                logits.setdefault(id(ex), []).append(float(view.logits[i][at, ex.continuations[j][at]]))
            for ex in batch_examples:
                i = first[id(ex)]
                ex.features.append([float(v) for v in feats[i]])
                ex.top1.append(int(view.logits[i][0].argmax()))
                ex.option_ll.append(lls[id(ex)])
                ex.option_logits.append(logits[id(ex)])
        if on_batch is not None:
            on_batch(batch_examples)
        if progress is not None:
            progress.update(len(batch_examples))


def examples_table(examples: list[Example]):
    import pyarrow as pa

    cols = {
        "source": [e.source for e in examples],
        "task": [e.task for e in examples],
        "doc_id": [e.doc_id for e in examples],
        "num_fewshot": [e.num_fewshot for e in examples],
        "n_options": [len(e.rows) for e in examples],
        "gold": [e.gold for e in examples],
        "context_tokens": [e.decision[0] for e in examples],
        "option_first_token": [[c[0] for c in e.continuations] for e in examples],
        "features": [e.features for e in examples],
        "top1": [e.top1 for e in examples],
        "option_ll": [e.option_ll for e in examples],
        "option_choice": [[max(range(len(ll)), key=ll.__getitem__) for ll in e.option_ll] for e in examples],
        "option_logits": [e.option_logits for e in examples],
        "margin_offset": [e.margin_offset for e in examples],
    }
    schema = pa.schema([
        ("source", pa.string()), ("task", pa.string()), ("doc_id", pa.int64()), ("num_fewshot", pa.int32()), ("n_options", pa.int32()),
        ("gold", pa.int32()), ("context_tokens", pa.int32()), ("option_first_token", pa.list_(pa.int64())),
        ("features", pa.list_(pa.list_(pa.float32()))), ("top1", pa.list_(pa.int64())),
        ("option_ll", pa.list_(pa.list_(pa.float32()))), ("option_choice", pa.list_(pa.int32())),
        ("option_logits", pa.list_(pa.list_(pa.float32()))), ("margin_offset", pa.int32()),
    ])
    return pa.table(cols, schema=schema)


def examples_hash(examples: list[Example]) -> str:
    """sha256 over what the model saw: task, doc, shots and every option's token row."""
    h = hashlib.sha256()
    for e in sorted(examples, key=lambda e: (e.task, e.num_fewshot, e.doc_id)):
        h.update(json.dumps(e.seen()).encode())
    return h.hexdigest()


def collect(
    model: str,
    task_specs: list[str],
    shots: list[int],
    n_docs: int | None,
    out: Path,
    seed: int = 0,
    fewshot_seed: int = DEFAULT_FEWSHOT_SEED,
    rows_per_batch: int = 16,
    tokens_per_batch: int = 4096,
    max_length: int | None = None,
    quiet: bool = False,
    doc_filter=None,
    lm=None,
    extra_meta: dict | None = None,
) -> dict:
    """Run ``model`` over ``task_specs`` × ``shots``; write ``out`` (parquet); return its metadata.

    ``doc_filter(task_name, doc_id)`` restricts which documents may be sampled; ``lm`` reuses an
    already loaded :class:`AdaInferLM` (``policy=full``) instead of loading ``model`` again.
    """
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from adainfer_lmeval.adapter.backend import AdaInferLM

    started = time.time()
    extra = {"max_length": max_length} if max_length else {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if lm is None:
        lm = AdaInferLM(pretrained=model, policy="full", batch_size=1, device=device, **extra)
    engine = lm.engine
    identity = engine.stack.identity()
    log = TraceLog(trace_log_path(out), identity, SCHEMA_VERSION)
    examples: list[Example] = []
    per_part = []
    for spec in task_specs:
        tasks = load_tasks([spec])
        for k in shots:
            chosen = sample_docs(tasks, spec, n_docs, k, seed, doc_filter)
            part: list[Example] = []
            for name, ids in sorted(chosen.items()):
                part.extend(build_examples(lm, tasks[name], name, ids, k, fewshot_seed))
            if not part:
                continue
            tokens = sum(len(r) for e in part for r in e.rows)
            desc = f"{spec} {k}-shot ({len(part)} docs, {tokens / len(part):.0f} tok/doc)"
            t0 = time.time()
            pending = log.restore(part)
            with tqdm(total=len(part), initial=len(part) - len(pending), desc=desc, disable=quiet, file=sys.stderr) as bar:
                if pending:
                    trace_examples(engine, pending, lm.device, rows_per_batch, tokens_per_batch, bar, on_batch=log.append)
            for e in part:
                e.source = spec
            per_part.append({
                "task": spec, "num_fewshot": k, "docs": len(part), "tokens": tokens,
                "resumed": len(part) - len(pending),  # read back from the trace log, not traced now
                "seconds": round(time.time() - t0, 1), "sha256": examples_hash(part),
            })
            examples.extend(part)
    if not examples:
        raise AdaInferError("no examples collected (empty tasks or samples)")
    meta = {
        "schema_version": SCHEMA_VERSION,
        "model": {
            "name": identity.name, "model_type": identity.model_type, "num_layers": identity.num_layers,
            "hidden_size": identity.hidden_size, "vocab_size": identity.vocab_size,
        },
        "feature_names": list(FEATURE_NAMES),
        "tasks": task_specs,
        "shots": shots,
        "docs_per_task": n_docs,
        "seed": seed,
        "fewshot_seed": fewshot_seed,
        "max_length": lm.max_length,
        "parts": per_part,
        "data_sha256": examples_hash(examples),
        "packages": package_versions(),
        "seconds": round(time.time() - started, 1),
        **(extra_meta or {}),
    }
    table = examples_table(examples)
    table = table.replace_schema_metadata({b"adainfer": json.dumps(meta).encode()})
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    return meta


def _metadata(path: Path, schema) -> dict:
    raw = (schema.metadata or {}).get(b"adainfer")
    if raw is None:
        raise AdaInferError(f"{path}: parquet file has no adainfer metadata (not written by adainfer_lmeval.experiments.collect)")
    return json.loads(raw)


def _unreadable(path: Path, error: Exception) -> AdaInferError:
    return AdaInferError(f"{path}: not a readable feature parquet ({type(error).__name__}: {str(error).splitlines()[0]})")


def read_metadata(path: Path) -> dict:
    """The metadata of a collected file of any schema version (reads no rows)."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as error:  # noqa: BLE001
        raise _unreadable(path, error) from None
    return _metadata(path, schema)


def read_collection(path: Path) -> tuple[dict, dict]:
    """(metadata, columns as python lists) of a collected parquet file of this schema version."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # noqa: BLE001
        raise _unreadable(path, error) from None
    meta = _metadata(path, table.schema)
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise AdaInferError(f"{path}: collected with schema {meta.get('schema_version')}, this version reads {SCHEMA_VERSION} "
                            "(it adds option_logits): collect it again")
    return meta, table.to_pydict()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adainfer_lmeval.experiments.collect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="short name or model folder")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks or groups (multiple_choice)")
    parser.add_argument("--shots", default="0", help="comma-separated few-shot counts, e.g. 0,5")
    parser.add_argument("--docs", type=int, default=100, help="documents sampled per task (group: over all its subtasks); 0 = all")
    parser.add_argument("--seed", type=int, default=0, help="document sampling seed")
    parser.add_argument("--fewshot-seed", type=int, default=DEFAULT_FEWSHOT_SEED)
    parser.add_argument("--rows-per-batch", type=int, default=16)
    parser.add_argument("--tokens-per-batch", type=int, default=4096)
    parser.add_argument("--threads", type=int, help="torch threads (1 is faster on a machine shared with other jobs)")
    parser.add_argument("--out", type=Path, required=True, help="output parquet file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        meta = collect(
            args.model, [t for t in args.tasks.split(",") if t], [int(s) for s in args.shots.split(",")],
            args.docs or None, args.out, args.seed, args.fewshot_seed, args.rows_per_batch, args.tokens_per_batch,
        )
    except AdaInferError as error:
        print(f"collect: error: {error}", file=sys.stderr)
        return 2
    for p in meta["parts"]:
        print(f"{p['task']:>22} {p['num_fewshot']}-shot  {p['docs']:4d} docs ({p['resumed']} from the trace log)  "
              f"{p['tokens']:7d} tokens  {p['seconds']:6.1f}s")
    print(f"wrote {args.out} ({meta['seconds']}s, data sha256 {meta['data_sha256'][:16]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
