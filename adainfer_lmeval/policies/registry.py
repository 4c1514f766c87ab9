"""The policy registry: ``policy=<name>`` in model args builds the class registered under it.

New policies (learned SVM/CRF classifiers, third-party ones) register a name with
:func:`register_policy`.
"""

from __future__ import annotations

from typing import Callable

from adainfer_lmeval.arg_values import convert_arg
from adainfer_lmeval.core.exit_policy import ExitPolicy
from adainfer_lmeval.errors import AdaInferError

_REGISTRY: dict[str, Callable[..., ExitPolicy]] = {}


def register_policy(name: str):
    """Class decorator: make ``policy=name`` build this class from model args."""

    def wrap(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def registered_policies() -> dict[str, Callable[..., ExitPolicy]]:
    return dict(_REGISTRY)


def policy_arg_names() -> set[str]:
    """Every model arg any registered policy reads (so a backend can route them)."""
    names = {"policy"}
    for cls in _REGISTRY.values():
        names.update(getattr(cls, "params", {}))
    return names


def build_policy(name: str, args: dict) -> ExitPolicy:
    """Build the policy ``name`` from model args; one-line errors for anything wrong."""
    if name not in _REGISTRY and "file" in _REGISTRY and ("/" in name or name.lower().endswith(".json")):
        return build_policy("file", {**args, "path": name})  # policy=<path to a policy file>
    if name not in _REGISTRY:
        raise AdaInferError(
            f"unknown policy {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}"
        )
    cls = _REGISTRY[name]
    accepted = getattr(cls, "params", {})
    stray = sorted(set(args) - set(accepted))
    if stray:
        raise AdaInferError(
            f"policy={name} does not take {', '.join(stray)}; it takes: "
            f"{', '.join(f'{k} ({h})' for k, (_, h) in accepted.items()) or 'no arguments'}"
        )
    converted = {}
    for key, value in args.items():
        kind, _ = accepted[key]
        converted[key] = convert_arg(key, value, kind, f"for policy={name}")
    return cls(**converted)
