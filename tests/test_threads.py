"""Thread-count policy: OMP_NUM_THREADS (Ray's per-trial setting) wins, else the cores the load leaves free."""

import pytest
import torch

from fcsae import threads
from fcsae.errors import FcsaeInputError


@pytest.mark.parametrize("n_cores,load,expect", [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 12.0, 1), (16, 1.0, 15),
                                                 (16, 3.7, 12), (1, 0.0, 1)])
def test_auto_threads_takes_the_free_cores(monkeypatch, n_cores, load, expect):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "cores", lambda: n_cores)
    assert threads.auto_threads(load) == expect


def test_omp_num_threads_wins_as_ray_sets_it_per_trial(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(threads, "cores", lambda: 16)
    assert threads.auto_threads(0.0) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "zero")
    with pytest.raises(FcsaeInputError, match="OMP_NUM_THREADS"):
        threads.auto_threads(0.0)


def test_set_threads_sets_torch_and_refuses_bad_values(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert threads.set_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert threads.set_threads(0) == 2 and torch.get_num_threads() == 2
        for bad in (-1, 1.5, True):
            with pytest.raises(FcsaeInputError, match="threads"):
                threads.set_threads(bad)
    finally:
        torch.set_num_threads(before)


def test_importing_fcsae_first_makes_openmp_threads_sleep_at_barriers():
    """A fresh interpreter: ``import fcsae`` sets OMP_WAIT_POLICY=PASSIVE; an explicit setting is kept."""
    import os
    import subprocess
    import sys

    code = "import fcsae, os; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "ACTIVE"
