"""Readers: JSONL, JSON, CSV, Parquet, plain text (files or folders) and Hugging Face datasets.

Every reader yields `Record`s that remember where they came from (file and line), so that a
bad row can be reported as `file:line: field 'answer': ...` instead of a traceback.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from specialize.errors import UserError

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".text"}
DATA_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet"} | TEXT_SUFFIXES
CSV_FIELD_LIMIT = 2**31 - 1  # the most the csv module takes (a C long on every platform)


@dataclass(frozen=True)
class Record:
    """One raw row and where it came from (`line` is 1-based; for JSON arrays, the item index + 1)."""

    data: dict[str, Any]
    path: str
    line: int | None = None


def read_text(path: Path, data: bytes | None = None, display: str | None = None, allow_empty: bool = False) -> str:
    """A file's text: UTF-8 (a BOM is fine) or UTF-16 with a BOM, else one clear error naming it.

    Empty (unless `allow_empty`), binary and undecodable files are refused; an HTML page whose
    `<meta>` tag declares another charset is decoded with it. `data` is the file's bytes when
    they come from elsewhere (a zip member), `display` the name to report.
    """
    where = display or path
    if data is None:
        data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        data = data.decode("utf-16").encode("utf-8")
    if not data.strip():
        if allow_empty:
            return ""
        raise UserError("file is empty", path=where)
    if b"\x00" in data[:8192]:
        raise UserError("binary file, not text (save it as UTF-8 text, or leave it out)", path=where)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        declared = re.search(rb"<meta[^>]+charset=[\"']?([\w-]+)", data[:4096], re.I)
        if declared:
            try:
                return data.decode(declared.group(1).decode("ascii"))
            except (LookupError, UnicodeDecodeError):
                pass
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8",
                        path=where, line=line) from None


def jsonl_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of JSON Lines text, split at "\n" only (a "\r" before it is dropped).

    JSON strings may hold U+2028, U+2029 and U+0085 unescaped (`json.dumps(ensure_ascii=False)`
    writes them so); `str.splitlines()` would cut a row in two there.
    """
    for number, line in enumerate(text.split("\n"), start=1):
        yield number, line.removesuffix("\r")


def jsonl_record(line: str, path: Path, number: int) -> Record | None:
    """One JSONL line as a Record (None for a blank line); a bad line is a UserError naming it."""
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"invalid JSON ({e.msg} at column {e.colno})", path=path, line=number) from None
    if not isinstance(row, dict):
        raise UserError(f"expected a JSON object per line, got {type(row).__name__}", path=path, line=number)
    return Record(row, str(path), number)


def _read_jsonl(path: Path) -> list[Record]:
    records = (jsonl_record(line, path, number) for number, line in jsonl_lines(read_text(path)))
    return [record for record in records if record is not None]


def _read_json(path: Path) -> list[Record]:
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"invalid JSON ({e.msg})", path=path, line=e.lineno) from None
    if isinstance(data, dict):
        # {"data": [...]} / {"train": [...]} style wrappers: take the only list value.
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError("expected a JSON array of objects (or an object holding one array)", path=path)
        data = lists[0]
    if not isinstance(data, list):
        raise UserError("expected a JSON array of objects", path=path)
    records = []
    for index, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise UserError(f"item {index}: expected an object, got {type(row).__name__}", path=path)
        records.append(Record(row, str(path), index))
    return records


def csv_rows(text: str, path: str | Path) -> Iterator[tuple[int, list[str]]]:
    """(first line, cells) of each row of CSV text; a malformed file is one error naming its line.

    Fields may be as long as the file: the csv module's default limit (128 KiB) is less than one
    long support-chat message, and the text is already in memory anyway.
    """
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))  # process-wide; only ever raised
    # newline="": the csv module splits rows itself, at \n and \r only (not at U+2028 in a field).
    reader = csv.reader(io.StringIO(text, newline=""))
    end = 0  # last line of the previous row; a quoted field may span several lines
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise UserError(f"not valid CSV: {e}", path=path, line=reader.line_num) from None
        yield end + 1, row
        end = reader.line_num


def _read_csv(path: Path) -> list[Record]:
    rows = csv_rows(read_text(path), path)
    try:
        _, header = next(rows)
    except StopIteration:
        raise UserError("CSV file has no header row", path=path) from None
    header = [h.strip() for h in header]
    if not any(header) or len(set(header)) != len(header):
        raise UserError(f"CSV header must name every column once, got {header}", path=path, line=1)
    records = []
    for number, row in rows:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise UserError(f"row has {len(row)} columns, header has {len(header)}", path=path, line=number)
        records.append(Record(dict(zip(header, row)), str(path), number))
    return records


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for corrupt files
        raise UserError(f"cannot read Parquet: {str(e).splitlines()[0]}", path=path) from None
    return [Record(row, str(path), i) for i, row in enumerate(table.to_pylist(), start=1)]


def _read_plain(path: Path) -> list[Record]:
    return [Record({"text": read_text(path)}, str(path), None)]


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def read_file(path: Path) -> list[Record]:
    """Read one data file by its suffix."""
    suffix = path.suffix.lower()
    if suffix in READERS:
        return READERS[suffix](path)
    if suffix in TEXT_SUFFIXES or suffix == "":
        return _read_plain(path)
    raise UserError(f"unsupported file type '{suffix}' (use {', '.join(sorted(DATA_SUFFIXES))})", path=path)


def data_files(source: str | Path) -> list[Path]:
    """Expand a file or folder into the data files it holds, sorted for a stable order."""
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise UserError(f"folder holds no data files ({', '.join(sorted(DATA_SUFFIXES))})", path=path)
        return files
    raise UserError("no such file or folder", path=path)


def _looks_like_hub_dataset(source: str) -> bool:
    """`owner/name` (dots allowed: "teknium/OpenHermes-2.5") that is no local path or data file name."""
    parts = source.split("/")
    return (len(parts) == 2 and all(parts) and not Path(source).exists()
            and Path(source).suffix.lower() not in DATA_SUFFIXES)


def read_hub_dataset(name: str, split: str = "train") -> list[Record]:
    """Load a Hugging Face dataset by name (`owner/name` or `owner/name:split`)."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, missing dataset, missing split: all user-fixable
        raise UserError(f"cannot load Hugging Face dataset '{name}' split '{split}': "
                        f"{str(e).splitlines()[0]}") from None
    return [Record(dict(row), f"hf://{name}", i) for i, row in enumerate(dataset, start=1)]


def read_source(source: str | Path) -> dict[str, list[Record]]:
    """Read a file, a folder, or a Hugging Face dataset name into records, grouped per file.

    Shapes are detected per file, so the result keeps files apart.
    """
    text = str(source)
    name, _, split = text.partition(":")
    if not Path(text).exists() and _looks_like_hub_dataset(name):
        return {f"hf://{name}": read_hub_dataset(name, split or "train")}
    out: dict[str, list[Record]] = {}
    for path in data_files(source):
        records = read_file(path)
        if not records:
            raise UserError("file holds no rows", path=path)
        out[str(path)] = records
    return out
