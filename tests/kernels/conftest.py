"""Quantization tests run many small tensor ops: on a shared, oversubscribed CPU, torch's intra-op
threads wait on each other far longer than the ops take (measured 20x slower), so run them on one."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
