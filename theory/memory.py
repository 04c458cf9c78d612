"""Memory accounting that really measures: peak resident memory on CPU, peak allocated memory on CUDA.

PyTorch's CPU allocations are invisible to ``tracemalloc``; large tensors are ``mmap``-ed by the C allocator and
returned to the kernel when freed, so the process's resident set size (RSS) tracks them. Linux keeps the peak
RSS in ``/proc/self/status`` (``VmHWM``) and resets it to the current RSS when ``5`` is written to
``/proc/self/clear_refs``. :class:`PeakMemory` uses that to measure the peak *growth* of memory during a block of
code; on CUDA it uses ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["PeakMemory", "available_memory", "format_bytes", "rss_bytes", "saved_activation_bytes",
           "SavedTensorBytes"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def format_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``: binary units, three significant digits."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"  # pragma: no cover


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS, encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """Current resident set size of this process (``None`` where ``/proc`` is unavailable)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _reset_peak_rss() -> bool:
    try:
        with open(_CLEAR_REFS, "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class SavedTensorBytes:
    """Context manager counting the bytes of the tensors autograd saves for backward inside it: the activation
    memory a training step holds at its peak. Storages in ``exclude`` (the parameters) and storages seen before
    are not counted. ``nbytes`` holds the count; nothing is kept after the block.
    """

    def __init__(self, exclude=()):
        self._resident = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: set[int] = set()
        self.nbytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
            return t
        if ptr not in self._seen and ptr not in self._resident:
            self._seen.add(ptr)
            self.nbytes += storage.nbytes()
        return t

    def __enter__(self) -> "SavedTensorBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def saved_activation_bytes(module: torch.nn.Module, *args) -> int:
    """Bytes autograd saves for the backward pass of ``module(*args)`` (parameters excluded, each storage
    once): see :class:`SavedTensorBytes`."""
    with torch.enable_grad(), SavedTensorBytes(exclude=module.parameters()) as saved:
        module(*args)
    return saved.nbytes


def available_memory(device: str | torch.device = "cpu") -> int:
    """Bytes that can still be allocated: ``MemAvailable`` of ``/proc/meminfo`` on CPU (or total RAM from
    ``sysconf`` where that is missing), free device memory on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


class PeakMemory:
    """Context manager measuring the peak memory growth of the code inside it.

    Attributes after exit:
        peak_bytes: peak memory minus memory at entry (``None`` when it could not be measured).
        method: ``"cuda"`` (``max_memory_allocated``), ``"VmHWM"`` (peak RSS via ``/proc``) or ``"unavailable"``.

    Example:
        >>> with PeakMemory("cpu") as pm:
        ...     x = torch.ones(10_000_000)  # 40 MB
        >>> pm.peak_bytes >= 40e6
        True
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self.method = "unavailable"
        self._start = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.method = "cuda"
        elif _reset_peak_rss() and rss_bytes() is not None:
            self._start = rss_bytes() or 0
            self.method = "VmHWM"
        return self

    def __exit__(self, *exc) -> None:
        if self.method == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        elif self.method == "VmHWM":
            hwm = _status_kib("VmHWM")
            self.peak_bytes = None if hwm is None else hwm * 1024 - self._start
