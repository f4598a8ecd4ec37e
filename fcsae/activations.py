"""Harvest residual-stream activations once into an on-disk cache; read them back as shuffled batches.

Layout of one cache, ``$FCSAE_HOME/activations/<model>-L<layer>-<key>/``:

- ``shard_00000.safetensors``, ...: ``acts`` ``[n, d_in]`` in the store dtype
  (float16 or bfloat16, raw, not normalised) and ``token_ids`` ``[n]`` (int32),
  one row per non-BOS token, in corpus order. Each shard is written atomically.
- ``progress.json``: the shards finished so far (while harvesting only).
- ``manifest.json``: written last; its presence marks the cache complete. It
  records the key fields, ``d_in``, ``n_tokens``, ``norm_scale``, the BOS token
  and every shard's size and sha256.

``<key>`` hashes everything that changes the data: model, layer, model dtype,
corpus fingerprint, context length, token count, store dtype, shard size and
``FORMAT_VERSION``. A corrupt or missing shard is reported by ``ActivationCache``
with the file's name; re-running the same ``fcsae harvest`` re-verifies every
shard and recomputes from the first bad one (the same code path resumes an
interrupted harvest).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import time
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from tqdm.auto import tqdm

from fcsae import corpus
from fcsae.config import HarvestConfig
from fcsae.errors import FcsaeInputError
from fcsae.io import atomic_path, write_json
from fcsae.paths import cache_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bump when the on-disk layout or the harvested data's meaning changes."""
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def key_fields(cfg: HarvestConfig, corpus_fingerprint: str) -> dict:
    """Everything that determines the harvested data (the cache key hashes this)."""
    return {
        "format_version": FORMAT_VERSION,
        "model": cfg.lm.model,
        "layer": cfg.lm.layer,
        "lm_dtype": cfg.lm.dtype,
        "corpus": cfg.corpus,
        "corpus_fingerprint": corpus_fingerprint,
        "context_len": cfg.context_len,
        "tokens": cfg.tokens,
        "store_dtype": cfg.store_dtype,
        "shard_tokens": cfg.shard_tokens,
    }


def cache_key(fields: dict) -> str:
    """Short hex hash of ``key_fields`` (``corpus``, the source's spelling, is left out: its fingerprint counts)."""
    keyed = {k: v for k, v in fields.items() if k != "corpus"}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(cfg: HarvestConfig, corpus_fingerprint: str | None = None) -> Path:
    """Directory of the cache for ``cfg`` (not created)."""
    fp = corpus.fingerprint(cfg.corpus) if corpus_fingerprint is None else corpus_fingerprint
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", cfg.lm.model.rstrip("/").split("/")[-1])[:64] or "model"
    return cache_dir("activations") / f"{stem}-L{cfg.lm.layer}-{cache_key(key_fields(cfg, fp))}"


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _valid_prefix(out: Path, fields: dict) -> list[dict]:
    """Finished shards that still verify, from the manifest or progress file, up to the first bad one."""
    for name in (MANIFEST, PROGRESS):
        path = out / name
        if not path.is_file():
            continue
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if {k: state.get(k) for k in fields} != fields:
            continue
        good = []
        for shard in state.get("shards", []):
            file = out / shard["file"]
            if not file.is_file() or file.stat().st_size != shard["bytes"] or _sha256(file) != shard["sha256"]:
                log.warning("activation cache: %s is missing or corrupt; recomputing from it", file)
                break
            good.append(shard)
        return good
    return []


def _shard_sizes(total: int, shard_tokens: int) -> list[int]:
    return [min(shard_tokens, total - start) for start in range(0, total, shard_tokens)]


def _write_shard(out: Path, index: int, acts_ND: torch.Tensor, ids_N: torch.Tensor) -> dict:
    """Write one shard atomically; returns its manifest record (size, checksum, sum of row norms)."""
    data = st_save({"acts": acts_ND.contiguous(), "token_ids": ids_N.to(torch.int32).contiguous()})
    name = f"shard_{index:05d}.safetensors"
    with atomic_path(out / name) as tmp:
        tmp.write_bytes(data)
    norm_sum = float(acts_ND.float().norm(dim=1).double().sum())
    return {"file": name, "n_tokens": int(acts_ND.shape[0]), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "norm_sum": norm_sum}


def _load_lm(cfg: HarvestConfig, lm):
    from fcsae import lm as lm_mod

    if lm is None:
        lm = lm_mod.load_model(cfg.lm.model, device=cfg.lm.device, dtype=cfg.lm.dtype)
    elif lm.name != cfg.lm.model:
        log.warning("harvest: the given model is named %r but the config says %r; the cache is keyed by the config",
                    lm.name, cfg.lm.model)
    lm_mod.check_layer(lm, cfg.lm.layer)
    return lm


def _pack_rows(cfg: HarvestConfig, tokenizer) -> torch.Tensor:
    body = cfg.context_len - 1
    n_rows = math.ceil(cfg.tokens / body)
    rows = corpus.pack(corpus.iter_texts(cfg.corpus, "train"), tokenizer, cfg.context_len, max_rows=n_rows)
    if rows.shape[0] < n_rows:
        raise FcsaeInputError(
            f"tokens: corpus {cfg.corpus!r} gives only {rows.shape[0] * body} tokens at context_len "
            f"{cfg.context_len}, fewer than the {cfg.tokens} asked for")
    return rows


def _run_shards(cfg: HarvestConfig, lm, rows_RT: torch.Tensor, out: Path, fields: dict,
                done: list[dict], progress: bool) -> list[dict]:
    """Run the model over the rows from the first unfinished shard on, writing the remaining shards."""
    from fcsae.lm import resid_at

    body, bs = cfg.context_len - 1, cfg.batch_size
    sizes = _shard_sizes(cfg.tokens, cfg.shard_tokens)
    start_tok = sum(s["n_tokens"] for s in done)
    # Batches sit on a fixed grid of rows, so a resumed harvest runs exactly the
    # same forward passes as an uninterrupted one and gets bit-identical data.
    first_batch = start_tok // body // bs
    skip = start_tok - first_batch * bs * body
    store = STORE_DTYPES[cfg.store_dtype]
    shards = list(done)
    pending_acts: list[torch.Tensor] = []
    pending_ids: list[torch.Tensor] = []
    n_pending = 0
    bar = tqdm(total=cfg.tokens, initial=start_tok, unit="tok", unit_scale=True, disable=not progress,
               desc=f"harvest {cfg.lm.model} L{cfg.lm.layer}")
    try:
        for b in range(first_batch, math.ceil(rows_RT.shape[0] / bs)):
            tokens_BT = rows_RT[b * bs:(b + 1) * bs]
            resid_BTD = resid_at(lm, tokens_BT, cfg.lm.layer)
            acts_ND = resid_BTD[:, 1:, :].reshape(-1, resid_BTD.shape[-1]).to("cpu", store)  # drop BOS positions
            ids_N = tokens_BT[:, 1:].reshape(-1)
            if skip:
                acts_ND, ids_N, skip = acts_ND[skip:], ids_N[skip:], 0
            bar.update(min(acts_ND.shape[0], cfg.tokens - bar.n))
            if not torch.isfinite(acts_ND).all():
                raise FcsaeInputError(f"store_dtype: activations overflow {cfg.store_dtype}; use bfloat16")
            pending_acts.append(acts_ND)
            pending_ids.append(ids_N)
            n_pending += acts_ND.shape[0]
            while len(shards) < len(sizes) and n_pending >= sizes[len(shards)]:
                want = sizes[len(shards)]
                acts_all, ids_all = torch.cat(pending_acts), torch.cat(pending_ids)
                shards.append(_write_shard(out, len(shards), acts_all[:want], ids_all[:want]))
                write_json(out / PROGRESS, {**fields, "shards": shards})
                pending_acts, pending_ids = [acts_all[want:]], [ids_all[want:]]
                n_pending -= want
            if len(shards) == len(sizes):
                break
    finally:
        bar.close()
    return shards


def matching_caches(cfg: HarvestConfig) -> list[Path]:
    """Complete caches of the same data as ``cfg`` except its size (``tokens``, ``shard_tokens``), largest first.

    ``fcsae train --model`` reuses the first instead of harvesting anew when no
    size is asked for (a sweep's cache serves a single training run).
    """
    root = cache_dir("activations")
    if not root.is_dir():
        return []
    want = {k: v for k, v in key_fields(cfg, corpus.fingerprint(cfg.corpus)).items()
            if k not in ("tokens", "shard_tokens", "corpus")}
    found = []
    for manifest in root.glob(f"*/{MANIFEST}"):
        try:
            m = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        if {k: m.get(k) for k in want} == want and isinstance(m.get("n_tokens"), int):
            found.append((m["n_tokens"], manifest.parent))
    return [p for _, p in sorted(found, key=lambda t: (-t[0], str(t[1])))]


def harvest(cfg: HarvestConfig, lm=None, progress: bool = True) -> Path:
    """Run the model once over the corpus and cache ``cfg.tokens`` activations; returns the cache dir.

    A complete cache with the same key is a hit: it is verified and returned
    without loading a model. An interrupted or damaged cache resumes from its
    first missing or corrupt shard. ``lm`` (a ``fcsae.lm.LoadedModel``) skips
    loading the model; it must be the model ``cfg.lm.model`` names.
    """
    fp = corpus.fingerprint(cfg.corpus)
    fields = key_fields(cfg, fp)
    out = cache_path(cfg, fp)
    n_shards = len(_shard_sizes(cfg.tokens, cfg.shard_tokens))
    done = _valid_prefix(out, fields) if out.exists() else []
    if len(done) == n_shards and (out / MANIFEST).is_file():
        log.info("activation cache hit: %s", out)
        return out
    t0 = time.perf_counter()
    lm = _load_lm(cfg, lm)
    rows_RT = _pack_rows(cfg, lm.tokenizer)  # before creating anything: bad input leaves no files
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a damaged cache stops counting as complete until rebuilt
    if done:
        log.info("resuming harvest at shard %d of %d in %s", len(done), n_shards, out)
    try:
        shards = _run_shards(cfg, lm, rows_RT, out, fields, done, progress) if len(done) < n_shards else done
    except FcsaeInputError:
        if not done:  # bad input (a float16 overflow) found mid-run: leave nothing half-written behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    if len(shards) != n_shards:  # cannot happen when the rows cover cfg.tokens; guard the manifest anyway
        raise RuntimeError(f"harvest wrote {len(shards)} of {n_shards} shards in {out}")
    mean_norm = sum(s["norm_sum"] for s in shards) / cfg.tokens
    d_in = int(lm.d_model)
    bos = corpus.bos_choice(lm.tokenizer)
    manifest = {
        **fields,
        "hook": f"blocks.{cfg.lm.layer}.hook_resid_post",
        "d_in": d_in,
        "n_tokens": cfg.tokens,
        "mean_norm": mean_norm,
        "norm_scale": math.sqrt(d_in) / mean_norm,
        "bos_token_id": bos.token_id,
        "bos_kind": bos.kind,
        "bos_dropped": True,
        "shards": shards,
        "harvest_seconds": round(time.perf_counter() - t0, 3),
    }
    write_json(out / MANIFEST, manifest)
    (out / PROGRESS).unlink(missing_ok=True)
    log.info("harvested %d tokens (d_in %d) into %s", cfg.tokens, d_in, out)
    return out


# ---------------------------------------------------------------- reading


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers, so (seed, epoch, window) streams are independent."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


class ActivationCache:
    """A complete activation cache: manifest checks on open, shard checksums on every read.

    ``batches`` yields normalised float32 ``[batch, d_in]`` tensors forever
    (epoch after epoch), shuffled within windows of a few shards so memory
    stays bounded by the window, deterministic given the seed.
    """

    def __init__(self, path):
        self.path = Path(path)
        file = self.path / MANIFEST
        if not file.is_file():
            raise FcsaeInputError(f"activation cache {str(self.path)!r}: no {MANIFEST} (not a complete cache); "
                                  "run `fcsae harvest` to build or finish it")
        try:
            manifest = json.loads(file.read_text())
            self.d_in = int(manifest["d_in"])
            self.n_tokens = int(manifest["n_tokens"])
            self.norm_scale = float(manifest["norm_scale"])
            self.store_dtype = STORE_DTYPES[manifest["store_dtype"]]
            self.shards = list(manifest["shards"])
            sizes = [int(s["n_tokens"]) for s in self.shards]
        except (ValueError, KeyError, TypeError) as e:
            raise FcsaeInputError(f"activation cache {str(file)!r}: unreadable manifest ({type(e).__name__}: {e}); "
                                  "re-run `fcsae harvest`") from None
        if manifest.get("format_version") != FORMAT_VERSION:
            raise FcsaeInputError(f"activation cache {str(file)!r}: format version {manifest.get('format_version')!r}, "
                                  f"this fcsae reads {FORMAT_VERSION}; re-run `fcsae harvest`")
        if sum(sizes) != self.n_tokens or min(sizes, default=0) < 1:
            raise FcsaeInputError(f"activation cache {str(file)!r}: shard sizes do not add up to n_tokens; "
                                  "re-run `fcsae harvest`")
        for shard in self.shards:
            shard_file = self.path / shard["file"]
            if not shard_file.is_file() or shard_file.stat().st_size != shard["bytes"]:
                self._corrupt(shard_file, "missing or truncated")
        self.manifest = manifest
        self._sizes = sizes
        self._memo: dict[int, torch.Tensor] = {}

    def _corrupt(self, file: Path, what: str):
        raise FcsaeInputError(f"activation cache shard {str(file)!r} is {what}; re-run the same `fcsae harvest` "
                              "to recompute it")

    def load_shard(self, index: int) -> torch.Tensor:
        """Raw activations ``[n, d_in]`` of one shard, in the store dtype, after checking its sha256."""
        shard = self.shards[index]
        file = self.path / shard["file"]
        try:
            data = file.read_bytes()
        except OSError:
            self._corrupt(file, "unreadable")
        if hashlib.sha256(data).hexdigest() != shard["sha256"]:
            self._corrupt(file, "corrupt (sha256 mismatch)")
        acts_ND = st_load(data)["acts"]
        if acts_ND.shape != (shard["n_tokens"], self.d_in):
            self._corrupt(file, f"of shape {tuple(acts_ND.shape)}, expected {(shard['n_tokens'], self.d_in)}")
        return acts_ND

    def verify(self) -> None:
        """Check every shard's checksum now (``batches`` checks each shard as it reads it)."""
        for i in range(len(self.shards)):
            self.load_shard(i)

    def denormalize(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation: raw = normalised / norm_scale."""
        return x_BD / self.norm_scale

    def _windows(self, seed: int, epoch: int, window_shards: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(_mix(seed, epoch, -1))
        order = torch.randperm(len(self.shards), generator=g).tolist()
        return [order[i:i + window_shards] for i in range(0, len(order), window_shards)]

    def _window(self, ids: list[int], seed: int, epoch: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        keep = {i: self._memo[i] if i in self._memo else self.load_shard(i) for i in ids}
        # Keep the window for the next epoch only when it is the whole cache (then it never changes).
        self._memo = keep if len(ids) == len(self.shards) else {}
        data_ND = torch.cat([keep[i] for i in ids]) if len(ids) > 1 else keep[ids[0]]
        perm = torch.randperm(data_ND.shape[0], generator=torch.Generator().manual_seed(_mix(seed, epoch, w)))
        return data_ND, perm

    def _stream(self, seed: int, start_row: int, window_shards: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(window data, row order) pairs from global stream position ``start_row`` on, forever."""
        epoch, offset = divmod(start_row, self.n_tokens)
        while True:
            for w, ids in enumerate(self._windows(seed, epoch, window_shards)):
                size = sum(self._sizes[i] for i in ids)
                if offset >= size:  # skipped windows are never read
                    offset -= size
                    continue
                data_ND, perm = self._window(ids, seed, epoch, w)
                yield data_ND, perm[offset:]
                offset = 0
            epoch += 1

    def batches(self, batch_size: int, seed: int = 0, start_batch: int = 0,
                window_shards: int = 4) -> Iterator[torch.Tensor]:
        """Shuffled normalised float32 batches ``[batch_size, d_in]``, forever.

        Epoch e visits every row once: shards in a seeded random order, grouped
        into windows of ``window_shards`` shards whose rows are shuffled
        together. Batches are consecutive slices of that stream, so
        ``start_batch=k`` yields exactly what the k-th batch onwards would have
        been, reading only the windows it needs.
        """
        for name, value, low in (("batch_size", batch_size, 1), ("start_batch", start_batch, 0),
                                 ("window_shards", window_shards, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise FcsaeInputError(f"{name}: must be an integer >= {low}, got {value!r}")
        parts: list[torch.Tensor] = []
        have = 0
        for data_ND, order in self._stream(seed, start_batch * batch_size, window_shards):
            pos = 0
            while pos < order.shape[0]:
                take = min(batch_size - have, order.shape[0] - pos)
                parts.append(data_ND[order[pos:pos + take]])
                have += take
                pos += take
                if have == batch_size:
                    batch_BD = parts[0] if len(parts) == 1 else torch.cat(parts)
                    yield batch_BD.float() * self.norm_scale
                    parts, have = [], 0
