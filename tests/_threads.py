"""A fixture for tests of many tiny tensor operations: one intra-op thread is as fast, and it
keeps them fast on a shared, busy machine (where 2-thread parallel regions wait on descheduled
workers). Import it into a test module or conftest to apply it to every test there."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
