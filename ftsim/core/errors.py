"""Errors that a person can act on.

:class:`InputError` is raised for bad input anywhere in ftsim (a config field, a flag, a file, a line of a data
file). It names the culprit: ``field`` (a config field or command-line option, written as the Python name, e.g.
``num_sequences``), ``path`` (a file) and ``line`` (1-based), and the message says what is wrong with it. The
command line prints it as one line -- ``--num-sequences: must be >= 1, got 0`` -- and exits with status 2,
without a traceback. It subclasses ``ValueError`` so library callers can catch it as one.
"""

from __future__ import annotations

import os

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad input, naming the field, file or line at fault (see the module docstring)."""

    def __init__(self, message: str, *, field: str | None = None, path: str | os.PathLike | None = None,
                 line: int | None = None):
        self.message, self.field, self.line = message, field, line
        self.path = None if path is None else str(path)
        super().__init__(self.describe())

    def describe(self, flag_style: bool = False) -> str:
        """The one-line message; with ``flag_style`` the field is written as a command-line flag."""
        where = []
        if self.path is not None:
            where.append(self.path + (f":{self.line}" if self.line is not None else ""))
        elif self.line is not None:
            where.append(f"line {self.line}")
        if self.field is not None:
            where.append("--" + self.field.replace("_", "-") if flag_style else self.field)
        return (": ".join(where) + ": " if where else "") + self.message
