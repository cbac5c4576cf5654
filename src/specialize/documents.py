"""The documents of a pre-training corpus, streamed: read from the files on every pass, never
held (`specialize.shards` tokenises them into token files as they come).

One document per plain text file, one per row with a `text` field (JSONL, JSON, CSV, Parquet, a
Hugging Face dataset), in source order. Files are read one at a time; JSONL a line at a time.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

from specialize.data.io import Record, data_files, jsonl_record, read_file, read_source
from specialize.errors import UserError


def _jsonl_records(path: Path) -> Iterator[Record]:
    """The rows of a UTF-8 JSONL file, one line at a time (data.io reads the whole file first).

    Lines split at "\n" only and errors read as data.io's; UTF-16, binary and empty files go to
    data.io's reader, which decodes them or names the problem.
    """
    with open(path, "rb") as f:
        head = f.read(8192)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in head or not head.strip():
        yield from read_file(path)
        return
    rows = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").removesuffix("\n").removesuffix("\r")
            except UnicodeDecodeError as e:
                raise UserError(f"not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8",
                                path=path, line=number) from None
            record = jsonl_record(line, path, number)
            if record is not None:
                rows += 1
                yield record
    if not rows:
        raise UserError("file holds no rows", path=path)


def _records(source: str) -> Iterator[Record]:
    """Every record of a source, one file at a time (a Hugging Face dataset comes whole)."""
    path = Path(source)
    if not path.exists():
        for records in read_source(source).values():  # a dataset name, or data.io's "no such file"
            yield from records
        return
    for file in data_files(path):
        if file.suffix.lower() == ".jsonl":
            yield from _jsonl_records(file)
            continue
        records = read_file(file)
        if not records:
            raise UserError("file holds no rows", path=file)
        yield from records


class Documents:
    """The documents of `sources`, read afresh on every pass; a full pass leaves their `count`.

    One per text file, one per row with a `text` field, in source order. Whitespace-only
    documents are skipped (they would only add an EOS). Any other row shape is a `UserError`
    naming the file, line and field, since pre-training has no use for Q&A pairs.
    """

    def __init__(self, sources: list[str]):
        if not sources:
            raise UserError("no data given (use --data FILE_OR_FOLDER: text files, folders of text, or JSONL with "
                            "'text')")
        self.sources = [str(s) for s in sources]
        self.count: int | None = None
        self.chars = 0

    def __iter__(self) -> Iterator[str]:
        count, chars = 0, 0
        for record in itertools.chain.from_iterable(map(_records, self.sources)):
            if "text" not in record.data:
                keys = ", ".join(sorted(record.data)) or "none"
                raise UserError(f"missing (found keys: {keys}); pre-training reads plain text files or rows "
                                "with a 'text' field", path=record.path, line=record.line, field="text")
            text = record.data["text"]
            if not isinstance(text, str):
                raise UserError(f"expected a string, got {type(text).__name__}", path=record.path, line=record.line,
                                field="text")
            if text.strip():
                count, chars = count + 1, chars + len(text)
                yield text
        if not count:
            raise UserError(f"no text to pre-train on in {', '.join(self.sources)} (every document is empty)")
        self.count, self.chars = count, chars

    def counted(self) -> int:
        if self.count is None:
            for _ in self:  # a pass that only reads: the held-out split needs the total first
                pass
        return self.count

    def key(self) -> list:
        """What the sources are now: every local file's path, size and mtime; a dataset's name."""
        files = []
        for source in self.sources:
            if not Path(source).exists():
                files.append(source)
                continue
            for path in data_files(source):
                stat = path.stat()
                files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
        return files
