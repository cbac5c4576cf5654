"""The user cache: where built data sets and pre-trained bases live, and how they get there.

A cached folder is built in a temporary sibling and renamed into place only once complete, so
a reader (or an interrupted run) never sees a half-built folder that looks finished. Callers say
what "complete" means for their folder (a manifest with the right inputs and a content hash, a
marker file written last).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def default_cache_dir() -> Path:
    """$SPECIALIZE_CACHE, else $XDG_CACHE_HOME/specialize, else ~/.cache/specialize."""
    if os.environ.get("SPECIALIZE_CACHE"):
        return Path(os.environ["SPECIALIZE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "specialize"
    return Path.home() / ".cache" / "specialize"


def build_into_place(final: Path, build: Callable[[Path], None], is_complete: Callable[[Path], bool]) -> None:
    """Run `build(tmp)` in a new temporary sibling of `final`, then swap it in by renaming.

    An old `final` (stale, or being rebuilt) is moved aside first and deleted. When another
    process renamed its own complete build into place in the meantime, that one is kept. The
    temporary folder is removed whatever happens, so a failed build leaves nothing behind.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        if final.exists():
            stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.stale.", dir=final.parent))
            os.replace(final, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same build first
            if not is_complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
