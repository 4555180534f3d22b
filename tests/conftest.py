"""Shared test setup. Without CUDA, Triton kernels run on CPU tensors through its interpreter, which must be switched
on before anything imports triton: that happens here, before any test module is collected."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The tests use tiny tensors: on the 2-core CI machine one intra-op thread is several times faster than two.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where Triton kernels run: CUDA when available, else the CPU through TRITON_INTERPRET=1."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def seed() -> int:
    """A fresh random seed for every test (printed in failure messages), set as torch's global seed."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    return value


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors, where a second thread only adds synchronisation (up to 40x
    slower on shared, oversubscribed cores, measured); the setting is restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
