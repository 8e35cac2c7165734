import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny tensors gain nothing from a second thread on a shared 2-core
    machine, and subprocess tests run with ``OMP_NUM_THREADS=1`` (bit-exact comparisons need the same)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def shared_data():
    """``../shared/data`` beside the project, or skip with a message when it is absent."""
    if not (SHARED_DATA / "README.md").exists():
        pytest.skip(f"real MRI data folder {SHARED_DATA} is absent")
    return SHARED_DATA


def crandn(*shape, dtype=torch.complex128, generator=None):
    """Complex standard normal tensor."""
    return torch.randn(*shape, dtype=dtype, generator=generator)


def cnp(rng, *shape):
    return rng.standard_normal(shape) + 1j * rng.standard_normal(shape)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
