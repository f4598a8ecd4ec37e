"""TopK SAE training-step throughput: fcsae against sparsify and SAELens, side by side, and the floor.

One training step = forward, loss (MSE + AuxK when latents are dead), backward,
gradient clipping, Adam step and bookkeeping, each library's own:

- fcsae: ``Trainer.train_step`` (fast path, decoder-norm constraint, dead
  counters, input buffer); ``--with-dense`` adds fcsae's dense reference;
- ``sparsify``: eai-sparsify 1.3.3 ``SparseCoder`` forward (fused encoder,
  embedding-bag decoder), backward, parallel-gradient removal, decoder
  renormalisation, dead counters, Adam (its Trainer's ``optimizer="adam"``);
- ``saelens``: SAELens 6.54.12 ``TopKTrainingSAE.training_forward_pass`` plus the
  body of ``SAETrainer._train_step`` (firing counters, backward, clip, Adam);
- ``saelens_sparse``: the same with ``use_sparse_activations=True`` (it needs
  ``rescale_acts_by_decoder_norm=False``, else it fails in backward);
- ``floor``: one dense fp32 encoder matmul ``x @ W_enc`` (a TopK step cannot avoid it).

Where fcsae's ``bf16_encoder='auto'`` turns the bf16-ranked encoder on (a CPU
with AMX-BF16 or AVX512-BF16), two columns more: ``fcsae fp32`` (the same
step with ``bf16_encoder='off'``) and ``floor bf16`` (the matmul in bf16);
the headlines still use ``fcsae`` as a user gets it and the fp32 floor.

The anchors run in their own virtualenvs (found or built under ``/tmp/venvs``,
see ``benchmarks/_anchors.py``); one that cannot be built is skipped with its
reason printed. All implementations see the same random batches (anisotropic,
non-centred, like normalised residuals) at the same sizes and thread count in
the same run; rounds are interleaved and the median step time is reported,
because the 2-core machine is shared. ``fcsae+dead`` repeats fcsae's step with
half the latents marked dead, so AuxK's extra top-k runs (a fresh SAE has none).

Threads: ``--threads 0`` (default) lets ``fcsae.threads.auto_threads`` choose
(1 when the load average leaves no core free); every implementation uses the
same number.

``--architectures`` adds a case: fcsae's TopK vs BatchTopK vs Matryoshka
(SAEBench prefixes) steps, fast path, at the same shape and k, interleaved,
each with its step time relative to TopK.

Usage: ``python benchmarks/train_step.py [--sizes large|all|576/4k,...] [--rounds 3] [--steps 1] [--threads N]
[--all-anchors] [--architectures]``. The default (the two 16,384-latent sizes
the headlines need, 3 rounds of 1 step) takes about 6-9 minutes on the shared
2-core machine; ``--sizes all`` adds the 4,096-latent sizes. SAELens's default
(dense) step is left out at 16,384 latents unless ``--all-anchors``: it is the
slowest anchor by far (a fifth of sparsify's tokens/s there, about a minute per
step under load), so it can never be the best anchor the headline compares with.
Last lines: ``train_step: ratio=X.XX`` (fcsae tokens/s / the best anchor's, at
the large dictionary, the smaller ratio of the two widths; target >= 2.0) and
``train_step_floor: ratio=X.XX`` (fcsae / the floor there; target >= 0.7).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fcsae  # noqa: E402,F401  (first: it sets the OpenMP wait policy before torch loads OpenMP; the anchors inherit it)
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import _anchors  # noqa: E402
from fcsae.config import SAEConfig, TrainerConfig  # noqa: E402
from fcsae.sae import SparseAutoencoder  # noqa: E402
from fcsae.threads import set_threads  # noqa: E402
from fcsae.trainer import Trainer  # noqa: E402

SIZES = {  # name: (d_in, dict_size, k, batch); 576 = SmolLM2-135M, 640 = Gemma 3 270M
    "576/4k": (576, 4096, 32, 4096),
    "640/4k": (640, 4096, 32, 4096),
    "576/16k": (576, 16384, 64, 4096),
    "640/16k": (640, 16384, 64, 4096),
}
LARGE = ("576/16k", "640/16k")
SLOW_ANCHOR = "saelens"
"""Skipped at the large sizes unless ``--all-anchors`` (see the module docstring)."""
DEAD_FRAC = 0.5
"""Fraction of latents marked dead in the ``fcsae+dead`` case."""


def _trainer(d_in: int, n_lat: int, k: int, batch: int, fast: bool = True, dead_frac: float = 0.0,
             activation: str = "topk", bf16: str = "auto") -> Trainer:
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, dict_size=n_lat, k=k, activation=activation), fast=fast)
    cfg = TrainerConfig(batch_size=batch, total_tokens=batch * 10_000, warmup_steps=10, b_dec_init="zeros",
                        log_every=10_000, buffer_tokens=0, bf16_encoder=bf16)
    trainer = Trainer(sae, cfg)
    trainer.bench_dead = int(dead_frac * n_lat)  # latents 0..n-1 are kept dead before every timed step
    return trainer


def _time_ours(trainer: Trainer, data_ND: torch.Tensor, batch: int, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        i = trainer.step
        x = data_ND[(i * batch) % len(data_ND):][:batch]
        trainer.tokens_since_fired_F[:trainer.bench_dead] = 10 ** 15  # some may have fired in the last step
        t0 = time.perf_counter()
        trainer.train_step(x)
        times.append(time.perf_counter() - t0)
    return times


def _time_floor(data_ND: torch.Tensor, W_enc_DF: torch.Tensor, batch: int, steps: int) -> list[float]:
    times = []
    for i in range(steps):
        x = data_ND[(i * batch) % len(data_ND):][:batch]
        t0 = time.perf_counter()
        x @ W_enc_DF
        times.append(time.perf_counter() - t0)
    return times


def _anchor_workers(pythons: dict, data_file: Path, size: tuple, threads: int, skip: tuple = ()) -> dict:
    workers = {}
    for name, py in pythons.items():
        if name in skip:
            print(f"  {name}: not timed at this size (--all-anchors times it)", flush=True)
            continue
        _, mode, _ = _anchors.ANCHORS[name]
        w = _anchors.Worker(py, mode, data_file, size, threads, 0.0)
        if w.error:
            print(f"  {name}: skipped, its worker failed: {w.error}", flush=True)
        else:
            workers[name] = w
    return workers


def bench_size(name: str, size: tuple, rounds: int, steps: int, pythons: dict, tmp: Path, threads: int,
               with_dense: bool, all_anchors: bool = False) -> dict:
    """Median seconds per step of each implementation at one size."""
    d_in, n_lat, k, batch = size
    g = torch.Generator().manual_seed(0)
    # Anisotropic, non-centred data with E||x|| ~ sqrt(d_in), like normalised residuals.
    data_ND = (torch.randn(batch * 4, d_in, generator=g) * torch.rand(d_in, generator=g) * 1.7 + 0.3)
    data_file = tmp / f"{name.replace('/', '_')}.safetensors"
    save_file({"x": data_ND.contiguous()}, str(data_file))
    ours = {"fcsae": _trainer(*size)}
    bf16 = ours["fcsae"].sae.encoder_bf16
    if bf16:  # the same step with fp32 ranking, so the table shows what the bf16 ranking buys on this CPU
        ours["fcsae fp32"] = _trainer(*size, bf16="off")
    if name in LARGE:
        ours["fcsae+dead"] = _trainer(*size, dead_frac=DEAD_FRAC)
    if with_dense:
        ours["dense"] = _trainer(*size, fast=False)
    for trainer in ours.values():
        _time_ours(trainer, data_ND, batch, 1)  # warm-up (first Adam step allocates state)
    W_enc_DF = ours["fcsae"].sae.W_enc.detach()
    skip = () if all_anchors or name not in LARGE else (SLOW_ANCHOR,)
    workers = _anchor_workers(pythons, data_file, size, threads, skip)
    floors = ["floor", "floor bf16"] if bf16 else ["floor"]
    times: dict[str, list[float]] = {key: [] for key in [*ours, *workers, *floors]}
    try:
        for r in range(rounds):
            for key, trainer in ours.items():
                times[key] += _time_ours(trainer, data_ND, batch, steps)
            for key, w in workers.items():
                got = w.time_steps(steps)
                if got is None:
                    print(f"  {key}: failed in round {r + 1}: {w.error}", flush=True)
                else:
                    times[key] += got
            times["floor"] += _time_floor(data_ND, W_enc_DF, batch, steps)
            if bf16:
                times["floor bf16"] += _time_floor(data_ND.bfloat16(), W_enc_DF.bfloat16(), batch, steps)
            print(f"  {name} round {r + 1}/{rounds} (load {os.getloadavg()[0]:.1f}): " + ", ".join(
                f"{key} {statistics.median(v[-steps:]):.3f}s" for key, v in times.items() if v), flush=True)
    finally:
        for w in workers.values():
            w.close()
    med = {key: statistics.median(v) for key, v in times.items() if v}
    print(f"{name} d_in={d_in} dict={n_lat} k={k} batch={batch}: " + ", ".join(
        f"{key} {batch / s:,.0f} tok/s" for key, s in med.items()), flush=True)
    return med


def _find_anchors(build: bool) -> dict:
    pythons, venvs = {}, {}
    for name, (venv, _, what) in _anchors.ANCHORS.items():
        if venv not in venvs:
            venvs[venv] = _anchors.find_or_build(venv, build)
        py, why = venvs[venv]
        print(f"anchor {name}: {what}; venv: {why}" + ("" if py else f" -> SKIPPED ({name} not measured)"),
              flush=True)
        if py:
            pythons[name] = py
    return pythons


def bench_architectures(name: str, size: tuple, rounds: int, steps: int) -> dict:
    """Median seconds per fast step of topk, batchtopk and matryoshka at one size, interleaved."""
    d_in, n_lat, k, batch = size
    g = torch.Generator().manual_seed(0)
    data_ND = (torch.randn(batch * 4, d_in, generator=g) * torch.rand(d_in, generator=g) * 1.7 + 0.3)
    trainers = {a: _trainer(*size, activation=a) for a in ("topk", "batchtopk", "matryoshka")}
    for t in trainers.values():
        _time_ours(t, data_ND, batch, 1)  # warm-up
    times: dict[str, list[float]] = {a: [] for a in trainers}
    for _ in range(rounds):
        for a, t in trainers.items():
            times[a] += _time_ours(t, data_ND, batch, steps)
    med = {a: statistics.median(v) for a, v in times.items()}
    print(f"{name} architectures: " + ", ".join(
        f"{a} {batch / s:,.0f} tok/s ({s / med['topk']:.2f}x topk's step time)" for a, s in med.items()), flush=True)
    return med


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--steps", type=int, default=1, help="timed steps per implementation per round (default 1)")
    p.add_argument("--quick", action="store_true", help="576/4k and 576/16k only")
    p.add_argument("--sizes", default="large", help=f"large (default: {', '.join(LARGE)}), all, or a comma-separated "
                   f"subset of {', '.join(SIZES)}")
    p.add_argument("--all-anchors", action="store_true", help=f"also time {SLOW_ANCHOR} at the 16,384-latent sizes")
    p.add_argument("--threads", type=int, default=0, help="torch threads for every implementation (0: automatic)")
    p.add_argument("--with-dense", action="store_true", help="also time fcsae's dense reference")
    p.add_argument("--architectures", action="store_true", help="also time batchtopk and matryoshka vs topk (fast path)")
    p.add_argument("--no-build", action="store_true", help="skip anchors whose venv is missing instead of building it")
    args = p.parse_args()
    threads = set_threads(args.threads)
    named = {"large": list(LARGE), "all": list(SIZES)}
    names = ["576/4k", "576/16k"] if args.quick else named.get(args.sizes, args.sizes.split(","))
    unknown = [n for n in names if n not in SIZES]
    if unknown:
        print(f"train_step.py: error: --sizes: unknown {unknown[0]!r}; allowed: {', '.join(SIZES)}", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, {threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    from fcsae.sae import bf16_encoder_pays

    print(f"fcsae: TrainerConfig.bf16_encoder='auto' -> bf16-ranked encoder {'on' if bf16_encoder_pays('cpu') else 'off'} "
          "on this CPU (on needs AMX-BF16 or AVX512-BF16)", flush=True)
    pythons = _find_anchors(not args.no_build)
    results = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            results[name] = bench_size(name, SIZES[name], args.rounds, args.steps, pythons, Path(tmp), threads,
                                       args.with_dense, args.all_anchors)
            if args.architectures:
                bench_architectures(name, SIZES[name], args.rounds, args.steps)
    print(f"load average after: {os.getloadavg()[0]:.2f}; {time.perf_counter() - t0:.0f} s in all", flush=True)
    print("\nsize      " + "".join(f"{key:>16}" for key in results[names[-1]]) + "   (tokens/s)")
    for name, med in results.items():
        batch = SIZES[name][3]
        print(f"{name:<10}" + "".join(f"{batch / med[key]:>16,.0f}" if key in med else f"{'-':>16}"
                                      for key in results[names[-1]]))
    head = [n for n in names if n in LARGE] or names
    anchors = [a for a in _anchors.ANCHORS if all(a in results[n] for n in head)]
    if anchors:
        ratios = {n: min(results[n][a] for a in anchors) / results[n]["fcsae"] for n in head}
        worst = min(ratios, key=ratios.get)
        best = min(anchors, key=lambda a: results[worst][a])
        print(f"train_step: ratio={ratios[worst]:.2f} (target >= 2.0; fcsae vs the best anchor, {best}, at {worst}; "
              + ", ".join(f"{n} {r:.2f}" for n, r in ratios.items()) + ")")
    else:
        print("train_step: no anchor was measured (see the SKIPPED lines above); no ratio")
    floor = {n: results[n]["floor"] / results[n]["fcsae"] for n in head}
    worst = min(floor, key=floor.get)
    print(f"train_step_floor: ratio={floor[worst]:.2f} (target >= 0.7; fcsae step vs one fp32 encoder matmul, at {worst}; "
          + ", ".join(f"{n} {r:.2f}" for n, r in floor.items()) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
