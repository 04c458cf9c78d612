"""Progress bars that behave in a terminal and in a log.

Every long loop of ftsim goes through :func:`bar`. In a terminal it is a tqdm bar; when stderr is not a
terminal (CI, ``make quick > log``) it writes a plain line when it starts, at most every ``log_every`` seconds,
and when it closes -- no cursor-control codes; :func:`configure` (``--no-progress``) turns bars off entirely.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator

__all__ = ["configure", "bar", "enabled", "say"]

_STATE: dict[str, Any] = {"enabled": None, "log_every": 30.0}


def configure(enabled: bool | None = None, log_every: float | None = None) -> None:
    """``enabled``: True / False forces bars on / off; None (default) shows them unless ``FTSIM_PROGRESS=0``."""
    _STATE["enabled"] = enabled
    if log_every is not None:
        _STATE["log_every"] = float(log_every)


def enabled() -> bool:
    if _STATE["enabled"] is not None:
        return bool(_STATE["enabled"])
    return os.environ.get("FTSIM_PROGRESS", "1").lower() not in ("0", "false", "no", "off")


def say(text: str) -> None:
    """One status line on stderr (when progress output is enabled)."""
    if enabled():
        print(text, file=sys.stderr, flush=True)


class _Plain:
    """The tqdm subset ftsim uses, as plain log lines."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, unit: str, log_every: float):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            self.total = len(iterable)  # type: ignore[arg-type]
        self.n, self.log_every, self.postfix = 0, log_every, ""
        self.t0 = self.last = time.monotonic()
        self.closed = False
        self._line("started")

    def _line(self, what: str) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        post = f" {self.postfix}" if self.postfix else ""
        print(f"[{self.desc}] {self.n}{of} {self.unit} {what} ({time.monotonic() - self.t0:.0f} s){post}",
              file=sys.stderr, flush=True)

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.monotonic()
        if now - self.last >= self.log_every:
            self.last = now
            self._line("done")

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        parts = [str(a) for a in args] + [f"{k}={v}" for k, v in kwargs.items()]
        self.postfix = ", ".join(parts)

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def write(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line("finished")

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> "_Plain":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Off(_Plain):
    def __init__(self, iterable, total, *a, **k):
        self.iterable, self.total, self.n, self.closed = iterable, total, 0, False

    def _line(self, what: str) -> None:
        pass

    def update(self, k: int = 1) -> None:
        self.n += k

    def write(self, text: str) -> None:
        pass


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
        disable: bool = False, leave: bool = False, **tqdm_kwargs: Any):
    """A progress bar over ``iterable`` (or a manual one with ``total``): tqdm in a terminal, plain lines in a
    log, nothing when disabled (``disable=True`` here, ``--no-progress`` or ``FTSIM_PROGRESS=0``)."""
    if disable or not enabled():
        return _Off(iterable, total)
    if not sys.stderr.isatty():
        return _Plain(iterable, total, desc, unit, _STATE["log_every"])
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, **tqdm_kwargs)
