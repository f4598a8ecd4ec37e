"""Other libraries' TopK training steps, timed in their own throwaway virtualenvs (for ``train_step.py``).

sparsify and SAELens need transformer-lens < 4, so they can never share
fcsae's environment. Each anchor lives in ``$FCSAE_VENVS/<name>`` (default
``/tmp/venvs``), found there or built on first use with ``python3 -m venv`` and
pip (torch pinned to the version fcsae runs, the library pinned to the version
the numbers were taken with). A venv that cannot be built is reported with the
reason and its anchor skipped; nothing is skipped silently.

Each anchor runs as one long-lived worker process (``WORKER``) that builds its
SAE on the saved batches, then answers ``<steps>`` lines on stdin with the
per-step seconds as a JSON line, so the caller can interleave rounds with
its own timings without paying the import again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

VENVS = {  # venv name: pip requirements (besides torch)
    "sparsify": ("eai-sparsify==1.3.3",),
    "saelens": ("sae-lens==6.54.12",),
}
ANCHORS = {  # anchor: (venv, worker mode, what it is)
    "sparsify": ("sparsify", "sparsify", "eai-sparsify 1.3.3 SparseCoder, its Trainer's step with optimizer=adam"),
    "saelens": ("saelens", "saelens", "SAELens 6.54.12 TopKTrainingSAE + SAETrainer._train_step (default)"),
    "saelens_sparse": ("saelens", "saelens_sparse",
                       "SAELens 6.54.12 as above, use_sparse_activations=True (decoder-norm rescaling off)"),
}

# Runs inside an anchor's venv. argv: mode data.safetensors d_in d_sae k batch threads dead_frac
WORKER = r"""
import json, sys, time, torch
from safetensors.torch import load_file
mode, data_file = sys.argv[1], sys.argv[2]
d_in, d_sae, k, batch, threads = (int(a) for a in sys.argv[3:8])
dead_frac = float(sys.argv[8])
torch.set_num_threads(threads)
torch.manual_seed(0)
data = load_file(data_file)["x"]
n_dead = int(dead_frac * d_sae)
dead = torch.zeros(d_sae, dtype=torch.bool)
dead[:n_dead] = True

if mode == "sparsify":
    import os
    os.environ["SPARSIFY_DISABLE_TRITON"] = "1"
    from sparsify import SparseCoder, SparseCoderConfig
    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k))
    # sparsify's Trainer with optimizer="adam" and no bitsandbytes: torch.optim.Adam, its lr rule
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (d_sae / 2 ** 14) ** 0.5)
    since_fired = torch.zeros(d_sae, dtype=torch.long)
    def step(i):
        x = data[(i * batch) % len(data):][:batch]
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=dead if n_dead else None)
        did_fire = torch.zeros(d_sae, dtype=torch.bool)
        did_fire[out.latent_indices.flatten()] = True
        loss = out.fvu + (1 / 32) * out.auxk_loss
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            since_fired.add_(batch)
            since_fired[did_fire] = 0
else:
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    extra = dict(use_sparse_activations=True, rescale_acts_by_decoder_norm=False) if mode == "saelens_sparse" else {}
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, dtype="float32", device="cpu", **extra))
    opt = torch.optim.Adam(sae.parameters(), lr=4e-4, betas=(0.9, 0.999))
    since_fired = torch.zeros(d_sae)
    act_freq = torch.zeros(d_sae)
    def step(i):  # SAETrainer._train_step: forward, firing counters, backward, clip, Adam
        x = data[(i * batch) % len(data):][:batch]
        sae.train()
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                       n_training_steps=i, is_logging_step=False))
        with torch.no_grad():
            firing = out.feature_acts.bool().float()
            did_fire = firing.sum(-2).bool()
            if did_fire.is_sparse:
                did_fire = did_fire.to_dense()
            since_fired.add_(1)
            since_fired[did_fire] = 0
            s = firing.sum(0)
            act_freq.add_(s.to_dense() if s.is_sparse else s)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

i = 0
step(i)  # warm-up: Adam state, allocator
print("@@" + json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    times = []
    for _ in range(int(line)):
        i += 1
        t0 = time.perf_counter(); step(i); times.append(time.perf_counter() - t0)
    print("@@" + json.dumps({"times": times}), flush=True)
"""


def venv_root() -> Path:
    """Where the anchors' virtualenvs live (``$FCSAE_VENVS``, default ``/tmp/venvs``)."""
    return Path(os.environ.get("FCSAE_VENVS", "/tmp/venvs"))


def find_or_build(name: str, build: bool = True) -> tuple[str | None, str]:
    """Path of the venv's python (built on a miss when ``build``), or None and the reason it is not there."""
    root = venv_root() / name
    py = root / "bin" / "python"
    if py.exists():
        return str(py), f"found {root}"
    if not build:
        return None, f"{root} missing and --no-build given"
    tmp = root.with_name(root.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    print(f"building {root} ({torch_pin} {' '.join(VENVS[name])}); this takes minutes", flush=True)
    steps = [[shutil.which("python3") or sys.executable, "-m", "venv", str(tmp)],
             [str(tmp / "bin" / "pip"), "install", "-q", torch_pin],
             [str(tmp / "bin" / "pip"), "install", "-q", torch_pin, *VENVS[name]]]
    for cmd in steps:
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
            shutil.rmtree(tmp, ignore_errors=True)
            return None, f"building {root} failed at `{' '.join(cmd[:3])} ...`: {tail}"
    os.replace(tmp, root)
    return str(py), f"built {root}"


class Worker:
    """One anchor's long-lived worker process (see the module docstring)."""

    def __init__(self, python: str, mode: str, data_file: Path, size: tuple, threads: int, dead_frac: float):
        d_in, n_lat, k, batch = size
        # stderr to a file: a chatty library must not fill a pipe nobody reads while it runs.
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([python, "-c", WORKER, mode, str(data_file), str(d_in), str(n_lat), str(k),
                                      str(batch), str(threads), str(dead_frac)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.error = None
        self._read()

    def _read(self) -> dict | None:
        for line in self.proc.stdout:  # protocol lines start with @@; the libraries print other things
            if line.startswith("@@"):
                return json.loads(line[2:])
        code = self.proc.wait()
        self.stderr.seek(0)
        err = self.stderr.read().strip().splitlines()
        self.error = err[-1] if err else f"worker exited with code {code}"
        return None

    def time_steps(self, n: int) -> list[float] | None:
        """Seconds of each of ``n`` further steps, or None once the worker has failed (``self.error`` says why)."""
        if self.error:
            return None
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        out = self._read()
        return None if out is None else out["times"]

    def close(self) -> None:
        """End the worker (closing stdin ends its loop)."""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
