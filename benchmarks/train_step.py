"""TopK SAE training-step throughput: fcsae fast path vs dense reference vs SAELens, side by side.

One training step = forward, loss (MSE + AuxK when latents are dead), backward,
gradient clipping, Adam step and bookkeeping (fcsae: ``Trainer.train_step``
with decoder-norm constraint, dead counters and input buffer; SAELens:
``TopKTrainingSAE.training_forward_pass`` plus the body of
``SAETrainer._train_step``: firing counters, backward, clip, Adam). All
implementations see the same random batches, at the same sizes, in the same run;
rounds are interleaved (fast, dense, SAELens, floor, repeat) and the median
per-step time is reported, because the 2-core machine is shared.

SAELens is imported from a separate virtualenv (``--saelens-python``, default
``/tmp/saelens-venv/bin/python``; create it with ``python3 -m venv
/tmp/saelens-venv && /tmp/saelens-venv/bin/pip install torch==2.13.0
sae-lens``) so that it never enters the project's environment; it is skipped
with a note if that interpreter is missing.

The floor is one dense encoder matmul ``x @ W_enc`` per step: a TopK step
cannot avoid it, so ``fast / floor`` says how much is left to win.

Usage: ``python benchmarks/train_step.py [--rounds 3] [--steps 2] [--threads N] [--quick]``.
Last line: ``train_step: ratio=X.XX (target >= 2.0 vs dense)`` at the large size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fcsae.config import SAEConfig, TrainerConfig  # noqa: E402
from fcsae.sae import SparseAutoencoder  # noqa: E402
from fcsae.trainer import Trainer  # noqa: E402

SIZES = {  # name: (d_in, dict_size, k, batch)
    "large": (640, 16384, 64, 4096),
    "small": (640, 4096, 32, 1024),
}

# Runs inside the SAELens virtualenv: times its TopK training step on the saved batches.
SAELENS_SCRIPT = r"""
import json, sys, time, torch
from safetensors.torch import load_file
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput
data = load_file(sys.argv[1])["x"]
d_in, d_sae, k, batch, steps, threads = (int(a) for a in sys.argv[2:8])
torch.set_num_threads(threads)
torch.manual_seed(0)
sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, dtype="float32", device="cpu"))
opt = torch.optim.Adam(sae.parameters(), lr=4e-4, betas=(0.9, 0.999))
since_fired = torch.zeros(d_sae)
dead = torch.zeros(d_sae, dtype=torch.bool)
def step(i):
    x = data[(i * batch) % len(data):][:batch]
    sae.train()
    out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                   n_training_steps=i, is_logging_step=False))
    with torch.no_grad():  # SAETrainer._train_step bookkeeping
        firing = out.feature_acts.bool().float()
        did_fire = firing.sum(-2).bool()
        since_fired.add_(1)
        since_fired[did_fire] = 0
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
step(0)
times = []
for i in range(1, steps + 1):
    t0 = time.perf_counter(); step(i); times.append(time.perf_counter() - t0)
print(json.dumps({"times": times}))
"""


def _trainer(d_in: int, n_lat: int, k: int, batch: int, fast: bool) -> Trainer:
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, dict_size=n_lat, k=k), fast=fast)
    cfg = TrainerConfig(batch_size=batch, total_tokens=batch * 10_000, warmup_steps=10, b_dec_init="zeros",
                        log_every=10_000)
    return Trainer(sae, cfg)


def _time_ours(trainer: Trainer, data_ND: torch.Tensor, batch: int, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        i = trainer.step
        x = data_ND[(i * batch) % len(data_ND):][:batch]
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


def _time_saelens(python: str, data_file: Path, size: tuple, steps: int) -> list[float] | None:
    if not Path(python).exists():
        return None
    res = subprocess.run([python, "-c", SAELENS_SCRIPT, str(data_file), *map(str, size), str(steps),
                          str(torch.get_num_threads())],
                         capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        print(f"  SAELens step failed: {res.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])["times"]


def bench_size(name: str, size: tuple, rounds: int, steps: int, saelens_python: str, tmp: Path) -> dict:
    """Median seconds per step of each implementation at one size."""
    d_in, n_lat, k, batch = size
    g = torch.Generator().manual_seed(0)
    # Anisotropic, non-centred data with E||x|| ~ sqrt(d_in), like normalised residuals.
    data_ND = (torch.randn(batch * 4, d_in, generator=g) * torch.rand(d_in, generator=g) * 1.7 + 0.3)
    data_file = tmp / f"{name}.safetensors"
    save_file({"x": data_ND.contiguous()}, str(data_file))
    fast, dense = _trainer(*size, fast=True), _trainer(*size, fast=False)
    W_enc_DF = fast.sae.W_enc.detach()
    _time_ours(fast, data_ND, batch, 1)  # warm-up (first Adam step allocates state)
    _time_ours(dense, data_ND, batch, 1)
    times: dict[str, list[float]] = {"fast": [], "dense": [], "saelens": [], "floor": []}
    for r in range(rounds):
        times["fast"] += _time_ours(fast, data_ND, batch, steps)
        times["dense"] += _time_ours(dense, data_ND, batch, steps)
        sl = _time_saelens(saelens_python, data_file, size, steps)
        if sl is not None:
            times["saelens"] += sl
        times["floor"] += _time_floor(data_ND, W_enc_DF, batch, steps)
        print(f"  {name} round {r + 1}/{rounds}: " + ", ".join(
            f"{key} {statistics.median(v[-steps:]):.3f}s" for key, v in times.items() if v), flush=True)
    med = {key: statistics.median(v) for key, v in times.items() if v}
    print(f"{name} d_in={d_in} dict={n_lat} k={k} batch={batch}: " + ", ".join(
        f"{key} {batch / s:,.0f} tok/s ({s:.3f} s/step)" for key, s in med.items()), flush=True)
    print(f"{name}: fast/dense={med['dense'] / med['fast']:.2f}x"
          + (f", fast/SAELens={med['saelens'] / med['fast']:.2f}x" if "saelens" in med else ", SAELens not run")
          + f", fast step = {med['fast'] / med['floor']:.2f}x the one-encoder-matmul floor", flush=True)
    return med


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per implementation per round (default 2)")
    p.add_argument("--quick", action="store_true", help="small size only (the headline then uses it)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for every implementation (default: torch's)")
    p.add_argument("--saelens-python", default=os.environ.get("SAELENS_PYTHON", "/tmp/saelens-venv/bin/python"))
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}",
          flush=True)
    if not Path(args.saelens_python).exists():
        print(f"note: {args.saelens_python} missing: SAELens comparison skipped", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in (["small"] if args.quick else ["small", "large"]):
            results[name] = bench_size(name, SIZES[name], args.rounds, args.steps, args.saelens_python, Path(tmp))
    head = results["small" if args.quick else "large"]
    print(f"load average after: {os.getloadavg()[0]:.2f}", flush=True)
    if "saelens" in head:
        print(f"vs SAELens: ratio={head['saelens'] / head['fast']:.2f} (target >= 1.0)")
    print(f"train_step: ratio={head['dense'] / head['fast']:.2f} (target >= 2.0 vs dense)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
