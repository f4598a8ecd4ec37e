"""Shared fixtures."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread avoids OpenMP oversubscription on a shared 2-core machine (10-50x faster).

    Modules of small-tensor tests opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``;
    real-model tests keep all threads.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
