"""The ``adainfer`` lm-eval model: lm-eval's ``hf`` backend with an early-exit forward.

A thin HFLM subclass (cf. lm-eval's ``hf_steered.py``): model loading, tokenisation,
truncation, batching flags and generate_until's batching and stop strings stay HFLM's. Only
the scoring of loglikelihood requests (through :class:`EarlyExitEngine`) and the decoding
loop under generate_until (through :class:`EarlyExitGenerator`, per-token exits) are
replaced, so the prompts and metrics stay exactly lm-eval's. Knows nothing of how policies
decide.

Each response carries an :class:`ExitRecord` (as an attribute, so lm-eval's metrics see the
plain ``(logprob, is_greedy)`` / float / str they expect); :mod:`.exit_report` turns those
into per-task figures in the results and per-sample exit layers in ``--log_samples``.
"""

from __future__ import annotations

import inspect
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from .accounting import CostModel, ExitRecord
from .engine import EarlyExitEngine, ExitBatch
from .generation import EarlyExitGenerator
from .errors import AdaInferError
from .policies import build_policy, policy_arg_names

DEFAULT_MODEL = "smollm2-135m"


class ScoredContinuation(tuple):
    """``(logprob, is_greedy)`` as lm-eval expects, with the request's ``exit`` record."""

    def __new__(cls, logprob: float, is_greedy: bool, exit: ExitRecord):
        obj = super().__new__(cls, (logprob, is_greedy))
        obj.exit = exit
        return obj


class ScoredFloat(float):
    """A rolling loglikelihood, with the request's ``exit`` record."""

    def __new__(cls, value: float, exit: ExitRecord):
        obj = super().__new__(cls, value)
        obj.exit = exit
        return obj


class GeneratedText(str):
    """A generation, with the request's ``exit`` record.

    ``exit`` may be missing: with no filter, lm-eval casts the gold answer with
    ``type(result)(gold)``, which must give a plain string's equal.
    """

    def __new__(cls, value: str, exit: ExitRecord | None = None):
        obj = super().__new__(cls, value)
        obj.exit = exit
        return obj


def _hflm_arg_names() -> set[str]:
    return {n for n in inspect.signature(HFLM.__init__).parameters if n not in ("self", "kwargs")}


CHECK_ARGS = {  # model args of the exit checks: what each counts (see .checks, .head_clusters)
    "check_vocab": "tokens kept per exit check",
    "check_clusters": "head clusters the first check's candidates are picked from",
    "check_probes": "head clusters a first check probes; default check_clusters/32",
}


def _check_arg(name: str, value) -> int | None:
    """``check_vocab=K`` / ``check_clusters=C``: an integer >= 2; none/0: switched off."""
    if value in (None, "", "none", "None", 0, "0"):
        return None
    try:
        k = int(value)
    except (TypeError, ValueError):
        k = -1
    if k < 2:
        raise AdaInferError(f"{name}={value!r} must be an integer >= 2 ({CHECK_ARGS[name]}), or none")
    return k


def split_model_args(policy: str, kwargs: dict):
    """(the exit policy, the parsed exit-check args, the args left for HFLM); one-line errors
    for unknown or bad args."""
    policy_names = policy_arg_names()
    valid = _hflm_arg_names() | policy_names | {"pretrained"} | set(CHECK_ARGS)
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise AdaInferError(f"unknown model arg(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    if str(kwargs.get("parallelize", False)).lower() in ("true", "1"):
        raise AdaInferError(
            "parallelize=True (one model split over several GPUs) is not supported by the early-exit engine; "
            "run data-parallel instead: accelerate launch -m adainfer_lmeval ..."
        )
    checks = {name: _check_arg(name, kwargs.get(name)) for name in CHECK_ARGS}
    if checks["check_clusters"] and not checks["check_vocab"]:
        raise AdaInferError("check_clusters needs check_vocab=K (the candidates it picks); add e.g. check_vocab=64")
    if checks["check_probes"] and not checks["check_clusters"]:
        raise AdaInferError("check_probes needs check_clusters=C (the clusters it probes); add e.g. check_clusters=256")
    policy_args = {k: v for k, v in kwargs.items() if k in policy_names}
    rest = {k: v for k, v in kwargs.items() if k not in policy_names and k not in CHECK_ARGS}
    return build_policy(str(policy), policy_args), checks, rest


def check_model_args(arg_string: str) -> None:
    """Validate ``--model_args`` for adainfer without loading anything (fast CLI feedback)."""
    args = lm_utils.simple_parse_args_string(arg_string or "")
    split_model_args(args.pop("policy", "full"), args)


@register_model("adainfer")
class AdaInferLM(HFLM):
    def __init__(self, pretrained=DEFAULT_MODEL, policy: str = "full", check_vocab: int | None = None,
                 check_clusters: int | None = None, check_probes: int | None = None, **kwargs):
        # Build the policy first: a typo in its args should fail before a model loads.
        checks = {"check_vocab": check_vocab, "check_clusters": check_clusters, "check_probes": check_probes}
        exit_policy, checks, kwargs = split_model_args(policy, {**kwargs, **checks})
        if isinstance(pretrained, str):
            from .model_zoo import resolve_pretrained

            pretrained = resolve_pretrained(pretrained)
        super().__init__(pretrained=pretrained, **kwargs)
        if self.backend != "causal":
            raise AdaInferError("adainfer needs a decoder-only (causal) model; seq2seq models are not supported")
        self.engine = EarlyExitEngine(self.model, exit_policy, **checks)
        self.generator = EarlyExitGenerator(self.engine)
        self.costs = CostModel.from_stack(self.engine.stack, check_vocab=checks["check_vocab"])
        self._auto_batch_size: int | None = None
        self.model_seconds = 0.0  # wall-clock spent scoring and generating (for speedups)
        self._window_records: list[ExitRecord] | None = None
        self._generation_records: dict | None = None  # context string -> records, during generate_until
        self._batch_contexts: list[str] | None = None  # the context strings of the batch being generated

    @property
    def exit_policy(self):
        return self.engine.policy

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["adainfer"] = {"policy": self.exit_policy.describe(), "num_layers": self.engine.num_layers,
                            "check_vocab": self.engine.check_vocab,
                            "check_clusters": None if self.engine.head_clusters is None else
                            {"clusters": self.engine.head_clusters.clusters, "probes": self.engine.head_clusters.probes}}
        return info

    # ---- loglikelihood: the early-exit path ---------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        started = time.perf_counter()
        try:
            return self._score(requests, disable_tqdm, override_bs)
        finally:
            self.model_seconds += time.perf_counter() - started

    def _score(self, requests, disable_tqdm: bool, override_bs: int | None):
        rows, decisions = [], []
        for _, context_enc, continuation_enc in requests:
            if not context_enc or not continuation_enc:
                raise AdaInferError("a loglikelihood request has an empty context or continuation")
            # Same left truncation as HFLM: context+continuation minus the last token.
            tokens = (context_enc + continuation_enc)[-(self.max_length + 1) :][:-1]
            rows.append(tokens)
            decisions.append(len(tokens) - len(continuation_enc))

        # Requests with the same tokens up to the decision position (the choices of one
        # question) form a group and share one exit decision. Within a group, requests whose
        # input rows are identical (single-token choices: the row is just the context) share one
        # row, as HFLM's logits cache does: it is computed once and scored per continuation.
        group_rows: dict[tuple, dict[tuple, list[int]]] = defaultdict(dict)
        for i, (tokens, decision) in enumerate(zip(rows, decisions)):
            group_rows[tuple(tokens[: decision + 1])].setdefault(tuple(tokens), []).append(i)
        # Longest first, like HFLM: the first batch is the largest, so memory trouble shows early.
        ordered = sorted(
            (list(unique.values()) for unique in group_rows.values()),
            key=lambda group: -max(len(rows[sharers[0]]) for sharers in group),
        )

        batch_size = self._rows_per_batch(override_bs)
        results: list[ScoredContinuation | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests (adainfer)")
        for batch_groups in _pack(ordered, batch_size):
            # one entry per computed row: the requests that share it
            row_sharers = [sharers for group in batch_groups for sharers in group]
            local_group = [g for g, group in enumerate(batch_groups) for _ in group]
            batch = ExitBatch.from_rows(
                [rows[sharers[0]] for sharers in row_sharers], [decisions[sharers[0]] for sharers in row_sharers],
                local_group, device=self.device,
            )
            with torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ):
                out = self.engine.run(batch)
            group_requests = [sum(len(s) for s in group) for group in batch_groups for _ in group]
            for j, sharers in enumerate(row_sharers):
                logprobs = F.log_softmax(out.logits[j], dim=-1, dtype=self.softmax_dtype)
                greedy = logprobs.argmax(dim=-1)
                for i in sharers:
                    request_str, _, continuation_enc = requests[i]
                    cont = torch.tensor(continuation_enc, dtype=torch.long, device=logprobs.device)
                    is_greedy = bool((greedy == cont).all())
                    logprob = float(logprobs.gather(1, cont.unsqueeze(1)).sum())
                    record = self.costs.request(
                        tokens=len(rows[i]), exit_layer=out.exit_layers[j], scored=len(continuation_enc),
                        checks=out.checks[j] / group_requests[j], share=len(sharers),
                        pruned=out.pruned_checks[j] / group_requests[j],
                        head_rows=out.check_rows[j] / group_requests[j],
                    )
                    answer = ScoredContinuation(logprob, is_greedy, record)
                    results[i] = answer
                    if request_str is not None:
                        self.cache_hook.add_partial("loglikelihood", request_str, answer)
                    pbar.update(1)
        pbar.close()
        if self._window_records is not None:  # inside loglikelihood_rolling: windows in order
            self._window_records.extend(r.exit for r in results)
        return results

    def _rows_per_batch(self, override_bs: int | None) -> int:
        if override_bs:
            return int(override_bs)
        if self.batch_size != "auto":
            return int(self.batch_size)
        if self._auto_batch_size is None:
            # HFLM's probe calls _model_call (a plain forward), so it adds nothing to the statistics.
            self._auto_batch_size = self._detect_batch_size()
        return self._auto_batch_size

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self._window_records = []
        try:
            totals = super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
            windows = self._window_records
        finally:
            self._window_records = None
        scored, start = [], 0
        for req, total in zip(requests, totals):
            # HFLM splits each document into windows this way; count them to regroup the records.
            count = len(list(lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(req.args[0]), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            )))
            scored.append(ScoredFloat(total, ExitRecord.merge(windows[start : start + count])))
            start += count
        return scored

    # ---- generation: per-token early exit ------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False):
        """HFLM's generate_until (batching, left padding, truncation, stop strings, max_gen_toks);
        its ``_model_generate`` below runs :class:`EarlyExitGenerator` instead of model.generate."""
        started = time.perf_counter()
        self._generation_records = defaultdict(list)
        try:
            texts = super().generate_until(requests, disable_tqdm=disable_tqdm)
            records = self._generation_records
        finally:
            self._generation_records = None
            self.model_seconds += time.perf_counter() - started
        # Records are filed under the context string; identical contexts got identical work.
        return [GeneratedText(text, records[req.args[0]].pop(0)) for req, text in zip(requests, texts)]

    def tok_batch_encode(self, strings, *args, **kwargs):
        # HFLM encodes each generate_until batch here, just before _model_generate: remember
        # which context string each row is, to file the row's exit record under it.
        self._batch_contexts = list(strings)
        return super().tok_batch_encode(strings, *args, **kwargs)

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        attention_mask = generation_kwargs.pop("attention_mask", None)
        contexts = self._batch_contexts
        if contexts is None or len(contexts) != context.shape[0]:  # called outside generate_until
            contexts = [None] * context.shape[0]
        if not _is_greedy(generation_kwargs):
            # Sampling and other decoding options stay model.generate's, at full depth.
            out = super()._model_generate(context, max_length, stop, attention_mask=attention_mask, **generation_kwargs)
            real = attention_mask if attention_mask is not None else torch.ones_like(context)
            generated = out.shape[1] - context.shape[1]
            for row, tokens in enumerate(real.sum(-1).tolist()):
                record = self.costs.generation(int(tokens), [self.engine.num_layers] * generated, [0] * generated)
                record.full_depth_generation = True
                self._file_generation_record(contexts[row], record)
            return out
        stop_check = _stop_string_check(self.tokenizer, stop)
        eos = self.model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        with torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        ):
            out = self.generator.generate(
                context, attention_mask, max_new_tokens=max_length - context.shape[1], eos_token_ids=eos,
                pad_token_id=self.tokenizer.pad_token_id, finished=stop_check,
            )
        for row, layers in enumerate(out.exit_layers):
            record = self.costs.generation(out.prompt_lengths[row], layers, out.checks[row], out.pruned_checks[row],
                                           out.check_rows[row])
            self._file_generation_record(contexts[row], record)
        return out.sequences

    def _file_generation_record(self, context: str | None, record: ExitRecord) -> None:
        if self._generation_records is not None:
            self._generation_records[context].append(record)


def _is_greedy(generation_kwargs: dict) -> bool:
    """True when lm-eval asks for plain greedy decoding (what the early-exit generator does)."""
    sampling = generation_kwargs.get("do_sample") or generation_kwargs.get("temperature") not in (0, 0.0, None)
    ignored_when_greedy = {"do_sample", "temperature", "top_p", "top_k"}
    return not sampling and not set(generation_kwargs) - ignored_when_greedy


def _stop_string_check(tokenizer, stops: list[str]):
    """Per row: has the generation so far produced one of ``stops``?

    The check of lm-eval's ``MultiTokenEOSCriteria``: decode the last few tokens (the stop
    string's length in tokens + 2) and look for the string. lm-eval's criterion stops the batch
    only when every row is done and cuts each text at its stop string afterwards; a row here
    leaves the batch as soon as it is done, so the texts are the same and nothing is wasted.
    """
    stops = [s for s in stops if s]
    lookback = max((len(tokenizer.encode(s, add_special_tokens=False)) + 2 for s in stops), default=0)

    def finished(tokens: list[int]) -> bool:
        if not stops:
            return False
        text = tokenizer.decode(tokens[-lookback:])
        return any(s in text for s in stops)

    return finished


def _pack(groups: list[list], rows_per_batch: int):
    """Batches of whole groups (lists of rows), about ``rows_per_batch`` rows each (a big group goes alone)."""
    batch, size = [], 0
    for group in groups:
        if batch and size + len(group) > rows_per_batch:
            yield batch
            batch, size = [], 0
        batch.append(group)
        size += len(group)
    if batch:
        yield batch
