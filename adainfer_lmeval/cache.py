"""Where fetched weights, converted models and benchmark data live.

One place decides the cache root so that every command (models fetch, data fetch,
evaluation) agrees on it. ADAINFER_CACHE overrides; otherwise the XDG cache directory.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    explicit = os.environ.get("ADAINFER_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "adainfer-lmeval"


def cache_path(*parts: str) -> Path:
    """A path inside the cache root (not created)."""
    return cache_root().joinpath(*parts)
