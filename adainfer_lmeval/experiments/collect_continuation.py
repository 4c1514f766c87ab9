"""The SimLens continuation read-out per layer, collected beside a feature collection.

For every document of a collection (:mod:`.collect`) and every layer l = 1..L it records what the
continuation (the tokens :func:`adainfer_lmeval.core.continuation.carry` carries, through
``DecoderStack.continue_from``'s layers) reads and answers when the document stops at l:

* ``continuation_option_logits`` [L][options]: the options' logits at the group's margin
  position, read at the continuation's last layer (the speaker row's token 0 and positions
  decision .. decision + margin_offset carried from layer l): what the ``continuation_margin``
  signal reads. At l = L no layer is left: the lens at L;
* ``continuation_option_ll`` [L][options]: each option's summed log-likelihood (log-softmax over
  the vocabulary, as lm-eval's ``acc`` and the collection's ``option_ll``) when its row's scored
  positions are carried from layer l; the continuation's answer at l is their argmax;

and what the carries cost, in tokens per remaining layer (:func:`carried_tokens`).

One carry per layer and computed row serves both read-outs: every row carries its token 0 and
all its scored positions, and causal attention keeps the speaker's state at its margin position
from seeing the positions after it, so that state is the one a check's shorter carry gives.

The documents are rebuilt from the collection's keys with lm-eval's prompts and must hash to the
collection's own ``sha256`` (the same token rows); the file lies beside the collection
(:func:`continuation_path`) and is read with it (:func:`read_continuation`).

    python -m adainfer_lmeval.experiments.collect_continuation --model smollm2-135m --collection feats.parquet
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from adainfer_lmeval.adapter import request_encoding
from adainfer_lmeval.core.continuation import carried_positions
from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.experiments.collect import Example, build_examples, examples_hash, read_collection
from adainfer_lmeval.experiments.task_documents import load_tasks
from adainfer_lmeval.offline.pypi import package_versions

CONTINUATION_SCHEMA_VERSION = 1
KEY_COLUMNS = ("task", "doc_id", "num_fewshot")


def continuation_path(collection: Path) -> Path:
    """Where the continuation read-out of ``collection`` lies: beside it."""
    return collection.with_name(f"{collection.stem}-continuation.parquet")


def carried_tokens(example: Example) -> dict:
    """The document's carry sizes, in tokens per remaining layer (semantics of the SimLens policy):

    * ``check_tokens``: one ``continuation_margin`` check, the speaker's token 0 (where the decision
      is not position 0 itself) and positions decision .. decision + margin_offset;
    * ``exit_tokens``: the exit answer, every computed row's token 0 and scored positions;
    * ``reused_tokens``: the part of ``exit_tokens`` a ``simlens`` check already carried (a speaker
      scored at its decision position alone, options differing at once);
    * ``row_tokens``: the group's computed rows' tokens (one layer over the document).
    """
    start = lambda decision: 1 if decision > 0 else 0  # noqa: E731  (token 0 is the decision itself)
    computed = {tuple(row): decision for row, decision in zip(example.rows, example.decision)}
    speaker, decision = example.rows[0], example.decision[0]
    offset = example.margin_offset
    check = start(decision) + offset + 1
    return {
        "check_tokens": check,
        "exit_tokens": sum(start(d) + len(row) - d for row, d in computed.items()),
        "reused_tokens": check if len(speaker) - decision == 1 and offset == 0 else 0,
        "row_tokens": sum(len(row) for row in computed),
    }


def similar_widths(widths: list[int], slack: float = 1.25) -> list[list[int]]:
    """The rows (indices of ``widths``, their carried tokens) in chunks carried together, widest
    first: a chunk pads its rows to its widest, and grows only while that adds at most ``slack``
    times its real tokens (a 60-token option beside 5-token ones would mostly carry padding)."""
    chunks: list[list[int]] = []
    for r in sorted(range(len(widths)), key=lambda r: -widths[r]):
        if chunks and widths[chunks[-1][0]] * (len(chunks[-1]) + 1) <= slack * (sum(widths[c] for c in chunks[-1]) + widths[r]):
            chunks[-1].append(r)
        else:
            chunks.append([r])
    return chunks


class Staircase:
    """Some rows carried from every layer at once, as :func:`~adainfer_lmeval.core.continuation.carry`
    carries them (token 0 and positions ``first..last``, right-padded with copies of the last).

    A carry of a few tokens alone reads every remaining layer's weights for them, L(L-1)/2 layer
    reads per batch for all starting layers; here each layer is read once, for the carries of
    every layer below it together (blocks of rows, one per starting layer), and then the new
    layer's carry joins.
    """

    def __init__(self, rows: list[int], first: list[int], last: list[int], device):
        padded, self.offsets, _ = carried_positions(first, last)  # offsets: where ``first`` sits along the carry
        self.rows = torch.tensor(rows, dtype=torch.long, device=device)
        self.index = torch.tensor(padded, dtype=torch.long, device=device)
        self.carried: torch.Tensor | None = None  # [blocks x rows, width, d]: block b started at layer b + 1

    def step(self, stack, layer: int, hidden: torch.Tensor) -> None:
        """Run the carries started below ``layer`` through it; start the carry from ``layer``'s ``hidden``."""
        if self.carried is not None:
            positions = self.index.repeat(len(self.carried) // len(self.index), 1)
            self.carried = stack.run_layer(layer - 1, self.carried, stack.continuation_inputs(self.carried, positions))
        start = hidden[self.rows[:, None], self.index]
        self.carried = start if self.carried is None else torch.cat([self.carried, start])

    def span(self, start_layer: int, i: int, length: int) -> torch.Tensor:
        """The last-layer states [length, d] of row ``i``'s positions ``first..`` carried from ``start_layer``."""
        row = (start_layer - 1) * len(self.index) + i
        return self.carried[row, self.offsets[i] : self.offsets[i] + length]


@torch.no_grad()
def trace_continuations(stack, examples: list[Example], device, rows_per_batch=16, tokens_per_batch=4096,
                        progress=None) -> dict[int, tuple[list, list]]:
    """{id(example): (continuation option logits [L][options], continuation option ll [L][options])}.

    Batches as :func:`~adainfer_lmeval.experiments.collect.trace_examples` does (a document's
    identical rows run once); the batch's rows are carried from every layer at once
    (:class:`Staircase`), in chunks of similar widths (:func:`similar_widths`).
    """
    from adainfer_lmeval.core.engine import ExitBatch

    options = [(ex, j) for ex in examples for j in range(len(ex.rows))]
    groups = request_encoding.group_rows([ex.rows[j] for ex, j in options], [ex.decision[j] for ex, j in options],
                                         keys=[id(ex) for ex, _ in options])
    out: dict[int, tuple[list, list]] = {}
    for engine_batch in request_encoding.pack(groups, rows_per_batch, tokens_per_batch, count=lambda g: g.requests):
        batch = ExitBatch.from_rows(engine_batch.tokens, engine_batch.decisions, engine_batch.row_groups, device=device)
        first = engine_batch.decisions
        lengths = [len(tokens) for tokens in engine_batch.tokens]
        scored = [n - d for d, n in zip(first, lengths)]
        starts = [sum(scored[:r]) for r in range(len(scored))]  # each row's first scored position among all
        row_of = {i: r for r, row in enumerate(engine_batch.rows) for i in row.requests}
        owners = [(ex, j, row_of[i]) for i, (ex, j) in enumerate(options) if i in row_of]
        speaker = {}
        for ex, _, r in owners:
            speaker.setdefault(id(ex), r)  # option 0's row speaks for its document
        # One entry per (option, continuation token): the flat scored position and the token it scores
        positions, tokens, owner = [], [], []
        margin_positions, margin_tokens = [], []
        for k, (ex, j, r) in enumerate(owners):
            continuation = ex.continuations[j]
            positions += range(starts[r], starts[r] + len(continuation))
            tokens += continuation
            owner += [k] * len(continuation)
            margin_positions.append(starts[speaker[id(ex)]] + ex.margin_offset)
            margin_tokens.append(continuation[ex.margin_offset])
        as_index = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        positions, tokens, owner = as_index(positions), as_index(tokens), as_index(owner)
        margin_positions, margin_tokens = as_index(margin_positions), as_index(margin_tokens)
        chunks = similar_widths([n + (d > 0) for d, n in zip(first, scored)])
        stairs = [Staircase(chunk, [first[r] for r in chunk], [lengths[r] - 1 for r in chunk], device) for chunk in chunks]
        hidden = stack.embed(batch.input_ids)
        inputs = stack.layer_inputs(hidden)
        for layer in range(1, stack.num_layers + 1):
            hidden = stack.run_layer(layer - 1, hidden, inputs)
            for stair in stairs:
                stair.step(stack, layer, hidden)
        del hidden
        read_logits: list[list[float]] = []
        read_ll: list[list[float]] = []
        for layer in range(1, stack.num_layers + 1):
            spans = {r: stair.span(layer, i, scored[r]) for chunk, stair in zip(chunks, stairs) for i, r in enumerate(chunk)}
            logits = stack.exit_logits(torch.cat([spans[r] for r in range(len(scored))])).float()
            picked = F.log_softmax(logits, dim=-1)[positions, tokens]
            lls = torch.zeros(len(owners), dtype=picked.dtype, device=device).index_add_(0, owner, picked)
            read_logits.append(logits[margin_positions, margin_tokens].tolist())
            read_ll.append(lls.tolist())
        for k, (ex, _, _) in enumerate(owners):
            logits_per_layer, ll_per_layer = out.setdefault(id(ex), ([[] for _ in read_ll], [[] for _ in read_ll]))
            for layer, (layer_logits, layer_ll) in enumerate(zip(read_logits, read_ll)):
                logits_per_layer[layer].append(layer_logits[k])
                ll_per_layer[layer].append(layer_ll[k])
        if progress is not None:
            progress.update(len(speaker))
    return out


def rebuild_examples(lm, meta: dict, cols: dict) -> list[Example]:
    """The collection's documents as the collector built them, checked against its hashes."""
    if meta.get("max_length") != lm.max_length:
        raise AdaInferError(f"the collection was built at max_length={meta.get('max_length')}, the model loads {lm.max_length}")
    examples: list[Example] = []
    offset = 0
    for part in meta["parts"]:
        rows = range(offset, offset + part["docs"])
        offset += part["docs"]
        tasks = load_tasks([part["task"]])
        by_task: dict[str, list[int]] = {}
        for i in rows:
            by_task.setdefault(cols["task"][i], []).append(cols["doc_id"][i])
        built: list[Example] = []
        for name, doc_ids in sorted(by_task.items()):
            built.extend(build_examples(lm, tasks[name], name, doc_ids, part["num_fewshot"], meta["fewshot_seed"]))
        if examples_hash(built) != part["sha256"]:
            raise AdaInferError(f"{part['task']} {part['num_fewshot']}-shot: the rebuilt documents differ from the collection's "
                                "(other tasks, prompts or tokenizer)")
        examples.extend(built)
    keys = list(zip(*(cols[k] for k in KEY_COLUMNS)))
    if [(e.task, e.doc_id, e.num_fewshot) for e in examples] != keys:
        raise AdaInferError("the rebuilt documents are not in the collection's order")
    return examples


def continuation_table(examples: list[Example], reads: dict[int, tuple[list, list]]):
    import pyarrow as pa

    costs = [carried_tokens(e) for e in examples]
    cols = {
        "task": [e.task for e in examples], "doc_id": [e.doc_id for e in examples],
        "num_fewshot": [e.num_fewshot for e in examples],
        "continuation_option_logits": [reads[id(e)][0] for e in examples],
        "continuation_option_ll": [reads[id(e)][1] for e in examples],
        **{name: [c[name] for c in costs] for name in costs[0]},
    }
    schema = pa.schema([
        ("task", pa.string()), ("doc_id", pa.int64()), ("num_fewshot", pa.int32()),
        ("continuation_option_logits", pa.list_(pa.list_(pa.float32()))),
        ("continuation_option_ll", pa.list_(pa.list_(pa.float32()))),
        *[(name, pa.int32()) for name in costs[0]],
    ])
    return pa.table(cols, schema=schema)


def collect_continuation(lm, collection: Path, out: Path | None = None, rows_per_batch: int = 16,
                         tokens_per_batch: int = 4096, quiet: bool = True) -> dict:
    """Write the continuation read-out of ``collection`` (default: :func:`continuation_path`) with
    the loaded :class:`~adainfer_lmeval.adapter.backend.AdaInferLM` ``lm``; return its metadata."""
    import pyarrow.parquet as pq
    from tqdm import tqdm

    started = time.time()
    meta, cols = read_collection(collection)
    examples = rebuild_examples(lm, meta, cols)
    with tqdm(total=len(examples), desc=f"continuation {collection.name}", disable=quiet, file=sys.stderr) as bar:
        reads = trace_continuations(lm.engine.stack, examples, lm.device, rows_per_batch, tokens_per_batch, bar)
    seconds = time.time() - started
    written = {
        "continuation_schema_version": CONTINUATION_SCHEMA_VERSION, "collection": collection.name,
        "data_sha256": meta["data_sha256"], "model": meta["model"], "docs": len(examples),
        "seconds": round(seconds, 1), "seconds_per_doc": round(seconds / len(examples), 3), "packages": package_versions(),
    }
    table = continuation_table(examples, reads).replace_schema_metadata({b"adainfer": json.dumps(written).encode()})
    out = continuation_path(collection) if out is None else out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")  # a study reading the folder never sees half a file
    pq.write_table(table, partial)
    partial.replace(out)
    return written


def continuation_is_current(path: Path, collection_meta: dict) -> bool:
    """Whether ``path`` holds the continuation of the collection with ``collection_meta``."""
    import pyarrow.parquet as pq

    if not path.exists():
        return False
    raw = (pq.read_schema(path).metadata or {}).get(b"adainfer")
    meta = json.loads(raw) if raw else {}
    return (meta.get("continuation_schema_version") == CONTINUATION_SCHEMA_VERSION
            and meta.get("data_sha256") == collection_meta.get("data_sha256"))


def read_continuation(path: Path, collection_meta: dict, keys: list[tuple]) -> dict:
    """The columns of the continuation file ``path`` of the collection with ``collection_meta``
    whose documents are ``keys`` ((task, doc_id, num_fewshot) in order)."""
    import pyarrow.parquet as pq

    if not continuation_is_current(path, collection_meta):
        raise AdaInferError(f"{path}: not the continuation read-out of this collection (collect it again)")
    cols = pq.read_table(path).to_pydict()
    if list(zip(*(cols[k] for k in KEY_COLUMNS))) != keys:
        raise AdaInferError(f"{path}: its documents differ from the collection's")
    return cols


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adainfer_lmeval.experiments.collect_continuation",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--collection", type=Path, required=True, help="a parquet file written by experiments.collect")
    parser.add_argument("--model", required=True, help="short name or model folder: the collection's model")
    parser.add_argument("--out", type=Path, help="output parquet file (default: beside the collection)")
    parser.add_argument("--threads", type=int, help="torch threads (1 is faster on a machine shared with other jobs)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from adainfer_lmeval.adapter.backend import AdaInferLM

        device = "cuda" if torch.cuda.is_available() else "cpu"
        lm = AdaInferLM(pretrained=args.model, policy="full", batch_size=1, device=device)
        written = collect_continuation(lm, args.collection, args.out, quiet=False)
    except AdaInferError as error:
        print(f"collect_continuation: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out or continuation_path(args.collection)}: {written['docs']} docs in {written['seconds']}s "
          f"({written['seconds_per_doc']}s per document)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
