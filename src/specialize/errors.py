"""The one exception type for mistakes a user can fix (bad data, bad flags, missing files).

The CLI catches it once and prints `error: <message>` as a single line with exit code 2.
Anything else is a bug in specialize and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A problem with the user's input, explained in one line."""

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None,
                 field: str | None = None):
        where = ""
        if path is not None:
            where = str(path)
            if line is not None:
                where += f":{line}"
            where += ": "
        if field is not None:
            message = f"field '{field}': {message}"
        super().__init__(where + message)
        self.path = path
        self.line = line
        self.field = field


class Stopped(Exception):
    """Training stopped on a signal (SIGTERM from a scheduler, Ctrl-C) after writing a checkpoint.

    The CLI prints the message and exits with 128 + the signal number (143 for SIGTERM, 130 for
    SIGINT), as a process killed by that signal would, so schedulers read it as a preemption.
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
