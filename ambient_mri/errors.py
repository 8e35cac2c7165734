"""The project's own error type: one line that names the file and what is wrong with it."""

from __future__ import annotations

import os


class AmbientMRIError(Exception):
    """Any error the user can act on (bad input, bad option, unwritable output).

    ``str(err)`` is a single line, ``"<path>: <problem>"`` when a path is known.
    """

    def __init__(self, problem: str, path: str | os.PathLike | None = None):
        self.problem = " ".join(str(problem).split())
        self.path = None if path is None else os.fspath(path)
        super().__init__(self.problem if self.path is None else f"{self.path}: {self.problem}")


class DataError(AmbientMRIError):
    """An input file is unreadable or inconsistent (missing key, wrong shape, NaN/Inf, empty mask...)."""


class ConfigError(AmbientMRIError):
    """A configuration key or command-line value is unknown, mistyped or impossible."""
