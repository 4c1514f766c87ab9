"""Where the ``adainfer`` model's weights come from: a ``pretrained`` name resolved to what HFLM
loads, and what its config alone tells (no weights loaded)."""

from __future__ import annotations

import os

from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.policies import ModelIdentity

DEFAULT_MODEL = "smollm2-135m"


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
    from adainfer_lmeval.offline.models.fetch import resolve_pretrained
    from adainfer_lmeval.offline.models.table import MODELS

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


def local_config_path(pretrained) -> str | None:
    """The folder (or Hub name) whose config can be read before a run, without fetching: a zoo
    model is fetched only when the run starts, so its config counts only once it is here."""
    from adainfer_lmeval.offline.models.cache_folder import is_fetched, model_dir
    from adainfer_lmeval.offline.models.table import lookup

    spec = lookup(pretrained) if isinstance(pretrained, str) and not os.path.isdir(pretrained) else None
    if spec is not None:
        return str(model_dir(spec.name)) if is_fetched(spec.name) else None
    return resolve_model(pretrained)
