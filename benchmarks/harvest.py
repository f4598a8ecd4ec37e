"""Harvest throughput against a bare forward pass up to the same layer, measured side by side.

On the default offline model and layer, harvests ``--tokens`` activations into
a temporary ``$FCSAE_HOME`` (the prepared models and corpus are linked in, not
rebuilt) and times the whole ``fcsae.activations.harvest`` call (corpus read,
packing, forward passes, casting, shard writes and checksums, manifest). In the
same run it times ``fcsae.lm.resid_at`` alone on the same packed rows in the
same batches. The two are interleaved ``--repeats`` times and the best of each
is kept, so a noisy neighbour on a shared CPU hurts both alike.

Usage: ``python benchmarks/harvest.py [--tokens 8192] [--repeats 2]``
Last line: ``harvest: ratio=X.XX (target >= 0.9)`` (harvest tokens/s over forward tokens/s).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


def bare_forward(lm, rows_RT: torch.Tensor, layer: int, batch_size: int) -> float:
    """Seconds to run the model up to ``layer`` over all rows, batch by batch, as harvest does."""
    from fcsae.lm import resid_at

    t0 = time.perf_counter()
    for b in range(0, rows_RT.shape[0], batch_size):
        resid_at(lm, rows_RT[b:b + batch_size], layer)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8_192)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from fcsae import activations, corpus, lm as lm_mod
    from fcsae.config import DEFAULT_LAYER, DEFAULT_MODEL, HarvestConfig, LMConfig
    from fcsae.paths import fcsae_home

    real_home = fcsae_home()
    lm = lm_mod.load_model(DEFAULT_MODEL)
    corpus.prepare_offline_corpus()
    # Small shards so the run writes several, as a real harvest does.
    cfg = HarvestConfig(lm=LMConfig(model=DEFAULT_MODEL, layer=DEFAULT_LAYER), tokens=args.tokens, shard_tokens=4096)
    rows_RT = corpus.pack(corpus.iter_texts("offline", "train"), lm.tokenizer, cfg.context_len,
                          max_rows=math.ceil(cfg.tokens / (cfg.context_len - 1)))
    bare_forward(lm, rows_RT[:cfg.batch_size], DEFAULT_LAYER, cfg.batch_size)  # warm-up

    harvest_s, forward_s = [], []
    with tempfile.TemporaryDirectory(prefix="fcsae-bench-") as tmp:
        for r in range(args.repeats):
            home = Path(tmp) / f"home{r}"
            home.mkdir()
            for sub in ("models", "corpus"):
                if (real_home / sub).exists():
                    (home / sub).symlink_to(real_home / sub)
            forward_s.append(bare_forward(lm, rows_RT, DEFAULT_LAYER, cfg.batch_size))
            os.environ["FCSAE_HOME"] = str(home)
            t0 = time.perf_counter()
            path = activations.harvest(cfg, lm=lm, progress=False)
            harvest_s.append(time.perf_counter() - t0)
            os.environ["FCSAE_HOME"] = str(real_home)
            assert activations.ActivationCache(path).n_tokens == cfg.tokens

    h_tps = cfg.tokens / min(harvest_s)
    f_tps = cfg.tokens / min(forward_s)  # same rows, same work: the ratio is forward time / harvest time
    print(f"model {DEFAULT_MODEL} layer {DEFAULT_LAYER}, {cfg.tokens} tokens, context {cfg.context_len}, "
          f"batch {cfg.batch_size}, torch threads {torch.get_num_threads()}")
    print(f"bare forward to layer {DEFAULT_LAYER}: {f_tps:,.0f} tok/s (runs: {', '.join(f'{s:.2f}s' for s in forward_s)})")
    print(f"harvest (pack + forward + write): {h_tps:,.0f} tok/s (runs: {', '.join(f'{s:.2f}s' for s in harvest_s)})")
    print(f"harvest: ratio={h_tps / f_tps:.2f} (target >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
