"""The ``adainfer`` model's generate_until requests: HFLM's batching, left padding, truncation,
stop strings and max_gen_toks, with :class:`EarlyExitGenerator` (per-token exits) in place of
``model.generate`` for greedy decoding."""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from adainfer_lmeval.adapter.response_cache import RecordingHook
from adainfer_lmeval.adapter.responses import GeneratedText
from adainfer_lmeval.core.accounting import ExitRecord


class EarlyExitGenerateUntil:
    """HFLM's ``generate_until`` with an early-exit ``_model_generate``. Mixed into
    :class:`~adainfer_lmeval.adapter.backend.AdaInferLM` ahead of HFLM, whose ``__init__`` sets
    ``engine``, ``generator``, ``costs``, ``model_seconds``, ``_generation_records`` and
    ``_batch_contexts``."""

    def generate_until(self, requests, disable_tqdm: bool = False):
        """HFLM's generate_until; its ``_model_generate`` below runs :class:`EarlyExitGenerator`
        instead of model.generate."""
        started = time.perf_counter()
        self._generation_records = defaultdict(list)
        hook = self.cache_hook
        self.cache_hook = RecordingHook(hook, self._generation_with_record)
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
