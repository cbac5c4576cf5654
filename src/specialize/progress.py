"""The one progress-bar factory: every long stage shows the same bar, on stderr.

stdout stays clean for machine-readable output (`eval --json`, `generate`'s answers).
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_stderr = Console(stderr=True, markup=False)


def progress_bar(enabled: bool = True, *, transient: bool = False, info: bool = False) -> Progress:
    """A rich Progress on stderr: description, bar, done/total, elapsed and remaining time.

    Args:
        enabled: False gives a bar that prints nothing (``--no-progress``, non-main processes).
        transient: remove the bar when it finishes (for sub-steps of a longer command).
        info: add a free-text column fed by ``bar.update(task, info=...)`` (loss, tokens/s);
            tasks of such a bar must be created with ``add_task(..., info="")``.
    """
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(*columns, console=_stderr, disable=not enabled, transient=transient)
