"""convert and lint on hostile or unusual input: links out of a folder, huge CSV fields, pathological pages."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from specialize.config import ConvertConfig
from specialize.data import htmltext, htmltree
from specialize.data.convert import convert
from specialize.data.convert.faq import document_text, extract_pairs
from specialize.data.htmltext import render
from specialize.data.htmltree import Node, parse_html
from specialize.data.io import read_file
from specialize.errors import UserError

SECRET = "Q: What is the root password?\nA: hunter2\n"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_links_out_of_an_input_folder_are_not_followed(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "faq.txt").write_text("Q: How do I pay?\nA: By card.\n")
    (docs / "leak.txt").symlink_to(outside / "secret.txt")
    (docs / "alias.txt").symlink_to(docs / "faq.txt")  # stays inside the folder: followed (and deduplicated)
    summary = convert(ConvertConfig(inputs=[str(docs)], to=tmp_path / "out.jsonl"), progress=False)
    assert [r["question"] for r in _rows(tmp_path / "out.jsonl")] == ["How do I pay?"]
    assert f"note: not followed: 1 link(s) leading out of the input folder ({docs.as_posix()}/leak.txt)" \
        in summary.lines()
    # a file named on the command line is the user's own choice, link or not
    convert(ConvertConfig(inputs=[str(docs / "leak.txt")], to=tmp_path / "given.jsonl"), progress=False)
    assert [r["answer"] for r in _rows(tmp_path / "given.jsonl")] == ["hunter2"]


def test_links_out_of_a_slack_export_folder_are_not_followed(tmp_path):
    export = tmp_path / "slack"
    (export / "general").mkdir(parents=True)
    (export / "users.json").write_text(json.dumps([{"id": "U1", "name": "ann"}, {"id": "U2", "name": "bob"}]))
    (export / "channels.json").write_text(json.dumps([{"id": "C1", "name": "general"}]))
    thread = [{"ts": "1.0", "user": "U1", "text": "How do I reset my password?", "thread_ts": "1.0"},
              {"ts": "2.0", "user": "U2", "text": "Use the reset link on the login page.", "thread_ts": "1.0"}]
    (export / "general" / "2024-01-01.json").write_text(json.dumps(thread))
    elsewhere = tmp_path / "other.json"
    elsewhere.write_text(json.dumps([{"ts": "3.0", "user": "U1", "text": "secret?", "thread_ts": "3.0"},
                                     {"ts": "4.0", "user": "U2", "text": "hunter2", "thread_ts": "3.0"}]))
    (export / "general" / "2024-01-02.json").symlink_to(elsewhere)
    summary = convert(ConvertConfig(inputs=[str(export)], to=tmp_path / "out.jsonl"), progress=False)
    assert "hunter2" not in (tmp_path / "out.jsonl").read_text()
    assert f"note: not followed: {export.as_posix()}: 1 file(s) linked from outside the export" in summary.lines()
    (export / "users.json").unlink()
    (export / "users.json").symlink_to(elsewhere)
    with pytest.raises(UserError, match="users.json: is a link that leads out of the Slack export folder"):
        convert(ConvertConfig(inputs=[str(export)], to=tmp_path / "out.jsonl"), progress=False)


LONG = "word " * 60_000  # 300 KB: over the csv module's default field limit of 128 KiB


def test_a_long_csv_field_is_read_by_convert_and_by_the_data_readers(tmp_path):
    chats = tmp_path / "chats.csv"
    chats.write_text(f'conversation_id,speaker,text\n1,customer,"{LONG}"\n1,agent,Done.\n')
    convert(ConvertConfig(inputs=[str(chats)], to=tmp_path / "out.jsonl"), progress=False)
    [row] = _rows(tmp_path / "out.jsonl")
    assert row["messages"][0]["content"] == LONG.strip()
    data = tmp_path / "qa.csv"
    data.write_text(f'question,answer\nWhy?,"{LONG}"\nHow?,"two\nlines"\nWhat?,ok\n')
    records = read_file(data)
    assert records[0].data["answer"] == LONG and [r.line for r in records] == [2, 3, 5]


def test_a_malformed_csv_is_one_line_naming_file_and_line(tmp_path, monkeypatch):
    # With fields as long as the file, a field over the limit is hard to produce: lower the limit.
    old = csv.field_size_limit(100)
    monkeypatch.setattr("specialize.data.io.CSV_FIELD_LIMIT", 100)
    try:
        data = tmp_path / "qa.csv"
        data.write_text("question,answer\nWhy?,fine\n" + f"How?,{'x' * 200}\n")
        with pytest.raises(UserError, match=r"qa\.csv:3: not valid CSV: field larger than field limit \(100\)$"):
            read_file(data)
        chats = tmp_path / "chats.csv"
        chats.write_text("conversation_id,speaker,text\n1,agent,hi\n" + f"1,customer,{'x' * 200}\n")
        with pytest.raises(UserError, match=r"chats\.csv:3: not valid CSV: field larger than field limit"):
            convert(ConvertConfig(inputs=[str(chats)], to=tmp_path / "out.jsonl"), progress=False)
    finally:
        csv.field_size_limit(old)


def test_nested_tables_render_each_cell_once():
    depth = 14  # every level used to render every level below it again: 2**14 times the innermost cell
    html = "".join(f"<table><tr><td>cell{i:02d}" for i in range(depth)) + "</td></tr></table>" * depth
    text = render(parse_html(html))
    assert [text.count(f"cell{i:02d}") for i in range(depth)] == [1] * depth
    assert text == " ".join(f"cell{i:02d}" for i in range(depth))


def test_a_page_over_the_element_limit_is_refused_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(htmltree, "MAX_ELEMENTS", 50)
    page = "<html><body>\n" + "<div>x</div>\n" * 60 + "</body></html>"
    with pytest.raises(UserError, match=r"^site/faq\.html:50: more than 50 HTML elements in one page"):
        extract_pairs(Path("faq.html"), page, "site/faq.html")
    with pytest.raises(UserError, match=r"^guide\.html:50: more than 50 HTML elements"):
        document_text(Path("guide.html"), page, "guide.html")
    monkeypatch.setattr("specialize.data.convert.faq_text.MAX_ELEMENTS", 50)  # before markdown-it runs
    with pytest.raises(UserError, match=r"^notes\.md: 61 lines, over the 50-line limit for one Markdown page"):
        extract_pairs(Path("notes.md"), "# a\n" * 60, "notes.md")


PATHOLOGICAL = {  # unclosed or nested markup that used to cost the page's depth (or more) per element
    "unclosed links": "<a href='#'>x ", "nested lists": "<ul><li>x ", "nested tables": "<table><tr><td>x ",
    "bold questions in divs": "<div><b>Why? x ", "spans in divs": "<div><span>x ",
    "nested details": "<details><summary>x ", "nested dl": "<dl><dt>Q?<dd>A ", "headings": "<h2>x ",
    "accordion class pairs": "<div class='faq-question'>Q?</div><div class='faq-answer'>A</div>",
    "sibling scripts": "<script>x</script>", "nested forms": "<form>x ",
}


@pytest.mark.parametrize("unit", PATHOLOGICAL.values(), ids=PATHOLOGICAL.keys())
def test_reading_a_pathological_page_does_bounded_work_per_element(unit, monkeypatch):
    # Work is counted, not timed: rendered elements and text pieces read, per element of the page.
    counts = {"render": 0, "text": 0}
    segments, strings = htmltext._segments, Node.strings

    def counted_segments(node):
        counts["render"] += 1
        return segments(node)

    def counted_strings(node):
        for piece in strings(node):
            counts["text"] += 1
            yield piece

    monkeypatch.setattr(htmltext, "_segments", counted_segments)
    monkeypatch.setattr(Node, "strings", counted_strings)
    page = "<html><body>" + unit * 3000 + "</body></html>"
    elements = parse_html(page).iter()
    n = sum(1 for _ in elements)
    extract_pairs(Path("faq.html"), page, "faq.html")
    document_text(Path("faq.html"), page)
    assert counts["render"] <= 40 * n and counts["text"] <= 40 * n, (counts, n)
