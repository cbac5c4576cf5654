"""`convert()` end to end: kind detection, bad input, duplicates, the summary, atomic output."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from specialize.config import ConvertConfig
from specialize.data.convert import convert, dedup
from specialize.errors import UserError

ASSETS = Path(__file__).parent / "assets" / "convert"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _cfg(tmp_path: Path, *inputs, **values) -> ConvertConfig:
    return ConvertConfig(inputs=[str(i) for i in inputs], to=tmp_path / "data.jsonl", **values)


def test_folder_with_mixed_inputs_detects_each_kind(tmp_path):
    folder = tmp_path / "company"
    folder.mkdir()
    shutil.copy(ASSETS / "faq" / "plain_qa.txt", folder / "backup-faq.txt")
    shutil.copy(ASSETS / "chat" / "openai.jsonl", folder / "chats.jsonl")
    shutil.copy(ASSETS / "chat" / "transcripts.csv", folder / "transcripts.csv")
    (folder / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")  # not a convertible file: skipped
    (folder / ".hidden.md").write_text("## Secret?\n\nyes\n", encoding="utf-8")
    cfg = ConvertConfig(inputs=[str(folder), str(ASSETS / "slack" / "export")], to=folder / "data.jsonl")
    summary = convert(cfg, progress=False)
    names = {k.replace(folder.as_posix(), "company"): v for k, v in summary.kinds.items()}
    assert names == {"company/backup-faq.txt": "faq", "company/chats.jsonl": "chat",
                     "company/transcripts.csv": "chat", (ASSETS / "slack" / "export").as_posix(): "slack"}
    assert list(summary.per_file.values()) == [4, 2, 3, 2]
    assert (summary.produced, summary.pairs, summary.conversations) == (11, 6, 5)
    # The output sits inside the input folder: a second run must not read it back as input.
    assert convert(cfg, progress=False).produced == 11


def test_summary_lines(tmp_path):
    page = tmp_path / "faq.md"
    page.write_text("# FAQ\n\n## Can I pay by card?\n\nYes.\n\n## can i pay by CARD\n\nyes!\n\n"
                    "## Is there a trial?\n\n## Do you ship abroad?\n\nTo the EU.\n", encoding="utf-8")
    summary = convert(_cfg(tmp_path, page), progress=False)
    assert summary.lines() == [
        f"wrote 2 examples to {tmp_path / 'data.jsonl'} (2 question/answer pairs, 0 conversations)",
        f"  {page.as_posix()} (faq): 2",
        "dropped 2:",
        "  empty answer: 1",
        "  exact duplicate: 1",
    ]
    assert str(summary) == "\n".join(summary.lines())


def test_docs_without_generator_keep_explicit_questions_and_say_what_is_missing(tmp_path):
    docs = ASSETS / "docs"
    summary = convert(_cfg(tmp_path, docs, kind="docs"), progress=False)
    assert [(r["question"], r["answer"]) for r in _rows(tmp_path / "data.jsonl")] == [
        ("Why does Tidepool refuse to start?", "Another process holds the port. Pick a free one with `--port`.")]
    assert summary.dropped == {"page without questions": 1}
    assert summary.notes == ["1 page(s) had no question headings; documentation without question headings needs "
                             "--generator URL --generator-model NAME to write Q&A from them"]


def test_nothing_to_write_is_an_error_and_writes_nothing(tmp_path):
    with pytest.raises(UserError) as err:
        convert(_cfg(tmp_path, ASSETS / "docs" / "deploying.md", kind="docs"), progress=False)
    assert str(err.value) == ("nothing to write: no examples came out of 1 input(s) (page without questions: 1); "
                              "documentation without question headings needs --generator URL --generator-model NAME")
    assert not (tmp_path / "data.jsonl").exists()


@pytest.mark.parametrize("name, content, message", [
    ("empty.md", b"  \n", "empty.md: file is empty"),
    ("binary.txt", b"PK\x03\x04\x00\x00binary", "binary.txt: binary file, not text"),
    ("latin1.txt", b"Q: Caf\xe9?\nA: yes\n", "latin1.txt:1: not UTF-8 text (byte 0xe9); save the file as UTF-8"),
    ("rows.jsonl", b'{"question": "q", "answer": "a"}\n', "rows.jsonl:1: field 'messages': JSONL rows without"),
    ("table.xlsx", b"x", "cannot tell what kind of input a '.xlsx' file is; pass kind faq, docs, chat or slack"),
])
def test_bad_input_files_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        convert(_cfg(tmp_path, path), progress=False)
    assert message in str(err.value) and str(path) in str(err.value)


def test_missing_input_and_empty_folder(tmp_path):
    with pytest.raises(UserError, match="nope.html: no such file or folder"):
        convert(_cfg(tmp_path, tmp_path / "nope.html"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: no files to convert in this folder"):
        convert(_cfg(tmp_path, tmp_path / "empty"), progress=False)
    with pytest.raises(UserError, match="not a Slack export"):
        convert(_cfg(tmp_path, ASSETS / "faq", kind="slack"), progress=False)


def test_html_declaring_another_charset_is_decoded(tmp_path):
    page = tmp_path / "faq.html"
    page.write_bytes('<meta charset="windows-1252"><title>FAQ</title><h2>Où êtes-vous?</h2><p>À Paris.</p>'
                     .encode("cp1252"))
    convert(_cfg(tmp_path, page), progress=False)
    assert [(r["question"], r["answer"]) for r in _rows(tmp_path / "data.jsonl")] == [("Où êtes-vous?", "À Paris.")]


def test_output_is_replaced_atomically(tmp_path, monkeypatch):
    out = tmp_path / "data.jsonl"
    out.write_text("previous\n", encoding="utf-8")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr("specialize.files.os.replace", crash)  # the one atomic write
    with pytest.raises(OSError):
        convert(_cfg(tmp_path, ASSETS / "faq" / "plain_qa.txt"), progress=False)
    assert out.read_text(encoding="utf-8") == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]  # no temp file left behind
    monkeypatch.undo()
    convert(_cfg(tmp_path, ASSETS / "faq" / "plain_qa.txt"), progress=False)
    assert len(_rows(out)) == 4


def test_exact_and_near_duplicates():
    answer = ("Open Settings, choose Billing, then Invoices; every invoice can be downloaded as a PDF "
              "or sent to the billing email address on file for your company account.")
    rows = [
        {"question": "Where are my invoices?", "answer": answer},
        {"question": "where are my INVOICES", "answer": answer + " "},  # exact after normalising
        {"question": "Where are my invoices?", "answer": answer.replace("company account", "company account.")},
        {"question": "Where are my invoices?", "answer": answer.replace("account.", "account today.")},  # near
        {"question": "How do I cancel?", "answer": "Click Cancel plan."},
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]
    kept, dropped = dedup.dedup_rows(rows, threshold=0.9)
    assert kept == [rows[0], rows[4], rows[5]]
    assert dropped == {"exact duplicate": 3, "near duplicate": 1}
    kept, dropped = dedup.dedup_rows(rows, threshold=1.0)
    assert len(kept) == 4 and dropped == {"exact duplicate": 3}


def test_near_duplicate_removal_scales():
    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(3000)]
    rows = []
    for i in range(10000):
        words = rng.sample(vocabulary, 30)
        rows.append({"question": f"question {i}?", "answer": " ".join(words)})
    rows += [dict(rows[i], answer=rows[i]["answer"] + " extra") for i in range(0, 1000, 20)]  # 50 near copies
    kept, dropped = dedup.dedup_rows(rows, threshold=0.9)
    assert dropped == {"near duplicate": 50} and kept == rows[:10000]


def test_cli_prints_summaries_and_paths_verbatim(tmp_path):
    # Rich markup in printed user text ("[/INST]" quoted from a server, "[draft]" in a file name)
    # must neither crash the command after its output is written nor vanish from the message.
    from typer.testing import CliRunner

    from specialize.cli import app

    page = tmp_path / "faq [draft].md"
    page.write_text("## What does [/INST] mean?\n\nIt ends an instruction.\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["convert", str(page), "--to", str(tmp_path / "qa.jsonl")])
    assert result.exit_code == 0, result.output
    assert "faq [draft].md" in result.output
    assert json.loads((tmp_path / "qa.jsonl").read_text(encoding="utf-8"))["question"] == "What does [/INST] mean?"
