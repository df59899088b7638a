"""Run a block with a given number of torch intra-op threads, and restore the previous count after."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int | None = 1) -> Iterator[None]:
    """Tiny matmuls are fastest on one thread (several spin against each other on a busy machine), and one
    thread fixes the summation order, so results are bit-identical run to run. ``None`` leaves it as it is."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
