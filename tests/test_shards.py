"""Token files on disk for pre-training: the same blocks and held-out split as the in-memory
functions, read lazily; reused by --resume; and a corpus ten times larger costs little more memory.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import textwrap
import unittest
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from specialize.data.io import read_file
from specialize.data.tokenize import IGNORE
from specialize.errors import UserError
from specialize.pretrain import read_documents, split_held_out, to_items, tokenize_documents
from specialize.documents import Documents
from specialize.documents import _jsonl_records as jsonl_records
from specialize import shards
from specialize.shards import MANIFEST, Shards, TokenBlocks, cut_text, cuttable, prepare, token_dtype
from specialize.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


def _text(seed: int, words: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * (seed % 5 + 1)) % len(WORDS)] for i in range(words)) + "."


def _folder(root: Path, sizes: list[int]) -> Path:
    """One text file per document, document d made of `sizes[d]` words."""
    root.mkdir(parents=True, exist_ok=True)
    for d, words in enumerate(sizes):
        (root / f"doc-{d:03d}.txt").write_text(_text(d, words), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _shards(tmp: Path, data: Path, tokenizer, block: int, fraction: float, seed: int = 0) -> Shards:
    prepare(tmp / "data", Documents([str(data)]), tokenizer, block, fraction, seed, reuse=False)
    return Shards(tmp / "data")


def _in_memory(data: Path, tokenizer, block: int, fraction: float, seed: int = 0):
    docs = tokenize_documents(tokenizer, read_documents([str(data)]))
    return split_held_out(docs, tokenizer.eos_token_id, block, fraction, seed)


@pytest.mark.parametrize("sizes, block, fraction, by", [
    ([40 + 13 * d % 50 for d in range(30)], 16, 0.2, "documents"),  # whole documents held out
    ([300, 200, 500], 16, 0.1, "blocks"),  # fewer than 10 documents: blocks held out
    ([4] * 11 + [400], 32, 0.05, "blocks"),  # the one held-out document fills no block: blocks instead
    ([40 + d for d in range(12)], 16, 0.0, "none"),  # eval_fraction 0
])
def test_token_files_hold_the_in_memory_blocks_and_split(tmp_path, tokenizer, sizes, block, fraction, by):
    data = _folder(tmp_path / "corpus", sizes)
    shards, expected = _shards(tmp_path, data, tokenizer, block, fraction), _in_memory(data, tokenizer, block, fraction)
    assert (shards.by, expected.by) == (by, by)
    assert shards.train.ids() == expected.train and shards.eval.ids() == expected.eval
    assert (shards.documents, shards.stream_tokens, shards.dropped_tokens) == (
        expected.documents, expected.stream_tokens, expected.dropped_tokens)
    assert [(i.input_ids, i.labels) for i in shards.train] == [(i.input_ids, i.labels) for i in to_items(expected.train)]
    names = {p.name for p in (tmp_path / "data").iterdir()}
    assert names == ({"train.bin", "eval.bin", MANIFEST} if by == "documents" else
                     {"text.bin", MANIFEST} | ({"eval-blocks.bin"} if by == "blocks" else set()))


def _docstrings() -> str:
    """Real text with every kind of line end: prose, code, lists, blank lines, indentation."""
    return "\n\n".join([inspect.getdoc(argparse), inspect.getdoc(json), inspect.getsource(textwrap),
                         inspect.getdoc(unittest)])


def test_a_long_document_is_tokenised_in_pieces_with_the_same_ids(tokenizer):
    text = _docstrings() + "\nx\ny \nz\n w\n\nv\n's\n'\n-\n1\n2"
    pieces = list(cut_text(text, 50))
    assert "".join(pieces) == text and len(pieces) > 20
    assert cuttable(tokenizer)
    whole = tokenize_documents(tokenizer, [text])[0]
    assert [i for piece in tokenize_documents(tokenizer, pieces) for i in piece] == whole
    assert list(cut_text("no newline at all " * 10, 8)) == ["no newline at all " * 10]


def test_the_bpe_trained_on_pieces_is_the_one_trained_on_whole_texts():
    text = _docstrings()  # pretrain trains its BPE on documents cut like this: the same word counts
    whole = train_bpe([text, "another document"], vocab_size=400)
    cut = train_bpe([*cut_text(text, 300), "another document"], vocab_size=400)
    assert cuttable(whole) and cut.backend_tokenizer.to_str() == whole.backend_tokenizer.to_str()


def test_only_a_plain_byte_level_bpe_is_cut(tokenizer):
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    for change in ({"pre_tokenizer": spec["pre_tokenizer"] | {"add_prefix_space": True}},
                   {"normalizer": {"type": "Lowercase"}}, {"model": spec["model"] | {"dropout": 0.1}}):
        other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec | change)))
        assert not cuttable(other), change


def test_token_files_are_the_same_when_long_documents_are_cut(tmp_path, tokenizer, monkeypatch):
    data = tmp_path / "corpus"
    data.mkdir()
    for name, text in (("a", _docstrings()), ("b", "short one"), ("c", _docstrings()[::-1])):
        (data / f"{name}.txt").write_text(text, encoding="utf-8")
    expected = _in_memory(data, tokenizer, 16, 0.0)
    monkeypatch.setattr(shards, "BATCH_CHARS", 300)  # every docstring document is cut into pieces
    cut = _shards(tmp_path, data, tokenizer, 16, 0.0)
    assert cut.train.ids() == expected.train and cut.stream_tokens == expected.stream_tokens


def test_blocks_are_built_on_access_and_slice_as_views(tmp_path):
    path = tmp_path / "ids.bin"
    np.arange(20, dtype=np.uint16).tofile(path)
    blocks = TokenBlocks(np.memmap(path, dtype=np.uint16, mode="r"), 4)
    assert len(blocks) == 5  # the last partial block is not one
    assert (blocks[1].input_ids, blocks[1].labels, blocks[1].source) == ([4, 5, 6, 7], [IGNORE, 5, 6, 7], "pretrain")
    assert all(type(t) is int for t in blocks[1].input_ids)  # plain ints, as the collator expects
    odd = blocks[1::2]
    assert isinstance(odd, TokenBlocks) and [b.input_ids[0] for b in odd] == [4, 12]
    assert odd[1:][0].input_ids == [12, 13, 14, 15] and not blocks[5:]
    with pytest.raises(IndexError):
        blocks[5]
    picked = TokenBlocks(blocks.tokens, 4, np.array([3, 0]))
    assert picked.ids() == [[12, 13, 14, 15], [0, 1, 2, 3]]


def test_ids_take_two_bytes_up_to_65536_tokens(tmp_path, tokenizer):
    assert (token_dtype(512), token_dtype(65536), token_dtype(65537)) == (np.uint16, np.uint16, np.uint32)
    data = _folder(tmp_path / "corpus", [50] * 12)
    shards = _shards(tmp_path, data, tokenizer, 16, 0.2)
    written = sum((tmp_path / "data" / name).stat().st_size for name in ("train.bin", "eval.bin"))
    assert written == 2 * shards.stream_tokens


def test_resume_reuses_matching_files_and_rebuilds_on_any_change(tmp_path, tokenizer):
    data = _folder(tmp_path / "corpus", [60] * 12)
    folder = tmp_path / "data"
    args = (tokenizer, 16, 0.2, 0)
    assert prepare(folder, Documents([str(data)]), *args, reuse=True) is False  # nothing to reuse yet
    first = Shards(folder)
    os.utime(folder / "train.bin", ns=(1, 1))  # a rewrite would reset it
    assert prepare(folder, Documents([str(data)]), *args, reuse=True) is True
    assert (folder / "train.bin").stat().st_mtime_ns == 1 and Shards(folder).fingerprint == first.fingerprint
    assert prepare(folder, Documents([str(data)]), *args, reuse=False) is False  # a fresh run rewrites
    assert Shards(folder).fingerprint == first.fingerprint  # same ids, same fingerprint

    assert prepare(folder, Documents([str(data)]), tokenizer, 32, 0.2, 0, reuse=True) is False  # block length
    assert Shards(folder).fingerprint != first.fingerprint
    (data / "doc-003.txt").write_text(_text(3, 61), encoding="utf-8")  # the text
    assert prepare(folder, Documents([str(data)]), *args, reuse=True) is False
    changed = Shards(folder)
    assert changed.fingerprint != first.fingerprint and changed.stream_tokens > first.stream_tokens
    (folder / MANIFEST).unlink()  # an interrupted write leaves no manifest: rebuilt
    assert prepare(folder, Documents([str(data)]), *args, reuse=True) is False


def test_jsonl_is_read_a_line_at_a_time_as_data_io_reads_it(tmp_path):
    rows = [{"text": "one\u2028still one"}, {"text": "two"}, {"text": "  "}, {"text": "three\r\n"}]
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_bytes(b"\xef\xbb\xbf" + ("\r\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n").encode())
    assert list(Documents([str(path)])) == [r["text"] for r in rows if r["text"].strip()]
    assert list(jsonl_records(path)) == read_file(path)  # the reference reader: same rows, same line numbers

    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_bytes("\n".join(lines).encode("utf-16"))
    assert list(Documents([str(utf16)])) == ["one\u2028still one", "two", "three\r\n"]


@pytest.mark.parametrize("content, message", [
    (b'{"text": "a"}\n{"text": oops}\n', r"bad\.jsonl:2: invalid JSON \(Expecting value at column 10\)"),
    (b'{"text": "a"}\n["text"]\n', r"bad\.jsonl:2: expected a JSON object per line, got list"),
    (b'{"text": "a"}\n\n{"text": "caf\xe9"}\n', r"bad\.jsonl:3: not UTF-8 text \(byte 0xe9\); save the file as UTF-8"),
    (b'{"text": "a"}\n{"text": 3}\n', r"bad\.jsonl:2: field 'text': expected a string, got int"),
    (b"\n\n", r"bad\.jsonl: file is empty"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        list(Documents([str(path)]))


def test_documents_count_in_a_pass_and_empty_text_is_an_error(tmp_path):
    data = _folder(tmp_path / "corpus", [5, 6, 7])
    documents = Documents([str(data / f"doc-00{d}.txt") for d in range(3)])
    assert documents.counted() == 3 and documents.chars == sum(len(_text(d, 5 + d)) for d in range(3))
    (tmp_path / "only.jsonl").write_text('{"text": "   "}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"no text to pre-train on in .*only\.jsonl \(every document is empty\)"):
        Documents([str(tmp_path / "only.jsonl")]).counted()
    with pytest.raises(UserError, match="no data given"):
        Documents([])


# --- memory -------------------------------------------------------------------------------------


def _peak_rss_mib(argv: list[str], cwd: Path) -> float:
    child = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, child.stderr.read().decode(errors="replace")[-2000:]
    child.stderr.close()
    return usage.ru_maxrss / 1024


def test_ten_times_the_text_costs_little_more_memory(tmp_path, tokenizer_dir):
    """`specialize pretrain` on 0.25 MB and on 2.5 MB of text files, each in its own process.

    Holding the corpus (text, ids as Python ints, blocks) cost ~28 MiB of RSS per MB of text with
    a 4,096-token BPE (bench/pretrain_memory.py: 612 → 1,862 MiB for 5 → 50 MB) and more with
    this 512-token one (more tokens per MB), so 2.25 MB more text would add well over 100 MiB;
    streamed into token files it adds next to nothing (one tokeniser batch is capped by size).
    """
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from pretrain_memory import write_corpus
    finally:
        sys.path.remove(str(ROOT / "bench"))
    peaks = []
    for megabytes in (0.25, 2.5):
        corpus = tmp_path / f"corpus-{megabytes}"
        write_corpus(corpus, megabytes)
        peaks.append(_peak_rss_mib([sys.executable, "-m", "specialize", "pretrain", "--data", str(corpus), "--out",
                                    str(tmp_path / f"run-{megabytes}"), "--size", "micro", "--tokenizer",
                                    str(tokenizer_dir), "--max-steps", "1", "--micro-batch-size", "8",
                                    "--max-seq-tokens", "64", "--eval-fraction", "0.01", "--no-progress"], tmp_path))
    assert peaks[1] < 2 * peaks[0]
    assert peaks[1] - peaks[0] < 50, peaks  # MiB for 2.25 MB more text
