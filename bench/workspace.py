"""Shared bench fixtures: a tiny Llama built from a config and Q&A data from stdlib docstrings.

Nothing is downloaded: the tokenizer is trained here on the data itself, the model has random
weights from a seeded config. Used by `train_vs_trl.py` (and handy for profiling the loop):

    python bench/workspace.py /tmp/bench-ws      # writes data.jsonl, prompts.jsonl, base/
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
import sys
from pathlib import Path

MODULES = [
    "json", "os", "os.path", "collections", "pathlib", "inspect", "re", "string", "textwrap", "itertools",
    "functools", "math", "random", "shutil", "subprocess", "typing", "statistics", "heapq", "bisect", "csv",
    "datetime", "glob", "fnmatch", "hashlib", "base64", "zlib", "gzip", "tarfile", "zipfile", "tempfile", "time",
    "calendar", "copy", "pprint", "enum", "dataclasses", "operator", "contextlib", "io", "struct", "uuid",
    "urllib.parse", "html", "difflib", "fractions", "decimal", "logging", "argparse", "shlex", "threading", "queue",
    "unittest", "types", "weakref", "locale", "codecs", "secrets", "hmac", "email.utils", "mimetypes", "ast",
    "tokenize", "traceback", "warnings", "filecmp", "sched", "configparser", "graphlib", "ipaddress",
]
QUESTIONS = ["What does {name} do?", "Explain {name}.", "What is {name} for?", "Describe {name} in one sentence."]
# The tiny model the brief names: Llama, hidden 128, 4 layers, vocab 2048.
TINY_LLAMA = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True)


def docstring_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` question/answer pairs: a function's name → the first paragraph of its docstring."""
    pairs = []
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for attr in sorted(dir(module)):
            obj = getattr(module, attr, None)
            if attr.startswith("_") or not callable(obj) or getattr(obj, "__module__", None) != module.__name__:
                continue
            doc = inspect.getdoc(obj)
            if not doc:
                continue
            words = re.sub(r"\s+", " ", doc.split("\n\n")[0]).split()
            if len(words) < 10:
                continue
            pairs.append((f"{module_name}.{attr}", " ".join(words[:60])))
    pairs = list({answer: (name, answer) for name, answer in pairs}.values())  # one question per answer
    rng = random.Random(seed)
    rng.shuffle(pairs)
    return [{"question": rng.choice(QUESTIONS).format(name=name), "answer": answer} for name, answer in pairs[:n]]


def build(folder: Path, n_examples: int = 400, vocab_size: int = 2048) -> dict[str, Path]:
    """Write the data (Q&A and TRL prompt/completion forms) and the base model folder."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from specialize.tokenizer import train_bpe

    folder.mkdir(parents=True, exist_ok=True)
    rows = docstring_pairs(n_examples)
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    # The `qa` template, written out for TRL: prompt = everything before the answer.
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"### Question:\n{r['question']}\n\n### Answer:\n",
                                           "completion": r["answer"]}) + "\n" for r in rows), encoding="utf-8")
    base = folder / "base"
    if not (base / "model.safetensors").is_file():
        texts = [f"### Question:\n{r['question']}\n\n### Answer:\n{r['answer']}" for r in rows]
        tokenizer = train_bpe(texts, vocab_size=vocab_size)
        config = LlamaConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **TINY_LLAMA)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(base)
        tokenizer.save_pretrained(base)
    return {"data": data, "prompts": prompts, "base": base}


if __name__ == "__main__":
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/bench-ws")))
