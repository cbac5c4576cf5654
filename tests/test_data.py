"""Readers and shape detection: every supported file type and shape, and every kind of bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from specialize.data.formats import load_examples
from specialize.errors import UserError
from helpers import write_jsonl

USER_ANSWER = [{"role": "user", "content": "Q1?"}, {"role": "assistant", "content": "A1."}]


@pytest.mark.parametrize("row, shape, messages", [
    ({"question": "Q1?", "answer": "A1."}, "qa", USER_ANSWER),
    ({"instruction": "Q1?", "input": "", "output": "A1."}, "alpaca", USER_ANSWER),
    ({"instruction": "Sum", "input": "1 2", "output": "3"}, "alpaca",
     [{"role": "user", "content": "Sum\n\n1 2"}, {"role": "assistant", "content": "3"}]),
    ({"instruction": "Q1?", "input": " \n ", "output": "A1."}, "alpaca", USER_ANSWER),  # blank = no input
    ({"instruction": "Q1?", "input": None, "output": "A1."}, "alpaca", USER_ANSWER),
    ({"instruction": "Sum", "input": 0, "output": "0"}, "alpaca",  # numbers become text, as in every field
     [{"role": "user", "content": "Sum\n\n0"}, {"role": "assistant", "content": "0"}]),
    ({"input": "Q1?", "output": "A1."}, "input_output", USER_ANSWER),
    ({"prompt": "Q1?", "completion": "A1."}, "prompt_completion", USER_ANSWER),
    ({"messages": USER_ANSWER}, "messages", USER_ANSWER),
    ({"conversations": [{"from": "human", "value": "Q1?"}, {"from": "gpt", "value": "A1."}]}, "conversations",
     USER_ANSWER),
])
def test_shapes_normalise_to_messages(tmp_path, row, shape, messages):
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    [example] = load_examples([str(path)])
    assert example.shape == shape
    assert example.messages == messages
    assert example.source == f"{path}:1"


def test_text_shape_and_plain_text_folder(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("alpha text", encoding="utf-8")
    (tmp_path / "docs" / "b.md").write_text("beta text", encoding="utf-8")
    examples = load_examples([str(tmp_path / "docs")])
    assert [e.text for e in examples] == ["alpha text", "beta text"]
    assert all(e.shape == "text" and e.messages is None for e in examples)


def test_json_csv_parquet(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"question": "Q1?", "answer": "A1."}]), encoding="utf-8")
    (tmp_path / "d.csv").write_text("question,answer\nQ1?,A1.\n", encoding="utf-8")
    pq.write_table(pa.Table.from_pylist([{"question": "Q1?", "answer": "A1."}]), tmp_path / "d.parquet")
    for name in ("d.json", "d.csv", "d.parquet"):
        [example] = load_examples([str(tmp_path / name)])
        assert example.messages == USER_ANSWER, name


def test_system_prompt_added(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Q1?", "answer": "A1."}])
    [example] = load_examples([str(path)], system_prompt="Be brief.")
    assert example.messages[0] == {"role": "system", "content": "Be brief."}


BAD = [
    ("bad_json.jsonl", '{"question": "Q?", "answer": "A."}\n{"question": "Q2?", "answer": \n', r"bad_json.jsonl:2: invalid JSON"),
    ("missing.jsonl", '{"question": "Q?", "answer": "A."}\n{"question": "Q2?"}\n', r"missing.jsonl:2: field 'answer': missing"),
    ("null.jsonl", '{"question": "Q?", "answer": null}\n', r"null.jsonl:1: field 'answer': is null"),
    ("empty_field.jsonl", '{"question": "  ", "answer": "A."}\n', r"empty_field.jsonl:1: field 'question': is empty"),
    ("wrong_type.jsonl", '{"question": ["Q?"], "answer": "A."}\n', r"wrong_type.jsonl:1: field 'question': expected text, got list"),
    ("alpaca_input.jsonl", '{"instruction": "Q?", "input": ["x"], "output": "A."}\n',
     r"alpaca_input.jsonl:1: field 'input': expected text, got list"),
    ("role.jsonl", '{"messages": [{"role": "robot", "content": "x"}]}\n', r"role.jsonl:1: field 'messages\[0\].role': unknown role 'robot'"),
    ("no_assistant.jsonl", '{"messages": [{"role": "user", "content": "x"}]}\n', r"no_assistant.jsonl:1: field 'messages': conversation has no assistant turn"),
    ("empty.jsonl", "", r"empty.jsonl: file is empty"),
    ("ragged.csv", "question,answer\nQ?,A.\nQ2?,A2.,extra\n", r"ragged.csv:3: row has 3 columns, header has 2"),
    ("shape.jsonl", '{"foo": 1}\n', r"shape.jsonl:1: cannot tell the data shape from fields \['foo'\]"),
    ("array.jsonl", '[1, 2]\n', r"array.jsonl:1: expected a JSON object per line, got list"),
]


@pytest.mark.parametrize("name, content, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_file_line_field(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        load_examples([str(path)])


def test_binary_and_non_utf8(tmp_path):
    (tmp_path / "bin.jsonl").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "latin.jsonl").write_bytes('{"question": "caf\xe9?", "answer": "A."}\n'.encode("latin-1"))
    with pytest.raises(UserError, match="bin.jsonl: binary file, not text"):
        load_examples([str(tmp_path / "bin.jsonl")])
    with pytest.raises(UserError, match=r"latin.jsonl:1: not UTF-8 text \(byte 0xe9\)"):
        load_examples([str(tmp_path / "latin.jsonl")])


def test_unicode_line_separators_inside_values_do_not_split_rows(tmp_path):
    # json.dumps(ensure_ascii=False) (and `specialize convert`) write U+2028/U+2029/U+0085 raw.
    answer = "Line one\u2028line two\u2029para\x85end."
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text(json.dumps({"question": "Q?", "answer": answer}, ensure_ascii=False) + "\r\n", encoding="utf-8")
    csv_file = tmp_path / "qa.csv"
    csv_file.write_text(f"question,answer\r\nQ?,{answer}\r\n", encoding="utf-8", newline="")
    for path in (jsonl, csv_file):
        [example] = load_examples([str(path)])
        assert example.messages[-1] == {"role": "assistant", "content": answer}


def test_utf16_with_bom_is_read_like_utf8(tmp_path):
    # Excel and PowerShell save "Unicode text" as UTF-16 with a byte-order mark.
    path = tmp_path / "faq.csv"
    path.write_bytes("question,answer\nCafé?,Open at 9.\n".encode("utf-16"))
    [example] = load_examples([str(path)])
    assert example.messages == [{"role": "user", "content": "Café?"}, {"role": "assistant", "content": "Open at 9."}]


def test_missing_path_and_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="nope.jsonl: no such file or folder"):
        load_examples([str(tmp_path / "nope.jsonl")])
    with pytest.raises(UserError, match="empty: folder holds no data files"):
        load_examples([str(tmp_path / "empty")])


def test_cli_bad_input_is_one_line_exit_2_no_model(tmp_path, tiny_llama):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?", "answer": "A."}\n{"question": "Q2?", "answer": null}\n', encoding="utf-8")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "specialize", "finetune", "--base", str(tiny_llama), "--data",
                           str(bad), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {bad}:2: field 'answer': is null"]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (out / "model").exists()


def test_hub_dataset_names_may_hold_dots():
    # "teknium/OpenHermes-2.5" is a dataset id, not a file with suffix ".5"; ".jsonl" names stay files.
    with pytest.raises(UserError, match=r"cannot load Hugging Face dataset 'someone/data-2.5' split 'train'"):
        load_examples(["someone/data-2.5"])
    with pytest.raises(UserError, match=r"someone/data.jsonl: no such file or folder"):
        load_examples(["someone/data.jsonl"])


def test_hub_dataset_name_fails_cleanly_offline():
    # Tests never download (HF_HUB_OFFLINE=1): the hub path must still end in one clear line.
    with pytest.raises(UserError, match=r"cannot load Hugging Face dataset 'no-such-owner/no-such-data' split 'train'"):
        load_examples(["no-such-owner/no-such-data"])
