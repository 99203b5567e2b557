"""Suite-wide test settings."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny tensors everywhere: one intra-op thread. On the 2-core CI machine OpenMP spin-waiting made small ops
    up to ~100x slower under load; one thread also keeps timings irrelevant to what the tests assert."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
