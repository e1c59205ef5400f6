"""Fixtures shared by the phaseformer tests (imported into each test module)."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tests use tiny tensors: one intra-op thread is as fast, and avoids OpenMP threads
    waiting on each other (seconds per test) when the machine is shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
