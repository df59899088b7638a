"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from disel.utils.threads import torch_threads


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for a single test."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module() -> Iterator[None]:
    """One torch thread for a whole module, so module-scoped fixtures (models built once) use it too."""
    with torch_threads(1):
        yield


@pytest.fixture
def count_fused(monkeypatch):
    """Counts calls of the fused kernel, so a test can tell which path actually ran."""
    calls = {"n": 0}
    from disel.methods.gated_lora import kernels

    real = kernels.fused_gated_update

    def spy(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "fused_gated_update", spy)
    return calls
