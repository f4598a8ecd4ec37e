"""Wall time of the absorption and core evals for one SAE: cold eval caches, then warm, in the same run.

The cold run uses a fresh temporary ``$FCSAE_HOME`` whose ``models/`` and
``corpus/`` are symlinks to the prepared ones (so "cold" means the eval caches
only: no dequantisation, no corpus build). The model is loaded once, outside
the timings. Ends with one headline line:

    eval_cost: ratio=X.XX (target <= 0.2 for absorption)

where ratio = warm / cold wall time of the absorption eval.

    .venv/bin/python benchmarks/eval_cost.py [--sae DIR --norm-scale S] [--absorption-words N] [--core-tokens N]
                                             [--evals absorption]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _prepared_home() -> Path:
    from fcsae.paths import fcsae_home

    return fcsae_home()


def _cold_home(real: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="fcsae_eval_cost_"))
    for sub in ("models", "corpus"):
        if (real / sub).exists():
            (tmp / sub).symlink_to(real / sub)
    return tmp


def _sae_and_scale(args, lm, layer: int):
    import torch

    from fcsae.config import SAEConfig
    from fcsae.lm import resid_at
    from fcsae.sae import SparseAutoencoder

    if args.sae:
        return SparseAutoencoder.load(args.sae), args.norm_scale, f"saved SAE {args.sae}"
    # An untrained TopK SAE costs the same to evaluate as a trained one of the same shape.
    sae = SparseAutoencoder(SAEConfig(d_in=lm.d_model, dict_size=args.dict_size, k=args.k))
    tokens = torch.randint(0, len(lm.tokenizer), (2, 64))
    x = resid_at(lm, tokens, layer)[:, 1:].reshape(-1, lm.d_model)
    scale = float(lm.d_model ** 0.5 / x.norm(dim=1).mean())
    return sae, scale, f"untrained TopK SAE (dict {args.dict_size}, k {args.k})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model (default: the default model)")
    p.add_argument("--layer", type=int, default=None, help="layer (default: the default layer)")
    p.add_argument("--sae", default=None, help="a saved SAE directory (default: an untrained TopK SAE)")
    p.add_argument("--norm-scale", type=float, default=None, help="with --sae: its norm_scale")
    p.add_argument("--dict-size", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--absorption-words", type=int, default=None)
    p.add_argument("--core-tokens", type=int, default=None)
    p.add_argument("--evals", choices=("both", "absorption"), default="both",
                   help="time both evals (default) or the absorption eval only (the headline's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    real = _prepared_home()
    cold = _cold_home(real)
    os.environ["FCSAE_HOME"] = str(cold)
    try:
        return _run(args, p)
    finally:
        shutil.rmtree(cold, ignore_errors=True)  # removes the symlinks, not what they point to


def _run(args, p) -> int:
    from fcsae.config import DEFAULT_LAYER, DEFAULT_MODEL, EvalConfig, LMConfig
    from fcsae.evals.absorption import evaluate_absorption
    from fcsae.evals.core import evaluate_core
    from fcsae.lm import load_model

    lm_cfg = LMConfig(model=args.model or DEFAULT_MODEL, layer=DEFAULT_LAYER if args.layer is None else args.layer)
    overrides = {k: v for k, v in (("absorption_words", args.absorption_words), ("core_tokens", args.core_tokens))
                 if v is not None}
    eval_cfg = EvalConfig(**overrides)
    lm = load_model(lm_cfg.model, dtype=lm_cfg.dtype)
    sae, scale, what = _sae_and_scale(args, lm, lm_cfg.layer)
    if scale is None:
        p.error("--norm-scale is required with --sae")
    print(f"{what} on {lm_cfg.model} layer {lm_cfg.layer}, norm_scale {scale:.4g}; "
          f"absorption_words {eval_cfg.absorption_words}, core_tokens {eval_cfg.core_tokens}; "
          f"eval caches under {os.environ['FCSAE_HOME']}")

    times = {}
    evals = (("absorption", lambda: evaluate_absorption(sae, lm_cfg, eval_cfg, scale, lm=lm, progress=False)),
             ("core", lambda: evaluate_core(sae, lm_cfg, eval_cfg, scale, lm=lm, progress=False)))
    evals = evals[:1] if args.evals == "absorption" else evals
    for name, fn in evals:
        for phase in ("cold", "warm"):
            t, load0 = time.perf_counter(), os.getloadavg()[0]
            result = fn()
            times[name, phase] = time.perf_counter() - t
            print(f"{name:10s} {phase}: load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
            summary = result.summary if name == "absorption" else result
            keys = ("mean_absorption_fraction", "n_letters") if name == "absorption" else ("explained_variance",
                                                                                           "ce_loss_score")
            print(f"{name:10s} {phase}: {times[name, phase]:8.1f} s   " +
                  "  ".join(f"{k}={summary[k]:.4f}" for k in keys), flush=True)
    for name, _ in evals:
        print(f"{name:10s} warm/cold = {times[name, 'warm'] / times[name, 'cold']:.3f}")
    ratio = times["absorption", "warm"] / times["absorption", "cold"]
    print(f"eval_cost: ratio={ratio:.2f} (target <= 0.2 for absorption)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
