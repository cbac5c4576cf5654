"""Helpers shared by the tests: asset paths, tiny model builders, small file writers.

Fixtures live in conftest.py; plain functions and constants live here, so test modules import
them by name (`from helpers import QA8`) instead of importing conftest.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

ASSETS = Path(__file__).parent / "assets"
QA8 = ASSETS / "qa8.jsonl"


def corpus() -> list[str]:
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


def save_llama(path: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with the tokenizer's own pad token, saved as a plain HF folder."""
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


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def short_context_gpt2(tokenizer_dir, positions: int = 32):
    """An untrained 1-layer GPT-2 with a 32-token context: learned positions, so past it is an IndexError."""
    from specialize.generate import Generator

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.pad_token = tokenizer.eos_token
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=positions,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    return Generator(AutoModelForCausalLM.from_config(config), tokenizer)
