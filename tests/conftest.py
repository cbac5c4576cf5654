"""Shared fixtures: tiny models built from a config with tokenizers trained in-process.

Nothing here downloads. Each base is saved as a plain HF folder, exactly what a user would
pass as `--base`.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from specialize.tokenizer import train_bpe

ASSETS = Path(__file__).parent / "assets"
QA8 = ASSETS / "qa8.jsonl"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)


def _corpus() -> list[str]:
    """Text to train the test tokenizers on: the Q&A assets plus some stdlib docstrings."""
    import collections
    import json as json_module
    import pathlib

    texts = [line for line in QA8.read_text(encoding="utf-8").splitlines()]
    for module in (collections, json_module, pathlib, inspect, os):
        texts.append(inspect.getdoc(module) or "")
        texts.extend(inspect.getdoc(getattr(module, n)) or "" for n in sorted(dir(module)) if not n.startswith("_"))
    texts.append("### Question:\n### Answer:\n<|im_start|>user assistant system\n")
    return texts


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    train_bpe(_corpus(), vocab_size=512).save_pretrained(path)
    return path


def _save_llama(path: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer Llama with its own pad token."""
    return _save_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer GPT-2 whose tokenizer pads with its EOS token (the classic EOS-never-trained trap)."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.pad_token = tokenizer.eos_token
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=512,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
