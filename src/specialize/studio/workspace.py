"""The studio's workspace folder: every path the browser names is resolved here, and only inside it.

A path from the browser is a relative path, written with `/`, that stays inside the workspace:
no absolute path (`/etc/passwd`, `C:\\x`, `\\\\server\\share`), no `..` part, no NUL, and once
symlinks are followed it still lies inside the workspace (a link pointing out is refused like
`..`). Every file the studio reads or writes, and every path it passes to a child process
(`--data`, `--base`, `--out`, ...), goes through `Workspace.resolve` first.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath

from specialize.errors import UserError

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".md", ".html", ".htm", ".rst")
HIDDEN = ".studio"  # the studio's own folder in the workspace: job logs
LISTED_FILES = 2000  # a workspace holding a whole disk still lists quickly
LISTED_DEPTH = 6  # folders below the workspace searched for data files
SKIPPED_DIRS = {"__pycache__", "node_modules", "site-packages"}


def _holds_a_model(folder: Path) -> bool:
    """A run or a model folder: its JSON files are configs and tokenizers, not data."""
    from specialize.rundir import RunDir

    return RunDir.is_run(folder) or (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()


class OutsideWorkspace(UserError):
    """A path that is absolute, climbs out with `..`, or leads out through a symlink."""


class Workspace:
    """The folder the studio serves; `resolve` is the one gate between browser paths and the disk."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise UserError("the workspace is not a folder", path=root)

    def resolve(self, name: str, *, must_exist: bool = False) -> Path:
        """The absolute path of workspace-relative `name`, refused unless it stays inside.

        Raises:
            OutsideWorkspace: absolute, `..`, NUL or a symlink out of the workspace.
            UserError: `must_exist` and there is nothing at that path.
        """
        if not isinstance(name, str) or not name.strip() or "\0" in name:
            raise OutsideWorkspace(f"not a path inside the workspace: {name!r}")
        posix = name.replace("\\", "/")
        # "C:x" and "C:/x" are drive paths on Windows; "//server" is a UNC share.
        if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix) or os.path.isabs(name):
            raise OutsideWorkspace(f"absolute paths are not allowed, give a path inside the workspace: {name}")
        parts = PurePosixPath(posix).parts
        if ".." in parts:
            raise OutsideWorkspace(f"'..' is not allowed in a path: {name}")
        # resolve() follows every symlink on the way, so a link out of the workspace lands outside.
        path = (self.root / Path(*parts)).resolve()
        if path != self.root and self.root not in path.parents:
            raise OutsideWorkspace(f"{name} leads out of the workspace (a symlink)")
        if must_exist and not path.exists():
            raise UserError(f"not found in the workspace: {name}")
        return path

    def relative(self, path: Path) -> str:
        """The workspace-relative name of an absolute path inside it ("." for the root)."""
        return path.resolve().relative_to(self.root).as_posix() or "."

    def files(self, suffixes: tuple[str, ...] = DATA_SUFFIXES) -> list[dict]:
        """Data files in the workspace (hidden folders and the insides of runs skipped), newest first."""
        found: list[dict] = []
        for folder, dirs, names in os.walk(self.root):
            here = Path(folder)
            deep = len(here.relative_to(self.root).parts) >= LISTED_DEPTH
            dirs[:] = [] if deep else sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS
                                             and not (here / d).is_symlink() and not _holds_a_model(here / d))
            for name in sorted(names):
                path = here / name
                if name.startswith(".") or path.suffix.lower() not in suffixes or path.is_symlink():
                    continue
                stat = path.stat()
                found.append({"path": self.relative(path), "bytes": stat.st_size, "modified": stat.st_mtime})
                if len(found) >= LISTED_FILES:
                    return found
        return sorted(found, key=lambda f: -f["modified"])

    async def save_upload(self, name: str, chunks: AsyncIterator[bytes], limit: int) -> Path:
        """Write an uploaded body to `name` (atomically: a temp file, then a rename), at most `limit` bytes.

        Raises:
            UploadTooLarge: the body went past `limit`; nothing is left on disk.
        """
        path = self.resolve(name)
        if path.suffix.lower() not in DATA_SUFFIXES:
            raise UserError(f"uploads are data files ({', '.join(DATA_SUFFIXES)}): {name}")
        if path.is_dir():
            raise UserError(f"{name} is a folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.upload")
        size = 0
        try:
            with open(tmp, "wb") as out:  # noqa: ASYNC230 (local disk writes of 64 KiB chunks)
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise UploadTooLarge(limit)
                    out.write(chunk)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


class UploadTooLarge(UserError):
    def __init__(self, limit: int):
        super().__init__(f"upload larger than the limit of {limit:,} bytes (studio --max-upload-bytes)")
