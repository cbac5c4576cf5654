"""The user cache: where built data sets and pre-trained bases live, and how they get there.

A cached folder is built in a temporary sibling and renamed into place only once complete, so
a reader (or an interrupted run) never sees a half-built folder that looks finished. Callers say
what "complete" means for their folder (a manifest with the right inputs and a content hash, a
marker file written last).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from specialize.files import write_dir_atomic


def default_cache_dir() -> Path:
    """$SPECIALIZE_CACHE, else $XDG_CACHE_HOME/specialize, else ~/.cache/specialize."""
    if os.environ.get("SPECIALIZE_CACHE"):
        return Path(os.environ["SPECIALIZE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "specialize"
    return Path.home() / ".cache" / "specialize"


def build_into_place(final: Path, build: Callable[[Path], None], is_complete: Callable[[Path], bool]) -> None:
    """Run `build(tmp)` in a temporary sibling of `final`, then swap it in (`files.write_dir_atomic`);
    a complete build another process renamed into place in the meantime is kept."""
    write_dir_atomic(final, build, is_complete)
