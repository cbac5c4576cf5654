"""Retrieval: chunk boundaries, exact top-1 passages, save/load round trip, RAG prompt."""

import importlib.util
import json
from pathlib import Path

import pytest

from specialize.errors import UserError
from specialize.retrieval import (RAG_TEMPLATE, DenseRetriever, Passage, Retriever, chunk_text,
                                  html_to_text, load_passages, load_retriever, rag_prompt)

ASSETS = Path(__file__).parent / "assets" / "eval"
DOCS = ASSETS / "docs"
WORDS = " ".join(f"w{i}" for i in range(1, 12))  # w1 .. w11


def test_chunk_boundaries_and_overlap():
    assert chunk_text(WORDS, 4, 1) == ["w1 w2 w3 w4", "w4 w5 w6 w7", "w7 w8 w9 w10", "w10 w11"]
    assert chunk_text(" ".join(WORDS.split()[:10]), 4, 1) == ["w1 w2 w3 w4", "w4 w5 w6 w7",
                                                              "w7 w8 w9 w10"]
    assert chunk_text(WORDS, 5, 0) == ["w1 w2 w3 w4 w5", "w6 w7 w8 w9 w10", "w11"]
    assert chunk_text(WORDS, 200, 50) == [WORDS]
    assert chunk_text("  def f():\n    return 1\n", 10, 2) == ["def f():\n    return 1"]  # layout kept
    assert chunk_text(" \n ", 4, 1) == []


def test_html_to_text_drops_scripts():
    title, text = html_to_text((DOCS / "billing.html").read_text())
    assert title == "Billing & Invoices"
    assert text == ("Invoices\n\nInvoices are issued monthly on the first business day.\n\n"
                    "- Refunds take five working days.\n- Card payments only.")



PAGE = """<!DOCTYPE html><html><head><title>Refunds | Shop</title><script>var t = "track";</script></head>
<body><header><a href="/">Shop home</a> <a href="/login">Log in</a></header>
<nav><ul><li><a href="/faq">FAQ</a></li><li><a href="/contact">Contact sales</a></li></ul></nav>
<main><h1>Refunds</h1><p>Refunds are paid back to the original card within five working days.</p>
<aside class="toc">On this page</aside></main>
<footer>Copyright 2024 Shop Inc. Privacy policy.</footer></body></html>"""


def test_rag_reads_an_html_page_as_convert_does(tmp_path):
    # one HTML-to-text: navigation, page header and footer are not passages RAG can retrieve
    from specialize.data.convert.faq import document_text

    page = tmp_path / "refunds.html"
    page.write_text(PAGE)
    title, text = html_to_text(PAGE)
    assert (title, text) == ("Refunds | Shop",
                             "Refunds\n\nRefunds are paid back to the original card within five working days.")
    assert text == document_text(page, PAGE)
    assert [p.text for p in load_passages(tmp_path)] == [f"{title}\n{text}"]


def test_load_passages_from_folder():
    passages = load_passages(DOCS, chunk_words=8, overlap_words=2)
    assert [p.source for p in passages] == [
        "billing.html#1", "billing.html#2", "billing.html#3",
        "install.md#1", "install.md#2", "install.md#3", "install.md#4",
        "shipping.rst#1", "shipping.rst#2",
        "sub/passwords.txt#1", "sub/passwords.txt#2", "sub/passwords.txt#3", "sub/passwords.txt#4",
        "sub/passwords.txt#5"]  # .hidden.md and ignored.csv are skipped
    assert passages[1].text == "Billing & Invoices\nthe first business day.\n\n- Refunds take five"
    assert passages[3].text == "# Installing Widgetron\n\nRun `pip install widgetron` inside"
    assert passages[4].text.startswith("widgetron` inside")  # 2 words of overlap


def test_empty_and_utf16_documents_in_a_folder(tmp_path):
    (tmp_path / "empty.md").write_text("")  # an empty page in a docs folder is skipped, not an error
    (tmp_path / "notes.txt").write_bytes("Opening hours: 9 to 5.".encode("utf-16"))
    assert [(p.source, p.text) for p in load_passages(tmp_path)] == [("notes.txt", "Opening hours: 9 to 5.")]


def test_jsonl_passages_keep_unicode_line_separators(tmp_path):
    path = tmp_path / "passages.jsonl"
    path.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [p.text for p in load_passages(path)] == ["a\u2028b"]


def test_load_passages_from_jsonl():
    passages = load_passages(ASSETS / "passages.jsonl")
    assert passages == [
        Passage("Opening hours\nThe support desk is open Monday to Friday, 9:00 to 17:00 CET.", "faq-1"),
        Passage("Refunds are paid back to the original card within five working days.", "faq.html#refunds"),
        Passage("Gift cards never expire and can be combined with discount codes.", "passages.jsonl:4")]


@pytest.fixture(scope="module")
def retriever():
    return Retriever.build(DOCS, chunk_words=30, overlap_words=5)


@pytest.mark.parametrize("query,source", [
    ("how do I get a refund?", "billing.html"),
    ("I forgot my password, how to reset it", "sub/passwords.txt"),
    ("which python version does pip install need", "install.md"),
    ("tracking number SMS for my parcel", "shipping.rst"),
])
def test_top1(retriever, query, source):
    assert retriever.search(query, k=1)[0].source == source


def test_search_results(retriever):
    hits = retriever.search("refund invoice password", k=10)
    assert [h.source for h in hits] == ["billing.html", "sub/passwords.txt"]  # score 0 dropped
    assert hits[0].score > hits[1].score > 0
    assert retriever.search("zzz qqq", k=3) == []
    queries = ["refund", "reset password", "nothing-matches"]
    assert retriever.search_many(queries, k=2) == [retriever.search(q, k=2) for q in queries]
    with pytest.raises(UserError, match="top_k"):
        retriever.search("refund", k=0)


def test_save_load_round_trip(retriever, tmp_path):
    retriever.save(tmp_path / "index")
    files = sorted(p.relative_to(tmp_path / "index").as_posix()
                   for p in (tmp_path / "index").rglob("*") if p.is_file())
    assert "passages.jsonl" in files and "retriever.json" in files
    assert all(f.endswith((".json", ".jsonl", ".npy")) for f in files)  # no pickle
    meta = json.loads((tmp_path / "index" / "retriever.json").read_text())
    assert (meta["kind"], meta["chunk_words"], meta["overlap_words"], meta["num_passages"]) == ("bm25", 30, 5, 4)
    loaded = load_retriever(tmp_path / "index")
    assert isinstance(loaded, Retriever)
    assert loaded.passages == retriever.passages
    queries = ["refund", "reset my password", "pip python", "parcel tracking sms", "zzz"]
    assert loaded.search_many(queries, k=3) == retriever.search_many(queries, k=3)


def test_user_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no text to index"):
        Retriever.build(tmp_path / "empty")
    (tmp_path / "only_csv").mkdir()
    (tmp_path / "only_csv" / "a.csv").write_text("x,y")
    with pytest.raises(UserError, match="no text to index"):
        Retriever.build(tmp_path / "only_csv")
    with pytest.raises(UserError, match="not found"):
        Retriever.build(tmp_path / "missing")
    with pytest.raises(UserError) as err:
        Retriever.build(DOCS, chunk_words=10, overlap_words=10)
    assert err.value.field == "overlap_words"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"title": "no text"}\n')
    with pytest.raises(UserError) as err:
        Retriever.build(bad)
    assert (err.value.line, err.value.field) == (2, "text")
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1" / "a.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(UserError, match="UTF-8"):
        Retriever.build(tmp_path / "latin1")
    with pytest.raises(UserError, match="not a saved retriever"):
        load_retriever(tmp_path / "empty")


def test_rag_prompt_template():
    assert RAG_TEMPLATE == "Context:\n{context}\n\nQuestion: {question}"
    passages = [Passage("Refunds take five days.", "a.md"), Passage("Cards only.\nNo cash.", "b.md")]
    assert rag_prompt("How long do refunds take?", passages) == (
        "Context:\n[1] Refunds take five days.\n[2] Cards only.\nNo cash.\n\n"
        "Question: How long do refunds take?")
    assert rag_prompt("Q?", ["plain text"]) == "Context:\n[1] plain text\n\nQuestion: Q?"
    assert rag_prompt("Q?", []) == "Q?"


@pytest.mark.skipif(importlib.util.find_spec("sentence_transformers") is not None,
                    reason="sentence-transformers is installed")
def test_dense_needs_sentence_transformers(tmp_path):
    with pytest.raises(UserError, match="pip install sentence-transformers"):
        DenseRetriever.build(DOCS, tmp_path)
