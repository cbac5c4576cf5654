"""Shared fixtures: tiny models built from a config with tokenizers trained in-process.

Nothing here downloads. Each base is saved as a plain HF folder, exactly what a user would
pass as `--base`. Plain helpers (asset paths, builders, writers) are in helpers.py.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Before anything imports transformers or huggingface_hub: they read these once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# An empty Hugging Face home: a test that loads a hub id must not pass on one machine because
# that model happens to be in its user's cache; shipped model code (trust_remote_code tests) lands here too.
_HF_HOME = tempfile.mkdtemp(prefix="specialize-tests-hf-")
os.environ["HF_HOME"] = _HF_HOME
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config  # noqa: E402

from helpers import NETWORK_GUARD, QA8, corpus, save_llama  # noqa: E402
from specialize.tokenizer import train_bpe  # noqa: E402

# Tiny models gain nothing from a second thread, and lose a lot when other jobs share the cores.
torch.set_num_threads(1)

# From collection on, any connection beyond this machine (or DNS lookup of a name) is refused.
NETWORK_GUARD.install()


@pytest.fixture(autouse=True)
def _no_network():
    """Fail the test that tried the network, even when the library it called swallowed the refusal.

    Checked before the test too: collection and the session fixtures it set up run before this.
    """
    _fail_on_attempts()
    yield
    _fail_on_attempts()


def _fail_on_attempts() -> None:
    if attempts := NETWORK_GUARD.take_attempts():
        pytest.fail("tried the network: " + "; ".join(attempts), pytrace=False)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    train_bpe(corpus(), vocab_size=512).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer Llama with its own pad token."""
    return save_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer GPT-2 whose tokenizer pads with its EOS token (the classic EOS-never-trained trap)."""
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


@pytest.fixture
def plain_output(monkeypatch):
    """Rich treats FORCE_COLOR as a terminal; lint's plain ⟦ ⟧ output is what the lint tests pin."""
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
