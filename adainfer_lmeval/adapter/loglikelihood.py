"""The ``adainfer`` model's loglikelihood requests: scored by :class:`EarlyExitEngine` instead of
HFLM's full-depth forward, on lm-eval's own tokenisation."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from adainfer_lmeval.adapter import request_encoding as request_encoding
from adainfer_lmeval.adapter.response_cache import RecordingHook
from adainfer_lmeval.adapter.responses import ScoredContinuation, ScoredFloat
from adainfer_lmeval.core.accounting import ExitRecord
from adainfer_lmeval.core.engine import ExitBatch
from adainfer_lmeval.core.stages import stage
from adainfer_lmeval.errors import AdaInferError


class EarlyExitLoglikelihood:
    """HFLM's ``_loglikelihood_tokens`` and ``loglikelihood_rolling``, through the early-exit
    engine. Mixed into :class:`~adainfer_lmeval.adapter.backend.AdaInferLM` ahead of HFLM,
    whose ``__init__`` sets ``engine``, ``costs``, ``model_seconds`` and ``_window_records``."""

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
                                        device=self.device, options=engine_batch.option_tokens,
                                        margin_offsets=engine_batch.margin_offsets)
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
                        vocab_free=out.vocab_free_checks[j] / group_requests[j],
                        check_continuation=(out.check_token_layers[j] / group_requests[j], out.check_carried_tokens[j],
                                            out.check_prompt_tokens[j]),
                        exit_continuation=(out.exit_token_layers[j], out.exit_carried_tokens[j], out.exit_prompt_tokens[j]),
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

    def _nan_message(self, layer: int) -> str:
        from adainfer_lmeval.offline.models.table import lookup

        name = self._pretrained_name
        spec = lookup(name) if name else None
        fix = (f"refetch it with `adainfer-eval models fetch {spec.name} --force`" if spec is not None
               else "check the model's weights (a damaged or truncated file?)")
        return f"NaN in the scored log-probabilities (exit layer {layer}) of {name or 'the model'}: its weights are likely damaged; {fix}"

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self._window_records = []
        hook = self.cache_hook
        # HFLM caches each document's total as a plain float: cache it only with its record, below.
        self.cache_hook = RecordingHook(hook, lambda attr, req, res: None)
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
