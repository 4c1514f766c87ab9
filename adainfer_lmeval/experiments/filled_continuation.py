"""A lead for issue 15: the continuation read-out with the prompt filled in, beside SimLens.

SimLens (:mod:`adainfer_lmeval.core.continuation`) carries token 0 and the scored positions through
the remaining layers *alone*: the last layers never see the rest of the prompt, and on our models
the answer they give from layer L-1 still differs from full depth's on 8% of SmolLM2's SST-2
documents. The **filled** continuation carries the scored positions attending to the whole prompt,
whose keys and values at each remaining layer come from the exit layer's states (the K/V
projections only: CALM's state propagation, :meth:`DecoderStack.fill_kv`, as generation fills the
layers an exited token skipped). From layer L-1 it is the full forward exactly; from earlier layers
only the prompt's upper-layer states are approximated, none are left out.

A cheaper variant, ``--last-layers K``: a carry from layer l skips to the model's last K layers
(``<collection>-last<K>.parquet``; the carry costs K layers, not L - l).

The engine runs it as ``carry=filled`` (``policy=simlens,carry=filled``, ``readout=continuation``
rules; tests/test_filled_engine.py checks it against :func:`trace_filled` on real data) and
``train --carry filled`` calibrates on it; the study's one command does not read it yet. This
module computes the read-out for a collection (offline, one row at a time), writes it in the continuation file's columns
(``<collection>-filled.parquet`` beside it) and calibrates the study's three SimLens rules on the
training documents with either read-out, scored on the test documents, both restricted to exits at
layers >= ``--from-layer`` (the filled carries start there). Costs in layer equivalents, counted as
the study counts SimLens's (carried tokens x the layers carried through over the document's tokens) plus what
filling adds per layer carried through: each prompt token's K/V projections
(``kv_matmul_params / layer_matmul_params`` of a token-layer, as the engine's generation charges a
fill) and each carried token's attention over the prompt.

    python -m adainfer_lmeval.experiments.filled_continuation --model smollm2-135m --task sst2@0 --from-layer 15 \
        --last-layers 1,2,all --json reports/study/readouts/smollm2_sst2@0.json

(``--json``: the tables as a file, which :mod:`.readout_plot` draws.) A read-out keeps each document
as it goes (``<collection>-filled.resume.jsonl``, :class:`ResumeLog`): an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from adainfer_lmeval.core.continuation import fill_carry
from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.experiments.study_policies import CONTINUATION_POLICIES


def filled_carry(stack, states: list[torch.Tensor], decision: int, starts: list[int],
                 last_layers: int | None = None) -> torch.Tensor:
    """[len(starts), n - decision, d]: one row's positions ``decision..n-1`` carried from each start
    layer l of ``starts`` (:func:`~adainfer_lmeval.core.continuation.fill_carry`, one batch row per
    start, so that each remaining layer's weights are read once for all of them).

    ``states``: the row's states [1, n, d] at layers 0..L (embeddings first, before the final norm).
    """
    n = states[0].shape[1]
    held = torch.cat([states[layer] for layer in starts])
    return fill_carry(stack, held, starts, [decision] * len(starts), [n - 1] * len(starts), last_layers)


@torch.no_grad()
def trace_filled(stack, example, from_layer: int, kinds: list[int | None]) -> dict:
    """Per read-out of ``kinds`` (K: the last K layers alone, None: every remaining layer), the
    (options' logits [L][options] at the margin position, options' summed log-likelihoods
    [L][options]) read off the filled carries from each layer l >= ``from_layer`` (at L: full
    depth); below it nothing is read (NaN: a margin that never stops, and no exit is scored there).
    Each row's own forward runs once for all of them."""
    L = stack.num_layers
    starts = list(range(from_layer, L))
    read_layers = [*starts, L]
    out = {k: ([[float("nan")] * len(example.rows) for _ in range(L)], [[float("nan")] * len(example.rows) for _ in range(L)])
           for k in kinds}
    device = next(stack.head.parameters()).device
    for j, (row, decision, continuation) in enumerate(zip(example.rows, example.decision, example.continuations)):
        hidden = stack.embed(torch.tensor([row], device=device))
        inputs = stack.layer_inputs(hidden)
        states = [hidden]
        for index in range(L):
            hidden = stack.run_layer(index, hidden, inputs)
            states.append(hidden)
        tokens = torch.tensor(continuation, device=device)
        for k, (logits, lls) in out.items():
            read = {L: states[L][0, decision:]}
            if starts:
                read.update(zip(starts, filled_carry(stack, states, decision, starts, k)))
            for layer in read_layers:
                logprobs = F.log_softmax(stack.exit_logits(read[layer]).float(), -1)
                lls[layer - 1][j] = float(logprobs[torch.arange(len(continuation)), tokens].sum())
            if j == 0:  # the speaker row: every option's token at the margin position
                offset = example.margin_offset
                option_tokens = torch.tensor([c[offset] for c in example.continuations], device=device)
                for layer in read_layers:
                    logits[layer - 1] = stack.exit_logits(read[layer][offset][None]).float()[0, option_tokens].tolist()
    return out


def filled_tokens(example, kv_share: float, attention_share: float) -> dict:
    """The document's filled carries in tokens per remaining layer (the continuation file's
    columns): a check, the speaker's positions decision .. margin plus its prompt's K/V and its
    attention over it; the exit answer, every row's scored positions the same way."""
    from adainfer_lmeval.experiments.collect_continuation import carried_tokens

    def carry(prompt: int, carried: int) -> float:
        return carried + kv_share * prompt + carried * attention_share * prompt

    return {"check_tokens": carry(example.decision[0], example.margin_offset + 1),
            "exit_tokens": sum(carry(d, len(r) - d) for r, d in zip(example.rows, example.decision)),
            "reused_tokens": 0.0,  # an exit pays again what its check carried (the study's SimLens may reuse it)
            "row_tokens": carried_tokens(example)["row_tokens"]}


def readout_name(last_layers: int | None) -> str:
    """``filled`` (every remaining layer) or ``last<K>`` (the model's last K layers only)."""
    return "filled" if last_layers is None else f"last{last_layers}"


def filled_path(collection: Path, last_layers: int | None = None) -> Path:
    return collection.with_name(f"{collection.stem}-{readout_name(last_layers)}.parquet")


def write_filled(lm, collection: Path, from_layer: int, kinds: list[int | None], log=print) -> list[Path]:
    """The filled read-outs ``kinds`` (see :func:`trace_filled`) of ``collection``'s documents, one
    file each beside it, from one forward per document."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from adainfer_lmeval.experiments.collect import read_collection
    from adainfer_lmeval.experiments.collect_continuation import rebuild_examples

    stack = lm.engine.stack
    meta, cols = read_collection(collection)
    examples = rebuild_examples(lm, meta, cols)
    kv_share = stack.kv_matmul_params() / stack.layer_matmul_params()
    attention_share = 2 * stack.attention_width() / stack.layer_matmul_params()  # per prompt key, per carried token
    started = time.time()
    reads = []
    names = ", ".join(readout_name(k) for k in kinds)
    resume = ResumeLog(filled_path(collection, kinds[0]).with_suffix(".resume.jsonl"),
                       [meta.get("data_sha256"), from_layer, kinds], stack.num_layers)
    for i, example in enumerate(examples, 1):
        read = resume.get(example, kinds)
        if read is None:
            read = trace_filled(stack, example, from_layer, kinds)
            resume.append(example, kinds, read)
        reads.append(read)
        if i % 20 == 0 or i == len(examples):
            log(f"  {names} {collection.name}: {i}/{len(examples)} docs in {time.time() - started:.0f}s"
                + (f" ({resume.restored} read back from {resume.path.name})" if resume.restored else ""))
    costs = [filled_tokens(e, kv_share, attention_share) for e in examples]
    paths = []
    for k in kinds:
        table = pa.table({"task": cols["task"], "doc_id": cols["doc_id"], "num_fewshot": cols["num_fewshot"],
                          "continuation_option_logits": [r[k][0] for r in reads],
                          "continuation_option_ll": [r[k][1] for r in reads],
                          **{name: [float(c[name]) for c in costs] for name in costs[0]}})
        written = {"data_sha256": meta["data_sha256"], "from_layer": from_layer, "last_layers": k,
                   "kv_share": kv_share, "seconds": round(time.time() - started, 1)}
        path = filled_path(collection, k)
        partial = path.with_name(path.name + ".partial")  # a half-written file is never read
        pq.write_table(table.replace_schema_metadata({b"adainfer": json.dumps(written).encode()}), partial)
        partial.replace(path)
        paths.append(path)
    resume.path.unlink(missing_ok=True)  # every file is written: nothing left to resume
    return paths


class ResumeLog:
    """The documents a :func:`write_filled` run has read out, one JSON line each, so that an
    interrupted run (a read-out is ~8 s a document for Qwen-0.5B here) resumes where it stopped.
    A line is keyed by the collection's data hash, the start layer, the read-outs and the
    document; a torn or foreign line, or one whose shapes do not fit, is read out again."""

    def __init__(self, path: Path, run: list, num_layers: int):
        self.path, self.run, self.num_layers, self.restored = path, run, num_layers, 0
        self.lines: dict[str, list] = {}
        # a line torn by a kill has no newline: the next record starts on a line of its own
        self.torn = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        if path.exists():
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                        self.lines[str(record["key"])] = record["read"]
                    except (ValueError, KeyError, TypeError):
                        continue

    def key(self, example) -> str:
        import hashlib

        return hashlib.sha256(json.dumps([self.run, example.task, example.doc_id, example.num_fewshot]).encode()).hexdigest()

    def get(self, example, kinds: list) -> dict | None:
        read = self.lines.get(self.key(example))
        shape = (self.num_layers, len(example.rows))
        fits = (isinstance(read, list) and len(read) == len(kinds)
                and all(isinstance(pair, list) and len(pair) == 2 and all(_table(t, *shape) for t in pair) for pair in read))
        if not fits:
            return None
        self.restored += 1
        return {k: tuple(pair) for k, pair in zip(kinds, read)}

    def append(self, example, kinds: list, read: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(("\n" if self.torn else "") + json.dumps({"key": self.key(example), "read": [list(read[k]) for k in kinds]}) + "\n")
        self.torn = False


def _table(value, rows: int, cols: int) -> bool:
    return (isinstance(value, list) and len(value) == rows
            and all(isinstance(r, list) and len(r) == cols and all(isinstance(x, (int, float)) for x in r) for r in value))


def read_filled(data, collection: Path, from_layer: int, last_layers: int | None = None):
    """``data`` (loaded from ``collection``) answered by its filled read-out (its file's metadata
    under ``meta["filled"]``); None if there is none of this collection, ``from_layer`` and
    ``last_layers``."""
    import pyarrow.parquet as pq

    from adainfer_lmeval.experiments.training_data import continuation_readout

    path = filled_path(collection, last_layers)
    if not path.exists():
        return None
    meta = json.loads((pq.read_schema(path).metadata or {}).get(b"adainfer", b"{}"))
    if (meta.get("data_sha256") != data.meta.get("data_sha256") or meta.get("from_layer") != from_layer
            or meta.get("last_layers") != last_layers):
        return None
    readout = continuation_readout(pq.read_table(path).to_pydict())
    if last_layers is not None:  # a carry from layer l runs min(K, L - l) layers, not L - l
        L = data.num_layers
        runs = np.minimum(last_layers, L - np.arange(1, L + 1)).astype(np.float64)
        readout = replace(readout, carry_layers=np.tile(runs, (len(readout.margin), 1)))
    return replace(data, continuation=readout, meta={**data.meta, "filled": meta})


def agreement_by_layer(simlens, others: dict, from_layer: int) -> dict[str, list[float]]:
    """Per read-out (the lens, SimLens and each of ``others``, {name: data}), the share of
    documents whose answer read from layer l = ``from_layer``..L equals full depth's (the same
    documents: they differ in their continuation only)."""
    final = simlens.choice[:, -1:]
    answers = {"lens": simlens.choice, "simlens": simlens.continuation.choice,
               **{name: data.continuation.choice for name, data in others.items()}}
    return {name: (choice[:, from_layer - 1:-1] == final).mean(0).tolist() + [1.0] for name, choice in answers.items()}


def compare(readouts: dict, from_layer: int, rules) -> list[dict]:
    """The study's SimLens rules, calibrated on ``train`` and scored on ``test`` of each read-out
    ({name: (train, test)}), every criterion, exits restricted to layers >= ``from_layer``."""
    from adainfer_lmeval.experiments.calibration import CRITERIA, calibrate, evaluate, exit_layers
    from adainfer_lmeval.experiments.study_policies import layer_scores, policy_readout

    def scores(policy, data):
        s = layer_scores(policy, None, data).astype(np.float64)
        s[:, : from_layer - 1] = np.nan  # never stops there
        return s

    rows = []
    for name, (train, test) in readouts.items():
        for policy in CONTINUATION_POLICIES:
            for criterion in CRITERIA:
                point = calibrate(train, scores(policy, train), rules.tolerance, criterion=criterion,
                                  max_changed=rules.max_changed, confidence=rules.confidence,
                                  readout=policy_readout(policy, train))
                exits = exit_layers(scores(policy, test), point["threshold"], point["min_layer"])
                r = evaluate(test, exits, policy_readout(policy, test), point["min_layer"])
                rows.append({"readout": name, "policy": policy, "criterion": criterion, "n_test": r["n_docs"],
                             "layers_saved": r["layers_saved"], "mean_exit_layer": r["mean_exit_layer"],
                             "delta_points": 100 * (r["policy_acc"] - r["full_acc"]), "agreement": r["agreement_with_full"],
                             "min_layer": point["min_layer"], "threshold": point["threshold"]})
    return rows


def parse_last_layers(text: str) -> list[int | None]:
    """``--last-layers``: a comma list of K (the last K layers only) or ``all`` (every remaining one)."""
    values = []
    for item in text.split(","):
        item = item.strip()
        if item == "all":
            values.append(None)
        elif item.isdigit() and int(item) > 0:
            values.append(int(item))
        else:
            raise AdaInferError(f"--last-layers {text!r}: give a comma list of positive layer counts or 'all', e.g. 1,2,all")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adainfer_lmeval.experiments.filled_continuation",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the study model (short name)")
    parser.add_argument("--task", required=True, help="the study cell's label, task@shots (e.g. sst2@0)")
    parser.add_argument("--collect-dir", type=Path, default=Path("out/study/collect"))
    parser.add_argument("--from-layer", type=int, default=1, help="the first layer a filled carry starts from (exits restricted to >= it)")
    parser.add_argument("--last-layers", default="all",
                        help="which filled read-outs: 'all' (every remaining layer) and/or K (the model's last K layers only), e.g. 1,2,all")
    parser.add_argument("--max-changed", type=float, default=0.01, help="δ of the guarantee (the study's --max-changed)")
    parser.add_argument("--threads", type=int, help="torch threads (1 on a shared machine)")
    parser.add_argument("--json", type=Path, help="also write the tables here (python -m adainfer_lmeval.experiments.readout_plot draws them)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from adainfer_lmeval.experiments.study_policies import CalibrationRules
        from adainfer_lmeval.experiments.training_data import load_data, with_continuation

        kinds = parse_last_layers(args.last_layers)
        lm, readouts = None, {"simlens": [], **{readout_name(k): [] for k in kinds}}
        for role in ("train", "test"):
            collection = args.collect_dir / args.model / f"{args.task}-{role}.parquet"
            if not collection.exists():
                raise AdaInferError(f"{collection}: no such collection; run the study's collection for {args.model} first")
            data = with_continuation(load_data(collection), collection)
            readouts["simlens"].append(data)
            missing = [k for k in kinds if read_filled(data, collection, args.from_layer, k) is None]
            if missing:
                if lm is None:
                    from adainfer_lmeval.adapter.backend import AdaInferLM

                    lm = AdaInferLM(pretrained=args.model, policy="full", batch_size=1, device="cpu")
                for path in write_filled(lm, collection, args.from_layer, missing, log=lambda m: print(m, flush=True)):
                    print(f"wrote {path}")
            for k in kinds:
                readouts[readout_name(k)].append(read_filled(data, collection, args.from_layer, k))
        rows = compare({k: tuple(v) for k, v in readouts.items()}, args.from_layer, CalibrationRules(max_changed=args.max_changed))
    except AdaInferError as error:
        print(f"filled_continuation: error: {error}", file=sys.stderr)
        return 2
    agreement = {}
    for index, role in enumerate(("train", "test")):
        simlens = readouts["simlens"][index]
        others = {name: datas[index] for name, datas in readouts.items() if name != "simlens"}
        agree = agreement[role] = agreement_by_layer(simlens, others, args.from_layer)
        kv_share = next(iter(others.values())).meta["filled"]["kv_share"]
        print(f"{args.model} {args.task} {role}: answers equal to full depth's, % of {len(simlens.keys)} documents, "
              f"read from layer l (filled: K/V fill {100 * kv_share:.2f}% of a token-layer per prompt token)")
        print("| l | " + " | ".join(str(l) for l in range(args.from_layer, simlens.num_layers + 1)) + " |")
        print("|---|" + "---|" * (simlens.num_layers + 1 - args.from_layer))
        for name, shares in agree.items():
            print(f"| {name} | " + " | ".join(f"{100 * x:.0f}" for x in shares) + " |")
    print(f"{args.model} {args.task}, {rows[0]['n_test']} test documents, exits from layer {args.from_layer}")
    print("| read-out | policy | criterion | layers saved | mean exit | Δ points | agreement | min_layer |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['readout']} | {r['policy']} | {r['criterion']} | {100 * r['layers_saved']:.1f}% | {r['mean_exit_layer']:.2f} "
              f"| {r['delta_points']:+.1f} | {r['agreement']:.3f} | {r['min_layer']} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "task": args.task, "from_layer": args.from_layer,
                                         "max_changed": args.max_changed,
                                         "num_layers": readouts["simlens"][0].num_layers,
                                         "n_docs": {role: len(d.keys) for role, d in zip(("train", "test"), readouts["simlens"])},
                                         "agreement": agreement, "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
