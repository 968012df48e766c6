"""The tensor tests use tiny tensors: one intra-op thread is as fast, and it keeps them fast on
a shared, busy machine (where 2-thread parallel regions wait on descheduled workers)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
