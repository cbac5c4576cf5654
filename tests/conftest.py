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
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

from specialize.generate import Generator
from specialize.tokenizer import train_bpe

ASSETS = Path(__file__).parent / "assets"
QA8 = ASSETS / "qa8.jsonl"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Tiny models gain nothing from a second thread, and lose a lot when other jobs share the cores.
torch.set_num_threads(1)


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


@pytest.fixture(scope="session")
def qa8_run(tmp_path_factory, tiny_llama) -> Path:
    """One tiny full fine-tune on QA8 per session; it answers every QA8 question exactly."""
    from specialize.config import FinetuneConfig
    from specialize.finetune import finetune

    out = tmp_path_factory.mktemp("qa8-run") / "qa8"  # served as model "qa8"
    return finetune(FinetuneConfig(base=str(tiny_llama), data=[str(QA8)], out=out,
                                   epochs=150, learning_rate=5e-3, micro_batch_size=8, warmup_steps=0,
                                   progress=False))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def short_context_gpt2(tokenizer_dir, positions: int = 32):
    """An untrained 1-layer GPT-2 with a 32-token context: learned positions, so past it is an IndexError."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.pad_token = tokenizer.eos_token
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=positions,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    return Generator(AutoModelForCausalLM.from_config(config), tokenizer)
