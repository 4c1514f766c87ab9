"""The ``adainfer`` lm-eval model: lm-eval's ``hf`` backend with an early-exit forward.

A thin HFLM subclass (cf. lm-eval's ``hf_steered.py``): model loading, tokenisation,
truncation, batching flags and generate_until's batching and stop strings stay HFLM's. Only
the scoring of loglikelihood requests (:mod:`.loglikelihood`, through :class:`EarlyExitEngine`)
and the decoding loop under generate_until (:mod:`.generate_until`, through
:class:`EarlyExitGenerator`, per-token exits) are replaced, so the prompts and metrics stay
exactly lm-eval's. Knows nothing of how policies decide.

Each response carries an :class:`ExitRecord` (:mod:`.responses`, so lm-eval's metrics see the
plain ``(logprob, is_greedy)`` / float / str they expect); :mod:`.results` turns those
into per-task figures in the results and per-sample exit layers in ``--log_samples``.
"""

from __future__ import annotations

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from adainfer_lmeval.adapter import response_cache
from adainfer_lmeval.adapter.generate_until import EarlyExitGenerateUntil
from adainfer_lmeval.adapter.loglikelihood import EarlyExitLoglikelihood
from adainfer_lmeval.adapter.model_args import check_device, check_ranges, merge_flags, parse_model_args, split_model_args
from adainfer_lmeval.adapter.model_source import DEFAULT_MODEL, resolve_model
from adainfer_lmeval.adapter.startup_hook import prepare_adainfer_run
from adainfer_lmeval.core.accounting import CostModel, ExitRecord
from adainfer_lmeval.core.engine import EarlyExitEngine
from adainfer_lmeval.core.generation import EarlyExitGenerator
from adainfer_lmeval.errors import AdaInferError


@register_model("adainfer")
class AdaInferLM(EarlyExitLoglikelihood, EarlyExitGenerateUntil, HFLM):
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
            # --device or model-args device is checked by check_model_args / create_from_arg_obj).
            check_device("cuda")
        self._pretrained_name = pretrained if isinstance(pretrained, str) else None
        pretrained = resolve_model(pretrained)
        check_ranges(exit_policy, checks, pretrained if isinstance(pretrained, str) else None)
        super().__init__(pretrained=pretrained, **kwargs)
        if self.backend != "causal":
            raise AdaInferError("adainfer needs a decoder-only (causal) model; seq2seq models are not supported")
        self.engine = EarlyExitEngine(self.model, exit_policy, checks=checks)
        self.generator = EarlyExitGenerator(self.engine)
        self.costs = CostModel.from_stack(self.engine.stack, check_vocab=checks.vocab)
        self.response_key = response_cache.response_key(pretrained, self.model, exit_policy, checks.model_args(), kwargs)
        self._probe_tokens: int | None = None  # batch_size=auto: the probe's length, when HFLM gives none
        self.model_seconds = 0.0  # wall-clock spent scoring and generating (for speedups)
        self._window_records: list[ExitRecord] | None = None  # during loglikelihood_rolling
        self._generation_records: dict | None = None  # context string -> records, during generate_until
        self._batch_contexts: list[str] | None = None  # the context strings of the batch being generated

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        return cls.create_from_arg_obj(parse_model_args(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        check_device(arg_dict.get("device"))
        return cls(**merge_flags(dict(arg_dict), additional_config))

    def set_cache_hook(self, cache_hook) -> None:
        """lm-eval's CachingLM (``--use_cache``) hands its sqlite dict over here: this model's
        answers go to a table of their own in that file, named by :attr:`response_key`."""
        response_cache.use_own_table(cache_hook, getattr(self, "response_key", None))
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

    def _detect_batch_size(self, requests=None, pos: int = 0):
        # HFLM probes loglikelihood_rolling and generate_until at max_length; those calls set
        # the longest input they will really run.
        if requests is None and self._probe_tokens:
            requests, pos = [(None, [0] * self._probe_tokens, [0])], 0
        return super()._detect_batch_size(requests, pos)
