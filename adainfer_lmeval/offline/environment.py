"""The Hugging Face offline switches, and where ``datasets`` keeps its cache.

Standard library only: the startup hook and every command call this before ``datasets`` loads.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_TRUE = {"1", "ON", "YES", "TRUE"}


def configure_offline_environment() -> None:
    """Make ``datasets``/``huggingface_hub`` work from the local cache without the Hub.

    Sets ``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1`` unless they are already set (an
    explicit value is respected). Both libraries read these variables once, at import time, so
    call this before importing ``datasets``, ``lm_eval`` or ``adainfer_lmeval``'s backend when
    you can. It is also safe afterwards: the module-level switches of already-imported
    ``huggingface_hub.constants`` and ``datasets.config`` are set to match. The datasets cache
    folder (``HF_DATASETS_CACHE``) is not changed: data is written where ``datasets`` looks.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    hub_offline = os.environ["HF_HUB_OFFLINE"].upper() in _TRUE
    datasets_offline = os.environ["HF_DATASETS_OFFLINE"].upper() in _TRUE
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = hub_offline
    config = sys.modules.get("datasets.config")
    if config is not None:
        config.HF_HUB_OFFLINE = datasets_offline
        config.HF_DATASETS_OFFLINE = datasets_offline


def hf_datasets_cache() -> Path:
    """The folder ``datasets`` reads its cache from (``HF_DATASETS_CACHE`` or its default)."""
    config = sys.modules.get("datasets.config")
    if config is not None:  # already imported: its value is the one that counts
        return Path(os.path.expanduser(str(config.HF_DATASETS_CACHE)))
    explicit = os.environ.get("HF_DATASETS_CACHE")
    if explicit:
        return Path(os.path.expanduser(explicit))
    xdg = os.environ.get("XDG_CACHE_HOME", "~/.cache")
    hf_home = os.path.expanduser(os.environ.get("HF_HOME", os.path.join(xdg, "huggingface")))
    return Path(hf_home) / "datasets"
