"""The ``adainfer`` lm-eval model: lm-eval's ``hf`` backend with an early-exit forward.

A thin HFLM subclass (cf. lm-eval's ``hf_steered.py``): model loading, tokenisation,
truncation, batching flags and generate_until's batching and stop strings stay HFLM's. Only
the scoring of loglikelihood requests (through :class:`EarlyExitEngine`) and the decoding
loop under generate_until (through :class:`EarlyExitGenerator`, per-token exits) are
replaced, so the prompts and metrics stay exactly lm-eval's. Knows nothing of how policies
decide.

Each response carries an :class:`ExitRecord` (as an attribute, so lm-eval's metrics see the
plain ``(logprob, is_greedy)`` / float / str they expect); :mod:`.results` turns those
into per-task figures in the results and per-sample exit layers in ``--log_samples``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from adainfer_lmeval.core.accounting import CostModel, ExitRecord
from adainfer_lmeval.core.engine import EarlyExitEngine, ExitBatch
from adainfer_lmeval.core.generation import EarlyExitGenerator
from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.policies import learned  # noqa: F401  (registers policy=svm, crf, file)
from adainfer_lmeval.adapter import request_encoding as request_encoding
from adainfer_lmeval.core.stages import stage
from adainfer_lmeval.adapter.startup_hook import prepare_adainfer_run
from adainfer_lmeval.core.exit_checks import CHECK_ARGS, ExitCheckConfig
from adainfer_lmeval.policies import ModelIdentity, build_policy, policy_arg_names

DEFAULT_MODEL = "smollm2-135m"


# The responses below are pickled by lm-eval's --use_cache (sqlite): each __reduce__ rebuilds
# the value together with its exit record, so answers served from the cache still report
# their exit layers and FLOPs.


class ScoredContinuation(tuple):
    """``(logprob, is_greedy)`` as lm-eval expects, with the request's ``exit`` record."""

    def __new__(cls, logprob: float, is_greedy: bool, exit: ExitRecord):
        obj = super().__new__(cls, (logprob, is_greedy))
        obj.exit = exit
        return obj

    def __reduce__(self):
        return (type(self), (self[0], self[1], self.exit))


class ScoredFloat(float):
    """A rolling loglikelihood, with the request's ``exit`` record."""

    def __new__(cls, value: float, exit: ExitRecord):
        obj = super().__new__(cls, value)
        obj.exit = exit
        return obj

    def __reduce__(self):
        return (type(self), (float(self), self.exit))


class GeneratedText(str):
    """A generation, with the request's ``exit`` record.

    ``exit`` may be missing: with no filter, lm-eval casts the gold answer with
    ``type(result)(gold)``, which must give a plain string's equal.
    """

    def __new__(cls, value: str, exit: ExitRecord | None = None):
        obj = super().__new__(cls, value)
        obj.exit = exit
        return obj

    def __reduce__(self):
        return (type(self), (str(self), self.exit))


def _hflm_arg_names() -> set[str]:
    return {n for n in inspect.signature(HFLM.__init__).parameters if n not in ("self", "kwargs")}


def parse_model_args(arg_string: str) -> dict:
    """``--model_args`` as lm-eval parses it, but a repeated key or a key without ``=value`` is
    refused (lm-eval keeps the last value, or an empty string, silently)."""
    seen: dict[str, str] = {}
    for item in (arg_string or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise AdaInferError(f"model arg {item.strip()!r} has no value; write it as key=value")
        if key in seen:
            raise AdaInferError(f"model arg {key} is given twice ({key}={seen[key]}, {key}={value}); give it once")
        seen[key] = value
    return {key: lm_utils.handle_arg_string(value) for key, value in seen.items()}


def split_model_args(policy: str, kwargs: dict):
    """(the exit policy, the :class:`ExitCheckConfig`, the args left for HFLM); one-line errors
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
    checks = ExitCheckConfig.from_model_args(kwargs)
    policy_args = {k: v for k, v in kwargs.items() if k in policy_names}
    rest = {k: v for k, v in kwargs.items() if k not in policy_names and k not in CHECK_ARGS}
    return build_policy(str(policy), policy_args), checks, rest


def check_model_args(arg_string: str | dict) -> None:
    """Validate ``--model_args`` (a ``k=v,...`` string, or a dict) for adainfer without loading or
    fetching weights (fast CLI feedback): the args, the device, the model's name or folder and,
    where its config is here already, the ranges that depend on the model's size."""
    args = dict(arg_string) if isinstance(arg_string, dict) else parse_model_args(arg_string or "")
    policy, checks, rest = split_model_args(args.pop("policy", "full"), args)
    check_device(rest.get("device"))
    pretrained = rest.get("pretrained", DEFAULT_MODEL)
    from adainfer_lmeval.offline.model_zoo import is_fetched, lookup, model_dir

    spec = lookup(pretrained) if isinstance(pretrained, str) and not os.path.isdir(pretrained) else None
    if spec is not None:  # a zoo model: fetched when the run starts; its config only if here
        path = str(model_dir(spec.name)) if is_fetched(spec.name) else None
    else:
        path = resolve_model(pretrained)
    identity = model_identity_from_config(path) if path else None
    if identity is not None:
        policy.bind(identity)
        checks.check_against(identity.vocab_size)


def check_device(device) -> None:
    """Refuse a CUDA device torch cannot see, in one line (HFLM would fail with a traceback)."""
    if device is None or not str(device).startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise AdaInferError(f"device={device}: torch sees no CUDA GPU here (torch.cuda.is_available() is False); use --device cpu")
    index = str(device).partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise AdaInferError(f"device={device}: torch sees {torch.cuda.device_count()} CUDA GPU(s); use cuda:0..")


def model_identity_from_config(pretrained: str) -> ModelIdentity | None:
    """What a policy may know of the model, read from its config alone (no weights): so that
    range errors (``layer=999``, ``check_vocab`` beyond the vocabulary) show before a load.
    None where the config cannot be read here (the load then reports what is wrong)."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(pretrained)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return ModelIdentity(
            name=str(pretrained).rstrip("/").split("/")[-1], model_type=str(config.model_type),
            num_layers=int(config.num_hidden_layers), hidden_size=int(config.hidden_size),
            vocab_size=int(config.vocab_size),
        )
    except Exception:  # noqa: BLE001 - an early check only; the real load reports its own errors
        return None


def resolve_model(pretrained):
    """``pretrained`` as HFLM will load it: a zoo name becomes its folder (fetched if needed); a
    name that is no folder, no zoo model and not in the Hugging Face cache is refused in one line."""
    if not isinstance(pretrained, str):
        return pretrained
    from adainfer_lmeval.offline.model_zoo import MODELS, resolve_pretrained

    path = resolve_pretrained(pretrained)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise AdaInferError(f"pretrained={pretrained}: the folder has no config.json (not a saved Hugging Face model)")
        return path
    if model_identity_from_config(path) is None:
        raise AdaInferError(
            f"pretrained={pretrained} is not a local model folder, a zoo model ({', '.join(sorted(MODELS))}: "
            "`adainfer-eval models list`) or a Hub model in the local Hugging Face cache"
        )
    return path


@register_model("adainfer")
class AdaInferLM(HFLM):
    def __init__(self, pretrained=DEFAULT_MODEL, policy: str = "full", check_vocab: int | None = None,
                 check_clusters: int | None = None, check_probes: int | None = None, **kwargs):
        prepare_adainfer_run()  # exit statistics into lm-eval's results; offline switches if our data is fetched
        # Everything that needs no weights is checked before they load: the args, the device,
        # the model's folder and, from its config, the ranges that depend on its size.
        checks = {"check_vocab": check_vocab, "check_clusters": check_clusters, "check_probes": check_probes}
        exit_policy, checks, kwargs = split_model_args(policy, {**kwargs, **checks})
        if kwargs.get("device") is None:  # HFLM's default is "cuda", which fails on a CPU machine
            kwargs["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        if str(kwargs["device"]) == "cuda":
            # HFLM fails on this one with a traceback. "cuda:N" it runs on the CPU when there is no
            # GPU: lm-eval's command line passes "cuda:0" when --device is not given (an explicit
            # --device or model-args device is checked by check_model_args / create_from_arg_*).
            check_device("cuda")
        self._pretrained_name = pretrained if isinstance(pretrained, str) else None
        pretrained = resolve_model(pretrained)
        if isinstance(pretrained, str):
            identity = model_identity_from_config(pretrained)
            if identity is not None:
                exit_policy.bind(identity)
                checks.check_against(identity.vocab_size)
        super().__init__(pretrained=pretrained, **kwargs)
        if self.backend != "causal":
            raise AdaInferError("adainfer needs a decoder-only (causal) model; seq2seq models are not supported")
        self.engine = EarlyExitEngine(self.model, exit_policy, checks=checks)
        self.generator = EarlyExitGenerator(self.engine)
        self.costs = CostModel.from_stack(self.engine.stack, check_vocab=checks.vocab)
        self.response_key = _response_key(pretrained, self.model, exit_policy, checks.model_args(), kwargs)
        self._probe_tokens: int | None = None  # batch_size=auto: the probe's length, when HFLM gives none
        self.model_seconds = 0.0  # wall-clock spent scoring and generating (for speedups)
        self._window_records: list[ExitRecord] | None = None
        self._generation_records: dict | None = None  # context string -> records, during generate_until
        self._batch_contexts: list[str] | None = None  # the context strings of the batch being generated

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        args = parse_model_args(arg_string)
        check_device(args.get("device"))
        return cls(**_merge_flags(args, additional_config))

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        check_device(arg_dict.get("device"))
        return cls(**_merge_flags(dict(arg_dict), additional_config))

    # ---- --use_cache ------------------------------------------------------------------------

    def set_cache_hook(self, cache_hook) -> None:
        """lm-eval's CachingLM (``--use_cache``) hands its sqlite dict over here.

        It keys answers by the request alone, so answers computed under other model args (another
        policy, threshold, model) would be served from the same file. This model's answers go to
        a table of their own in that file, named by :attr:`response_key`.
        """
        dbdict = getattr(cache_hook, "dbdict", None)
        key = getattr(self, "response_key", None)
        table = f"adainfer_{key}"
        if key is not None and dbdict is not None and getattr(dbdict, "tablename", table) != table:
            # In place: the CachingLM that called us reads and writes this same object.
            filename, autocommit = dbdict.filename, getattr(dbdict, "autocommit", True)
            dbdict.close()
            type(dbdict).__init__(dbdict, filename, tablename=table, autocommit=autocommit)
        super().set_cache_hook(cache_hook)

    @property
    def exit_policy(self):
        return self.engine.policy

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["adainfer"] = {"policy": self.exit_policy.describe(), "num_layers": self.engine.num_layers,
                            "check_vocab": self.engine.checks.vocab,
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
        # lm-eval hands over ((context, continuation), context_enc, continuation_enc), tokenised
        # by TemplateLM.loglikelihood; rows, groups and batches come from .request_encoding.
        encoded = request_encoding.encode([(c, k) for _, c, k in requests], self.max_length)
        rows = encoded.rows
        batch_size = self._rows_per_batch(override_bs, requests, rows)
        results: list[ScoredContinuation | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests (adainfer)")
        for engine_batch in encoded.batches(batch_size):
            shared = engine_batch.rows  # one entry per computed row: the requests that share it
            batch = ExitBatch.from_rows(engine_batch.tokens, engine_batch.decisions, engine_batch.row_groups,
                                        device=self.device)
            with stage("engine_run"), torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ):
                out = self.engine.run(batch)
            group_requests = engine_batch.group_requests
            for j, row in enumerate(shared):
                logprobs = F.log_softmax(out.logits[j], dim=-1, dtype=self.softmax_dtype)
                greedy = logprobs.argmax(dim=-1)
                for i in row.requests:
                    request_str, _, continuation_enc = requests[i]
                    cont = torch.tensor(continuation_enc, dtype=torch.long, device=logprobs.device)
                    is_greedy = bool((greedy == cont).all())
                    logprob = float(logprobs.gather(1, cont.unsqueeze(1)).sum())
                    if logprob != logprob:
                        raise AdaInferError(self._nan_message(out.exit_layers[j]))
                    record = self.costs.request(
                        tokens=len(rows[i]), exit_layer=out.exit_layers[j], scored=len(continuation_enc),
                        checks=out.checks[j] / group_requests[j], share=len(row.requests),
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

    def _rows_per_batch(self, override_bs: int | None, requests, rows: list[list[int]]) -> int:
        if override_bs:
            return int(override_bs)
        if self.batch_size != "auto":
            return int(self.batch_size)
        # As HFLM does: probe with the longest request of this call, not max_length (a probe at
        # max_length runs minutes on a CPU for requests of a few dozen tokens). The probe calls
        # _model_call (a plain forward), so it adds nothing to the statistics.
        longest = max(range(len(rows)), key=lambda i: len(rows[i]))
        return self._detect_batch_size(requests, longest)

    def _detect_batch_size(self, requests=None, pos: int = 0):
        # HFLM probes loglikelihood_rolling and generate_until at max_length; those calls set
        # the longest input they will really run.
        if requests is None and self._probe_tokens:
            requests, pos = [(None, [0] * self._probe_tokens, [0])], 0
        return super()._detect_batch_size(requests, pos)

    def _nan_message(self, layer: int) -> str:
        from adainfer_lmeval.offline.model_zoo import lookup

        name = self._pretrained_name
        spec = lookup(name) if name else None
        fix = (f"refetch it with `adainfer-eval models fetch {spec.name} --force`" if spec is not None
               else "check the model's weights (a damaged or truncated file?)")
        return f"NaN in the scored log-probabilities (exit layer {layer}) of {name or 'the model'}: its weights are likely damaged; {fix}"

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self._window_records = []
        hook = self.cache_hook
        # HFLM caches each document's total as a plain float: cache it only with its record, below.
        self.cache_hook = _RecordingHook(hook, lambda attr, req, res: None)
        if self.batch_size == "auto" and requests:
            longest = max(len(self.tok_encode(req.args[0])) for req in requests) + 1  # + the prefix token
            self._probe_tokens = min(longest, self.max_length)
        try:
            totals = super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
            windows = self._window_records
        finally:
            self._window_records = None
            self._probe_tokens = None
            self.cache_hook = hook
        scored, start = [], 0
        for req, total in zip(requests, totals):
            # HFLM splits each document into windows this way; count them to regroup the records.
            count = len(list(lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(req.args[0]), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            )))
            scored.append(ScoredFloat(total, ExitRecord.merge(windows[start : start + count])))
            start += count
            hook.add_partial("loglikelihood_rolling", req.args, scored[-1])
        return scored

    # ---- generation: per-token early exit ------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False):
        """HFLM's generate_until (batching, left padding, truncation, stop strings, max_gen_toks);
        its ``_model_generate`` below runs :class:`EarlyExitGenerator` instead of model.generate."""
        started = time.perf_counter()
        self._generation_records = defaultdict(list)
        hook = self.cache_hook
        self.cache_hook = _RecordingHook(hook, self._generation_with_record)
        if self.batch_size == "auto" and requests:
            longest = max(len(self.tok_encode(req.args[0])) + int(req.args[1].get("max_gen_toks", self.max_gen_toks))
                          for req in requests)
            self._probe_tokens = min(longest, self.max_length)
        try:
            texts = super().generate_until(requests, disable_tqdm=disable_tqdm)
            records = self._generation_records
        finally:
            self._generation_records = None
            self._probe_tokens = None
            self.cache_hook = hook
            self.model_seconds += time.perf_counter() - started
        # Records are filed under the context string; identical contexts got identical work.
        return [GeneratedText(text, records[req.args[0]].pop(0)) for req, text in zip(requests, texts)]

    def _generation_with_record(self, attr, req, text):
        """HFLM caches each generation as soon as its batch is decoded: with its record, filed
        under its context by _model_generate just before (identical contexts got identical work)."""
        filed = (self._generation_records or {}).get(req[0]) if attr == "generate_until" else None
        return GeneratedText(text, filed[-1]) if filed else None

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


def tokenized_requests(lm, instances) -> list[tuple]:
    """lm-eval's loglikelihood requests ``((context, continuation), context_enc, continuation_enc)``,
    tokenised by lm-eval's own ``TemplateLM.loglikelihood`` (empty contexts, trailing spaces and
    all) for ``lm`` (an HFLM), without scoring them: what ``_loglikelihood_tokens`` receives."""
    return TemplateLM.loglikelihood(_TokenizeOnly(lm), list(instances), disable_tqdm=True)


class _TokenizeOnly:
    """``lm`` whose ``_loglikelihood_tokens`` hands its input back (TemplateLM.loglikelihood's last step)."""

    def __init__(self, lm):
        self._lm = lm

    def __getattr__(self, name):
        return getattr(self._lm, name)

    @staticmethod
    def _loglikelihood_tokens(requests, disable_tqdm: bool = False):
        return requests


# What lm-eval's command line passes for these flags when they are not given.
_LM_EVAL_FLAG_DEFAULTS = {"device": "cuda:0", "batch_size": "1"}


def _merge_flags(args: dict, additional_config: dict | None) -> dict:
    """Model args plus lm-eval's ``--batch_size``/``--device``/... flags (lm-eval would fail with
    'got multiple values' on a key in both). A model arg overrides the value lm-eval passes for
    an absent flag; given both ways with different values, it is refused."""
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
    for key in sorted(set(args) & set(extra)):
        if str(args[key]) == str(extra[key]) or str(extra[key]) == _LM_EVAL_FLAG_DEFAULTS.get(key):
            del extra[key]
            continue
        raise AdaInferError(
            f"{key} is given twice: {key}={args[key]} in the model args and {extra[key]} by --{key}; give it once"
        )
    return {**args, **extra}


def _response_key(pretrained, model, policy, checks: dict, hflm_args: dict) -> str:
    """A digest of everything that changes an answer: the model (its folder's files, by name,
    size and modification time), the policy (and its file's bytes), the exit checks and HFLM's
    args except the batch sizes (answers do not depend on them)."""
    from importlib import metadata

    if isinstance(pretrained, str):
        files = []
        if os.path.isdir(pretrained):
            for name in sorted(os.listdir(pretrained)):
                stat = os.stat(os.path.join(pretrained, name))
                files.append([name, stat.st_size, stat.st_mtime_ns])
        model_id = [os.path.abspath(pretrained) if os.path.isdir(pretrained) else pretrained, files]
    else:
        model_id = [type(model).__name__, model.config.to_json_string()]
    source = getattr(policy, "source", None)
    policy_bytes = None
    if isinstance(source, str) and os.path.isfile(source):
        with open(source, "rb") as fh:
            policy_bytes = hashlib.sha256(fh.read()).hexdigest()
    try:
        version = metadata.version("adainfer-lmeval")
    except metadata.PackageNotFoundError:
        version = None
    key = {
        "version": version, "model": model_id, "policy": policy.describe(),
        "policy_meta": getattr(policy, "meta", None), "policy_file": policy_bytes, "checks": checks,
        "args": {k: v for k, v in hflm_args.items() if k not in ("batch_size", "max_batch_size")},
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


class _RecordingHook:
    """HFLM's partial-result cache hook, but a partial answer is cached with its exit record
    (so a killed run resumes with complete statistics) or, where none is known yet, not at all
    (the caching wrapper stores the complete answer when the call returns)."""

    def __init__(self, hook, wrap):
        self.hook, self.wrap = hook, wrap

    def add_partial(self, attr, req, res) -> None:
        res = self.wrap(attr, req, res)
        if res is not None:
            self.hook.add_partial(attr, req, res)
