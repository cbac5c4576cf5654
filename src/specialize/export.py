"""`specialize export`: a run as a standalone Hugging Face folder, LoRA merged into the base.

    specialize export --model runs/faq --out exports/faq [--gguf]
    vllm serve exports/faq                                   # an OpenAI-compatible server at scale
    ollama create faq -f exports/faq/Modelfile               # Ollama, prompting as in training

The folder needs neither peft nor specialize: safetensors weights, config.json,
generation_config.json, and the tokenizer with the run's chat template, so plain transformers
and vLLM render the training prompt from `apply_chat_template` alone. Next to the weights, an Ollama
`Modelfile` (specialize.ollama): the chat template translated to Ollama's Go template, the run's
default system message, and a stop for every end token. With `--gguf`, llama.cpp's converter
writes `<out>/<name>.gguf` and the Modelfile imports that; without the converter, the exact
command is printed.

Before it is published, a parity check compares greedy answers to prompts from the run's
training data on the run and on the export. It is written to a hidden temporary sibling and
renamed to `out` only when every answer is identical; an export that answers differently is a
failure, kept for inspection at `<out>.parity-failed` and never at `out`.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig

from specialize.config import ExportConfig
from specialize.data.formats import load_examples
from specialize.errors import UserError
from specialize.rundir import RunDir
from specialize.files import write_atomic
from specialize.generate import Generator
from specialize.model import (
    adapter_base,
    is_adapter,
    load_model,
    load_tokenizer,
    model_dir,
    set_generation_ids,
)
from specialize.ollama import convert_to_gguf, modelfile, translate

MARKER = "specialize_export.json"  # marks a folder we wrote, so a re-export may replace it
PARITY_TOKENS = 64  # answer length compared by the parity check
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GENERIC_PROMPTS = ["Hello! What can you help me with?", "Summarise what you know in one sentence.",
                   "What is the most common question you are asked?", "Explain your main topic to a beginner.",
                   "Give me three short tips.", "What should I do first?", "Is there anything I should avoid?",
                   "Thank you!"]


def parity_conversations(ref: str | Path, n: int) -> list[list[dict[str, str]]]:
    """Up to `n` prompts from the run's training data, as trained; generic ones when it has none.

    Training prompts are where a fine-tuned model is most confident and most often used, so a
    difference there matters; the data is read through the run's `config.yaml`.
    """
    if n <= 0:
        return []
    conversations: list[list[dict[str, str]]] = []
    try:
        config = RunDir(ref).read_config()
        for example in load_examples(list(config.get("data") or []), config.get("system_prompt")):
            if example.messages and any(m["role"] == "assistant" for m in example.messages):
                prompt = example.prompt_messages
                if prompt and prompt not in conversations:
                    conversations.append(prompt)
            if len(conversations) >= n:
                break
    except (OSError, UserError, yaml.YAMLError, AttributeError, TypeError):
        pass  # not a run, or its data moved: fall back to generic prompts
    return conversations or [[{"role": "user", "content": p}] for p in GENERIC_PROMPTS[:n]]


def _stored_dtype(ref: str, trust_remote_code: bool) -> torch.dtype:
    """The dtype the run's weights are stored in (its base's, for LoRA; the first full base, for LoRA on LoRA)."""
    path = model_dir(ref)
    while is_adapter(path):
        path = model_dir(adapter_base(path))
    try:
        dtype = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).dtype
    except (OSError, ValueError):
        return torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _answers(ref: str | Path, conversations: list[list[dict[str, str]]], trust_remote_code: bool) -> list[str]:
    """Greedy answers in fp32, with the model freed afterwards (one model in memory at a time).

    Both sides run in fp32 whatever the device: on a GPU the default bf16 would add its own
    rounding noise, and a mismatch should only ever mean that the export changed the model.
    """
    generator = Generator.load(ref, trust_remote_code=trust_remote_code, precision="fp32")
    texts = [c.text for c in generator.generate(conversations, max_new_tokens=PARITY_TOKENS, temperature=0.0)]
    del generator
    _free()
    return texts


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _write(cfg: ExportConfig, folder: Path, dtype: torch.dtype) -> str:
    """Merge (LoRA) or re-save (full) the run into `folder`; returns what was done."""
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    # Merge in fp32 and cast once at the end: merging in bf16 would round W + BA twice.
    adapter = is_adapter(cfg.model)
    # A plain transformers model, any LoRA merged: W <- W + (alpha / r) * B @ A.
    model = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, dtype=torch.float32, merge_adapter=True)
    model = model.to(dtype)
    # Stop where the run stops (the tokenizer's EOS and any end-of-turn token the base's
    # generation_config lists), pad with the run's pad token: what vLLM and transformers read.
    set_generation_ids(model, tokenizer)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del model
    _free()
    if not getattr(load_tokenizer(folder), "chat_template", None):
        raise UserError(f"the run's tokenizer has no chat template, so the export could not carry one: {cfg.model}")
    return "LoRA merged into the base" if adapter else "full weights re-saved"


def _model_card(cfg: ExportConfig, out: Path, how: str, dtype: torch.dtype, parity: str) -> str:
    name = out.name
    return f"""# {name}

Exported by `specialize export` from `{cfg.model}` ({how}, {str(dtype).removeprefix('torch.')}).
Greedy parity with the run: {parity}. The chat template used in training is the tokenizer's.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
folder = "{name}"  # the path of this folder
tok, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
text = tok.apply_chat_template([{{"role": "user", "content": "Hi"}}], tokenize=False, add_generation_prompt=True)
ids = tok(text, add_special_tokens=False, return_tensors="pt")  # the template already has any BOS
out = model.generate(**ids, max_new_tokens=128, do_sample=False)
print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
```

Serve: `vllm serve {name}`. Ollama: `ollama create {name} -f {name}/Modelfile`.
GGUF: `python llama.cpp/convert_hf_to_gguf.py {name} --outfile {name}/{name}.gguf`.
"""


def _write_modelfile(cfg: ExportConfig, folder: Path, name: str, weights: str = ".") -> dict:
    """The Ollama Modelfile for the exported `folder`; returns what the marker file records about it."""
    translation = translate(load_tokenizer(folder, cfg.trust_remote_code))
    try:
        text = modelfile(str(cfg.model), translation, weights, name)
    except UserError as e:  # a system message Ollama cannot quote: no Modelfile rather than a wrong one
        return {"modelfile": None, "why": str(e)}
    write_atomic(folder / "Modelfile", text)
    return {"modelfile": "Modelfile", "template": translation.layout or None, "why": translation.why or None,
            "from": weights}


def _publish(tmp: Path, dest: Path) -> None:
    """Move `tmp` to `dest`, replacing a previous export there; `dest` is never half-written."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def export(cfg: ExportConfig) -> Path:
    """Export the run to `cfg.out` after a parity check; returns the folder."""
    if not cfg.model:
        raise UserError("no run given (use --model RUN)")
    out = Path(cfg.out)
    if out.exists() and not (out / MARKER).is_file():
        raise UserError(f"{out} exists and is not a specialize export; remove it or choose another --out")
    if not getattr(load_tokenizer(cfg.model, cfg.trust_remote_code), "chat_template", None):
        raise UserError(f"{cfg.model} has no chat template to export (a pre-trained base has none: its model/ "
                        "folder is already a plain HF folder to use as it is)")
    out.parent.mkdir(parents=True, exist_ok=True)
    dtype = _stored_dtype(cfg.model, cfg.trust_remote_code) if cfg.dtype == "auto" else DTYPES[cfg.dtype]

    conversations = parity_conversations(cfg.model, cfg.parity_prompts)
    before = _answers(cfg.model, conversations, cfg.trust_remote_code) if conversations else []
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier export
    how = _write(cfg, tmp, dtype)
    after = _answers(tmp, conversations, cfg.trust_remote_code) if conversations else []

    same = sum(a == b for a, b in zip(before, after))
    parity = f"{same}/{len(conversations)} identical" if conversations else "skipped (--parity-prompts 0)"
    info = {"source": str(cfg.model), "method": how, "dtype": str(dtype).removeprefix("torch."), "parity": parity,
            "prompts": [{"messages": c, "run": b, "export": a} for c, b, a in zip(conversations, before, after)]}
    info["ollama"] = _write_modelfile(cfg, tmp, out.name)
    (tmp / MARKER).write_text(json.dumps(info, indent=2), encoding="utf-8")
    (tmp / "README.md").write_text(_model_card(cfg, out, how, dtype, parity), encoding="utf-8")

    if same != len(conversations):
        failed = out.with_name(out.name + ".parity-failed")
        _publish(tmp, failed)
        i = next(i for i, (b, a) in enumerate(zip(before, after)) if a != b)
        hint = "" if dtype == torch.float32 else f"; rounding the merged weights to {info['dtype']} can do this, " \
            "--dtype fp32 exports them unrounded"
        raise UserError(f"parity: {parity}: the export answers differently from the run (prompt {i + 1}: run "
                        f"{before[i]!r}, export {after[i]!r}){hint}; kept for inspection at {failed}, nothing "
                        f"written to {out} (details in {failed / MARKER})")
    _publish(tmp, out)
    print(f"exported {cfg.model} -> {out} ({how}, {info['dtype']})")
    print(f"parity: {parity}")
    ollama = info["ollama"]
    if ollama["modelfile"] is None:
        print(f"ollama: no Modelfile: {ollama['why']}")
    elif ollama["why"]:
        print(f"ollama: {out / 'Modelfile'} has no TEMPLATE: the chat template could not be translated "
              f"({ollama['why']}); Ollama would prompt the model unlike its training")
    else:
        print(f"ollama: {out / 'Modelfile'} (template: {ollama['template']}); ollama create {out.name} -f "
              f"{out / 'Modelfile'}")
    if cfg.gguf and (gguf := convert_to_gguf(out, info["dtype"])) is not None:
        if ollama["modelfile"] is not None:
            info["ollama"] = _write_modelfile(cfg, out, out.name, f"./{gguf.name}")
            write_atomic(out / MARKER, json.dumps(info, indent=2))
        print(f"gguf: {gguf}" + (" (the Modelfile imports it)" if ollama["modelfile"] is not None else ""))
    return out
