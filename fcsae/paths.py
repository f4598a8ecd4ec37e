"""Where fcsae keeps its caches.

Everything derived (dequantised model weights, the offline corpus, activation
caches, eval caches) lives under ``$FCSAE_HOME`` (default ``~/.cache/fcsae``),
so that deleting that one directory resets the tool.
"""

import os
from pathlib import Path


def fcsae_home() -> Path:
    """The cache root: ``$FCSAE_HOME`` or ``~/.cache/fcsae``, created if missing."""
    root = Path(os.environ.get("FCSAE_HOME", Path.home() / ".cache" / "fcsae")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


def cache_dir(*parts: str) -> Path:
    """A sub-directory of the cache root, created if missing."""
    path = fcsae_home().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
