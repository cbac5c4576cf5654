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
