"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch


@contextmanager
def _single_torch_thread() -> Iterator[None]:
    """Tiny matmuls on a shared CPU are faster (and steadier) on one intra-op thread; restore the count after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for a single test."""
    with _single_torch_thread():
        yield


@pytest.fixture(scope="module")
def one_thread_module() -> Iterator[None]:
    """One torch thread for a whole module, so module-scoped fixtures (models built once) use it too."""
    with _single_torch_thread():
        yield
