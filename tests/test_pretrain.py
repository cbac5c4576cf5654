"""Pre-training from random weights: exact blocks, a real drop in held-out loss, and a run folder
that plain transformers and `specialize finetune --base RUN` both load.

One small run (the `micro` size on ~150 KB of stdlib docstrings) is shared by the module; the
input-shape tests train for a single step.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer
from typer.testing import CliRunner

from helpers import QA8, write_jsonl
from specialize.cli import app
from specialize.config import PretrainConfig, load_config
from specialize.data.tokenize import IGNORE
from specialize.errors import UserError
from specialize.model import build_config, build_model, load_model, load_tokenizer
from specialize.pretrain import (pack_blocks, pretrain, read_documents, split_blocks, split_held_out, to_items,
                                 tokenize_documents)
from specialize.train import evaluate_loss, make_accelerator

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 64
# The shared run: 40 steps of 8 blocks x 64 tokens (~20k tokens) halve the held-out perplexity.
BASE_RUN = dict(max_steps=40, micro_batch_size=8, learning_rate=5e-3, eval_fraction=0.03)


DOC_MODULES = ("argparse", "collections", "csv", "datetime", "email.message", "functools", "itertools", "json",
               "logging", "os", "pathlib", "re", "shutil", "string", "subprocess", "textwrap", "typing", "unittest")


def _stdlib_docs(limit_chars: int = 150_000) -> dict[str, str]:
    """One document per stdlib module (its docstring and its public callables'), ~`limit_chars` in all."""
    docs, total = {}, 0
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        parts = [inspect.getdoc(module) or ""]
        parts += [inspect.getdoc(getattr(module, member)) or "" for member in sorted(vars(module))
                  if not member.startswith("_") and callable(getattr(module, member))]
        docs[name] = "\n\n".join(p for p in parts if p)
        total += len(docs[name])
        if total >= limit_chars:
            break
    return docs


def _config(tmp: Path, data: list[str], **overrides) -> PretrainConfig:
    values = dict(data=data, out=tmp / "run", size="micro", vocab_size=512, max_seq_tokens=BLOCK,
                  micro_batch_size=16, max_steps=1, eval_fraction=0.05, progress=False, seed=0)
    return PretrainConfig(**(values | overrides))


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """A folder of text: .txt files at the top, .md files in a subfolder."""
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "more").mkdir()
    for i, (name, text) in enumerate(_stdlib_docs().items()):
        path = folder / "more" / f"{name}.md" if i % 2 else folder / f"{name}.txt"
        path.write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, corpus_dir) -> Path:
    tmp = tmp_path_factory.mktemp("pretrain")
    return pretrain(_config(tmp, [str(corpus_dir)], **BASE_RUN))


def _summary(run: Path) -> dict:
    return json.loads((run / "train_summary.json").read_text(encoding="utf-8"))


# --- blocks -------------------------------------------------------------------------------------


def test_blocks_put_eos_between_documents_and_drop_only_the_last_partial_block():
    docs = [[5, 6, 7], [8], [], [9, 10, 11, 12, 13]]  # the empty document adds no EOS
    packed = pack_blocks(docs, eos_id=0, block_tokens=4)
    assert packed.blocks == [[5, 6, 7, 0], [8, 0, 9, 10], [11, 12, 13, 0]]
    assert (packed.documents, packed.stream_tokens, packed.dropped_tokens) == (3, 12, 0)

    packed = pack_blocks(docs, eos_id=0, block_tokens=5)
    assert packed.blocks == [[5, 6, 7, 0, 8], [0, 9, 10, 11, 12]]
    assert packed.dropped_tokens == 2  # "13, EOS" did not fill a block


def test_items_train_every_token_but_the_first_of_a_block():
    (item,) = to_items([[5, 6, 7, 0]])
    assert item.input_ids == [5, 6, 7, 0]
    assert item.labels == [IGNORE, 6, 7, 0]
    assert item.target_tokens == 3


def test_held_out_documents_share_no_block_with_training():
    docs = [[100 + d] * (3 + d % 4) for d in range(20)]  # document d is made of token 100 + d only
    split = split_held_out(docs, eos_id=0, block_tokens=4, fraction=0.2, seed=1)
    assert split.by == "documents" and split.documents == 20
    held_tokens = {t for b in split.eval for t in b} - {0}
    train_tokens = {t for b in split.train for t in b} - {0}
    assert len(held_tokens) == 4 and not held_tokens & train_tokens  # 4 whole documents, in no training block
    assert split_held_out(docs, 0, 4, 0.2, seed=1) == split  # seeded
    assert (len(split.train) + len(split.eval)) * 4 + split.dropped_tokens == split.stream_tokens
    # One long document (a single text file): blocks are held out instead, and it says so.
    one = split_held_out([list(range(1, 200))], eos_id=0, block_tokens=4, fraction=0.1, seed=0)
    assert one.by == "blocks" and len(one.eval) == 5
    assert split_held_out(docs, 0, 4, 0.0, seed=0).by == "none"


def test_held_out_blocks_are_seeded_and_need_ten_blocks():
    blocks = [[i] * 4 for i in range(40)]
    assert split_blocks(blocks[:9], 0.5, seed=0) == (blocks[:9], [])  # too few to hold any out
    assert len(split_blocks(blocks[:10], 0.01, seed=0)[1]) == 1  # at least one
    assert len(split_blocks(blocks[:10], 0.99, seed=0)[0]) == 1  # and one left to train on
    train_a, held_a = split_blocks(blocks, 0.1, seed=3)
    assert split_blocks(blocks, 0.1, seed=3) == (train_a, held_a)
    assert len(held_a) == 4 and sorted(train_a + held_a) == sorted(blocks)
    assert split_blocks(blocks, 0.1, seed=4)[1] != held_a


def test_run_blocks_match_an_independent_tokenisation(base_run, corpus_dir):
    summary = _summary(base_run)
    tokenizer = load_tokenizer(base_run)
    documents = read_documents([str(corpus_dir)])
    # One document at a time, unbatched: the batched call in pretrain must give the same ids.
    per_doc = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in documents]
    assert tokenize_documents(tokenizer, documents) == per_doc
    stream = sum(len(ids) + 1 for ids in per_doc)  # + one EOS per document
    assert summary["documents"] == len(documents)
    assert summary["corpus_tokens"] == stream
    assert summary["held_out_by"] == "documents"  # each side packed on its own: two partial tails
    assert summary["train_blocks"] * BLOCK + summary["eval_blocks"] * BLOCK + summary["dropped_tokens"] == stream
    assert summary["dropped_tokens"] < 2 * BLOCK
    packed = pack_blocks(per_doc, tokenizer.eos_token_id, BLOCK)
    assert all(len(b) == BLOCK for b in packed.blocks)
    eos_total = sum(b.count(tokenizer.eos_token_id) for b in packed.blocks)
    assert eos_total == len(documents) - (stream % BLOCK > 0)  # the last EOS is in the dropped tail


def test_special_tokens_written_in_a_document_are_text(base_run):
    tokenizer = load_tokenizer(base_run)
    text = "A tokenizer ends documents with <|endoftext|> and pads with <|pad|>."
    [ids] = tokenize_documents(tokenizer, [text])
    assert tokenizer.eos_token_id not in ids and tokenizer.pad_token_id not in ids
    assert tokenizer.decode(ids) == text
    packed = pack_blocks([ids], tokenizer.eos_token_id, 4)
    assert sum(b.count(tokenizer.eos_token_id) for b in packed.blocks) <= 1  # only the one between documents


# --- training -----------------------------------------------------------------------------------


def test_pretraining_lowers_held_out_loss(base_run, corpus_dir):
    summary = _summary(base_run)
    # Recompute the held-out blocks and both losses from the run folder alone.
    tokenizer = load_tokenizer(base_run)
    cfg = _config(base_run.parent, [str(corpus_dir)], **BASE_RUN)
    split = split_held_out(tokenize_documents(tokenizer, read_documents(cfg.data)), tokenizer.eos_token_id, BLOCK,
                           cfg.eval_fraction, cfg.seed)
    held = to_items(split.eval)
    assert len(held) == summary["eval_blocks"] > 0
    accelerator = make_accelerator("fp32")
    run_cfg = cfg.model_copy(update={"packing": False})
    random_init = build_model(build_config("micro", tokenizer, max_positions=2048), seed=cfg.seed)
    initial = evaluate_loss(random_init, held, run_cfg, accelerator, tokenizer.pad_token_id)
    trained = evaluate_loss(load_model(base_run), held, run_cfg, accelerator, tokenizer.pad_token_id)
    assert initial == pytest.approx(summary["initial_eval_loss"], abs=1e-4)
    assert trained == pytest.approx(summary["eval_loss"], abs=1e-4)
    assert initial > 6.0  # ~ln(vocab): a random model knows nothing
    assert trained < initial - 0.75, (initial, trained)  # perplexity more than halved
    assert summary["eval_perplexity"] == pytest.approx(2.718281828 ** summary["eval_loss"], rel=1e-6)
    assert summary["tokens"] == 40 * 8 * (BLOCK - 1) and summary["seconds"] > 0 and summary["parameters"] > 0


def test_run_folder_is_a_base_model_without_chat_template(base_run):
    assert yaml.safe_load((base_run / "config.yaml").read_text())["packing"] is False
    rows = [json.loads(line) for line in (base_run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in row for row in rows) and rows[0]["step"] == 1
    model_dir = base_run / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in model_dir.iterdir()}
    assert not (model_dir / "chat_template.jinja").exists()
    assert json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template") is None
    generation = json.loads((model_dir / "generation_config.json").read_text())
    tokenizer = load_tokenizer(base_run)
    assert generation["eos_token_id"] == tokenizer.eos_token_id
    assert generation["pad_token_id"] == tokenizer.pad_token_id != tokenizer.eos_token_id


PLAIN_TRANSFORMERS = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
inputs = tokenizer("Return the", return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
print(json.dumps({"new_tokens": out.shape[1] - inputs["input_ids"].shape[1],
                  "chat_template": tokenizer.chat_template,
                  "specialize_imported": any(m.split(".")[0] == "specialize" for m in sys.modules)}))
"""


def test_output_loads_and_generates_in_plain_transformers(base_run, tmp_path):
    done = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(base_run / "model")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"new_tokens": 5, "chat_template": None, "specialize_imported": False}


def test_finetune_accepts_the_pretrain_run_as_base(base_run, tmp_path):
    out = tmp_path / "ft"
    result = CliRunner().invoke(app, ["finetune", "--base", str(base_run), "--data", str(QA8), "--out", str(out),
                                      "--max-steps", "2", "--micro-batch-size", "4"])
    assert result.exit_code == 0, result.output
    summary = _summary(out)
    assert summary["template"] == "qa"  # the base has no chat template
    assert summary["base_model_dir"] == str(base_run / "model")
    assert (out / "model" / "model.safetensors").is_file()


def test_resume_reuses_the_token_files_and_refuses_changed_text(tmp_path):
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in _stdlib_docs().values()])
    first = pretrain(_config(tmp_path, [str(data)], max_steps=2, save_every=1, micro_batch_size=4))
    files = {p.name for p in (first / "data").iterdir()}
    assert files == {"train.bin", "eval.bin", "shards.json"} and _summary(first)["data_dir"] == str(first / "data")
    os.utime(first / "data" / "train.bin", ns=(1, 1))  # re-tokenising would rewrite it
    vocab = load_tokenizer(first).get_vocab()
    resumed = pretrain(_config(tmp_path, [str(data)], max_steps=3, save_every=1, micro_batch_size=4, resume=True))
    assert (resumed / "data" / "train.bin").stat().st_mtime_ns == 1
    assert _summary(resumed)["steps"] == 3 and load_tokenizer(resumed).get_vocab() == vocab

    data.write_text(data.read_text(encoding="utf-8").replace("the", "a"), encoding="utf-8")
    with pytest.raises(UserError, match="cannot resume from .*step-\\d+: the training data or its tokenisation changed"):
        pretrain(_config(tmp_path, [str(data)], max_steps=4, save_every=1, micro_batch_size=4, resume=True))


# --- inputs -------------------------------------------------------------------------------------


def test_jsonl_text_rows(tmp_path):
    rows = [{"text": text} for text in _stdlib_docs(40_000).values()] + [{"text": "   "}]
    data = write_jsonl(tmp_path / "docs.jsonl", rows)
    summary = _summary(pretrain(_config(tmp_path, [str(data)])))
    assert summary["documents"] == len(rows) - 1  # the blank row is skipped
    assert summary["steps"] == 1


def test_jsonl_without_text_names_file_and_field(tmp_path):
    with pytest.raises(UserError, match=r"qa8\.jsonl:1: field 'text': missing \(found keys: answer, question\)"):
        pretrain(_config(tmp_path, [str(QA8)]))


def test_text_shorter_than_one_block_is_a_user_error(tmp_path, tokenizer_dir):
    (tmp_path / "short.txt").write_text("just a few words", encoding="utf-8")
    with pytest.raises(UserError, match="less than one block"):
        pretrain(_config(tmp_path, [str(tmp_path / "short.txt")], tokenizer=str(tokenizer_dir)))


def test_config_json_size_and_existing_tokenizer(tmp_path, tokenizer_dir):
    size = tmp_path / "gpt2.json"
    size.write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 128}))
    text = tmp_path / "text.md"
    text.write_text("\n\n".join(_stdlib_docs(20_000).values()), encoding="utf-8")
    run = pretrain(_config(tmp_path, [str(text)], size=str(size), tokenizer=str(tokenizer_dir)))
    config = json.loads((run / "model" / "config.json").read_text())
    assert (config["model_type"], config["n_embd"], config["n_positions"]) == ("gpt2", 32, 128)
    assert not (run / "tokenizer").exists()  # nothing trained: the given tokenizer is used as is
    assert load_tokenizer(run).get_vocab() == AutoTokenizer.from_pretrained(tokenizer_dir).get_vocab()

    size.write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 32}))
    with pytest.raises(UserError, match="32 positions, fewer than --max-seq-tokens 64"):
        pretrain(_config(tmp_path, [str(text)], size=str(size), tokenizer=str(tokenizer_dir)))


def test_shipped_recipe_starts_with_its_command_and_loads():
    recipe = ROOT / "configs" / "pretrain_tiny.yaml"
    lines = recipe.read_text(encoding="utf-8").splitlines()
    assert "specialize pretrain --config configs/pretrain_tiny.yaml" in lines[0]
    cfg = load_config(PretrainConfig, recipe)
    assert cfg.size == "tiny"
    keys = [line for line in lines if line and not line.startswith((" ", "#", "-"))]
    assert keys and all("#" in line for line in keys), "every key carries a comment"
