"""Fixtures shared by test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small-input tests.

    On 64 px inputs a second thread saves nothing, and on a busy 2-core machine its spin-waiting
    made the same forward passes up to 10x slower. Opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
