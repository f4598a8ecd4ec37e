"""Keyed on-disk cache entries for the evals: safetensors + JSON, written atomically, checked on read.

An entry is a directory ``$FCSAE_HOME/evals/<kind>/<key>/`` holding
``tensors.safetensors`` and ``meta.json``. ``meta.json`` is written last and
records the sha256 of the tensor file and the full key material, so a torn,
truncated, edited or mismatched entry is detected on load: the caller gets
``None`` (and a warning in the log) and recomputes. Nothing is ever used
silently when it does not verify.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fcsae.io import atomic_path, write_json
from fcsae.paths import cache_dir

log = logging.getLogger(__name__)

TENSORS = "tensors.safetensors"
META = "meta.json"
FORMAT = 1
"""Bump when the layout of any eval cache entry changes: old entries then miss and are recomputed."""


class Entry(NamedTuple):
    """A verified cache entry."""

    tensors: dict[str, torch.Tensor]
    """Named tensors (CPU)."""
    meta: dict[str, Any]
    """The JSON payload stored with them (``info`` of ``save_entry``)."""
    path: Path
    """The entry's directory."""


def entry_key(kind: str, material: dict[str, Any]) -> str:
    """A short stable hash of ``kind`` + the JSON of ``material`` (what the entry depends on)."""
    blob = json.dumps({"kind": kind, "format": FORMAT, **material}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def entry_dir(kind: str, material: dict[str, Any]) -> Path:
    """Directory of the entry for ``kind``/``material`` under ``$FCSAE_HOME/evals`` (not created)."""
    return cache_dir("evals", kind) / entry_key(kind, material)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_entry(kind: str, material: dict[str, Any], tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> Path:
    """Write an entry (tensors first, then ``meta.json`` as the commit mark); returns its directory."""
    path = entry_dir(kind, material)
    path.mkdir(parents=True, exist_ok=True)
    (path / META).unlink(missing_ok=True)  # an entry without its mark is never read
    with atomic_path(path / TENSORS) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    write_json(path / META, {"format": FORMAT, "kind": kind, "material": material,
                             "sha256": _sha256(path / TENSORS), "info": info})
    return path


def load_entry(kind: str, material: dict[str, Any]) -> Entry | None:
    """The verified entry for ``kind``/``material``, or None when missing or corrupt (logged, then removed)."""
    path = entry_dir(kind, material)
    if not (path / META).is_file():
        return None
    try:
        meta = json.loads((path / META).read_text())
        problem = None
        if meta.get("format") != FORMAT or meta.get("kind") != kind:
            problem = "format or kind differs"
        elif json.dumps(meta.get("material"), sort_keys=True, default=str) != json.dumps(
                json.loads(json.dumps(material, default=str)), sort_keys=True, default=str):
            problem = "key material differs"
        elif _sha256(path / TENSORS) != meta.get("sha256"):
            problem = "tensor file checksum differs"
        if problem is None:
            return Entry(load_file(str(path / TENSORS)), meta.get("info", {}), path)
    except (OSError, ValueError, SafetensorError, AttributeError) as e:
        problem = f"unreadable ({type(e).__name__}: {e})"
    log.warning("eval cache entry %s is corrupt (%s): recomputing", path, problem)
    shutil.rmtree(path, ignore_errors=True)
    return None


def model_fingerprint(lm) -> dict[str, Any]:
    """What identifies a loaded model for cache keys: name, shape, vocab and a checksum of its weights' sums.

    The weight sums make two different models that share a name (two tiny
    random models, a re-prepared checkpoint) key different entries; they cost
    one pass over the parameters (milliseconds).
    """
    with torch.no_grad():
        sums = [float(p.detach().double().sum()) for p in lm.model.original_model.parameters()]
    digest = hashlib.sha256(json.dumps([round(s, 6) for s in sums]).encode()).hexdigest()[:16]
    return {"name": str(lm.name), "d_model": int(lm.d_model), "n_layers": int(lm.n_layers),
            "vocab": int(len(lm.tokenizer)), "weights": digest}
