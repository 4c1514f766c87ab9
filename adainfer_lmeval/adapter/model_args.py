"""The ``adainfer`` model's ``--model_args``: parsed, split into the exit policy, the exit
checks and HFLM's own args, and checked before any weights load (one-line errors)."""

from __future__ import annotations

import inspect

import torch
from lm_eval import utils as lm_utils
from lm_eval.models.huggingface import HFLM

from adainfer_lmeval.adapter.model_source import DEFAULT_MODEL, local_config_path, model_identity_from_config
from adainfer_lmeval.core.exit_checks import CHECK_ARGS, ExitCheckConfig
from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.policies import build_policy, policy_arg_names
from adainfer_lmeval.policies import learned  # noqa: F401  (registers policy=svm, crf, file)


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


def check_ranges(policy, checks: ExitCheckConfig, config_path: str | None) -> None:
    """Bind ``policy`` and check ``checks`` against the model's size, read from its config alone
    (no weights); nothing to check where that config cannot be read here."""
    identity = model_identity_from_config(config_path) if config_path else None
    if identity is not None:
        policy.bind(identity)
        checks.check_against(identity.vocab_size)


def check_model_args(arg_string: str | dict) -> None:
    """Validate ``--model_args`` (a ``k=v,...`` string, or a dict) for adainfer without loading or
    fetching weights (fast CLI feedback): the args, the device, the model's name or folder and,
    where its config is here already, the ranges that depend on the model's size."""
    args = dict(arg_string) if isinstance(arg_string, dict) else parse_model_args(arg_string or "")
    policy, checks, rest = split_model_args(args.pop("policy", "full"), args)
    check_device(rest.get("device"))
    check_ranges(policy, checks, local_config_path(rest.get("pretrained", DEFAULT_MODEL)))


def check_device(device) -> None:
    """Refuse a CUDA device torch cannot see, in one line (HFLM would fail with a traceback)."""
    if device is None or not str(device).startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise AdaInferError(f"device={device}: torch sees no CUDA GPU here (torch.cuda.is_available() is False); use --device cpu")
    index = str(device).partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise AdaInferError(f"device={device}: torch sees {torch.cuda.device_count()} CUDA GPU(s); use cuda:0..")


# What lm-eval's command line passes for these flags when they are not given.
_LM_EVAL_FLAG_DEFAULTS = {"device": "cuda:0", "batch_size": "1"}


def merge_flags(args: dict, additional_config: dict | None) -> dict:
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
