"""One home for thread-pool control: torch's intra-op threads and the BLAS / OpenMP pools behind numpy.

Small matrix products in a loop (forward-backward's (B, m) x (m, m) per time step, tiny models in tests) gain
nothing from a second thread and, on a shared machine where another process holds a core, a spinning BLAS worker
makes them many times slower. :func:`limit_threads` fixes both pools for a block of code and restores them.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Callable, Iterator, TypeVar

__all__ = ["limit_threads", "single_threaded", "threads_if"]

T = TypeVar("T")


@contextlib.contextmanager
def limit_threads(n: int = 1, *, torch_threads: bool = True, blas: bool = True) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (if torch is imported) and ``n`` BLAS/OpenMP threads
    (threadpoolctl); restore the previous settings afterwards."""
    if n < 1:
        raise ValueError(f"limit_threads: n must be >= 1, got {n}")
    torch = sys.modules.get("torch") if torch_threads else None
    before = torch.get_num_threads() if torch is not None else None
    stack = contextlib.ExitStack()
    try:
        if blas:
            from threadpoolctl import threadpool_limits

            stack.enter_context(threadpool_limits(limits=n))
        if torch is not None:
            torch.set_num_threads(n)
        yield
    finally:
        if torch is not None and before is not None:
            torch.set_num_threads(before)
        stack.close()


def threads_if(n: int) -> contextlib.AbstractContextManager:
    """:func:`limit_threads` (n) when ``n >= 1``; with 0, the threads as they are (a config's ``threads`` field:
    float32 reductions depend on the thread count, so a unit fixed to n threads is the same in every process)."""
    return limit_threads(n) if n >= 1 else contextlib.nullcontext()


def single_threaded(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` run under :func:`limit_threads` (1): for verifier claims, whose tensors are small, where extra threads
    only add synchronisation (and stall badly on a shared, oversubscribed CPU)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with limit_threads(1):
            return fn(*args, **kwargs)

    return wrapped
