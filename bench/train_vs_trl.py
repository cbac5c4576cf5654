"""specialize's fine-tuning loop vs TRL's SFTTrainer on CPU: same model, data and hyperparameters.

    python bench/train_vs_trl.py                     # 3 rounds + a torch.compile run, ~5 min on 2 cores
    python bench/train_vs_trl.py --threads 2 --no-compile

Both sides run as whole processes (`python -m specialize finetune` and a small SFTTrainer
script), timed from launch to exit, one after the other, on the same tiny Llama (hidden 128,
4 layers, vocabulary 2048, built from a config with a tokenizer trained here) and the same
379 variable-length Q&A pairs from stdlib docstrings (27..165 tokens), for one epoch:
micro-batch 16 sequences, no accumulation, lr 1e-3 cosine without warmup, clipping 1.0, AdamW
fused, fp32, loss on answer tokens + EOS only. TRL runs without packing, with packing (its
default "bfd" strategy, which forces padding-free rows; the batch size is set so a step holds
about as many tokens as 16 sequences) and padding-free without packing. TRL documents
padding-free as FlashAttention-only; with transformers 5 on CPU, SDPA builds the same
block-diagonal mask from position_ids, and the losses below show it trains correctly.

"final loss" is the mean answer-token loss of each final model over the whole training set,
computed by one function here (the logged last-step losses are noisy and normalised
differently). The ratio is TRL's fastest configuration's seconds divided by specialize's
(packing on, its default), paired within each round, so that a load change on a shared machine
hits both; rounds interleave all systems.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

MICRO_BATCH, MAX_SEQ_TOKENS, LEARNING_RATE, SEED = 16, 192, 1e-3, 42

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
# The tiny model: Llama, hidden 128, 4 layers, 4 heads, MLP 512 (vocabulary 2048 from the tokenizer).
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


def build_workspace(folder: Path, n_examples: int = 400, vocab_size: int = 2048) -> dict[str, Path]:
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


def timed(command: list[str], env: dict, what: str) -> float:
    """Seconds one whole process takes, from launch to exit (start-up and imports included)."""
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-3000:]}")
    return seconds


def run_specialize(ws: dict[str, Path], out: Path, env: dict, epochs: float, **extra) -> dict:
    config = out.with_suffix(".yaml")
    values = dict(base=str(ws["base"]), data=[str(ws["data"])], out=str(out), epochs=epochs,
                  micro_batch_size=MICRO_BATCH, grad_accum_steps=1, max_seq_tokens=MAX_SEQ_TOKENS,
                  learning_rate=LEARNING_RATE, lr_schedule="cosine", warmup_steps=0, max_grad_norm=1.0,
                  weight_decay=0.0, seed=SEED, eval_fraction=0.0, precision="fp32", template="qa", progress=False,
                  allow_data_errors=True, **extra)
    config.write_text(json.dumps(values), encoding="utf-8")  # JSON is YAML
    seconds = timed([sys.executable, "-m", "specialize", "finetune", "--config", str(config)], env, "specialize")
    summary = json.loads((out / "train_summary.json").read_text(encoding="utf-8"))
    return {"process_s": seconds, "train_s": summary["seconds"], "last_loss": summary["train_loss"],
            "steps": summary["steps"], "model": out / "model", "packed": summary.get("packed")}


def run_trl(ws: dict[str, Path], out: Path, env: dict, epochs: float, mode: str, mean_tokens: float) -> dict:
    job = {"base": str(ws["base"]), "prompts": str(ws["prompts"]), "out": str(out), "epochs": epochs, "mode": mode,
           "rows_per_step": max(1, round(MICRO_BATCH * mean_tokens / MAX_SEQ_TOKENS))}
    seconds = timed([sys.executable, __file__, "--trl-worker", json.dumps(job)], env, f"TRL ({mode})")
    result = json.loads((out / "result.json").read_text(encoding="utf-8"))
    return {"process_s": seconds, "train_s": result["train_s"], "last_loss": result["last_loss"],
            "steps": result["steps"], "model": out / "model", "batch": result["batch"]}


def trl_worker(job: dict) -> None:
    """Runs in its own process: SFTTrainer on prompt/completion data, completion-only loss."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(job["base"])
    model = AutoModelForCausalLM.from_pretrained(job["base"], dtype=torch.float32)
    dataset = load_dataset("json", data_files=job["prompts"], split="train")
    mode = job["mode"]
    batch = job["rows_per_step"] if mode == "packing" else MICRO_BATCH
    args = SFTConfig(
        output_dir=job["out"], num_train_epochs=job["epochs"], per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, learning_rate=LEARNING_RATE, lr_scheduler_type="cosine", warmup_steps=0,
        max_grad_norm=1.0, weight_decay=0.0, seed=SEED, completion_only_loss=True,
        packing=mode == "packing", padding_free=mode == "padding_free",
        max_length=None if mode == "padding_free" else MAX_SEQ_TOKENS,  # TRL refuses max_length with padding_free alone
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, logging_steps=1, save_strategy="no",
        report_to="none", dataloader_num_workers=0, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    output = trainer.train()
    trainer.save_model(str(Path(job["out"]) / "model"))
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    Path(job["out"], "result.json").write_text(json.dumps({
        "train_s": output.metrics["train_runtime"], "last_loss": losses[-1], "steps": trainer.state.global_step,
        "batch": batch}), encoding="utf-8")


def final_loss(model_dir: Path, ws: dict[str, Path]) -> float:
    """Mean answer-token loss of a saved model over the whole training set (one function for all)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specialize.data.formats import load_examples
    from specialize.data.templates import resolve_template
    from specialize.data.tokenize import collate_padded, encode_examples, pad_token_id
    from specialize.train import token_loss_sum

    tokenizer = AutoTokenizer.from_pretrained(ws["base"])
    examples = load_examples([str(ws["data"])])
    items = encode_examples(examples, tokenizer, resolve_template("qa", tokenizer, set()), MAX_SEQ_TOKENS)[0]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(items), 32):
            batch = collate_padded(items[start: start + 32], pad_token_id(tokenizer))
            total += float(token_loss_sum(model, batch))
            tokens += batch.target_tokens
    return total / tokens


def data_tokens(ws: dict[str, Path]) -> tuple[int, int]:
    from transformers import AutoTokenizer

    from specialize.data.formats import load_examples
    from specialize.data.templates import resolve_template
    from specialize.data.tokenize import encode_examples

    tokenizer = AutoTokenizer.from_pretrained(ws["base"])
    items = encode_examples(load_examples([str(ws["data"])]), tokenizer, resolve_template("qa", tokenizer, set()),
                            MAX_SEQ_TOKENS)[0]
    return sum(len(i.input_ids) for i in items), len(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/specialize-bench-trl"), help="scratch folder")
    parser.add_argument("--examples", type=int, default=400, help="Q&A pairs (379 are available)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS for every run (1 is steadiest on a shared machine)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all systems; medians are reported")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile run (it takes minutes)")
    parser.add_argument("--trl-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        trl_worker(json.loads(args.trl_worker))
        return

    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    ws = build_workspace(args.work / "ws", args.examples)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent / "src"), os.environ.get("PYTHONPATH")]))}
    tokens, n = data_tokens(ws)
    print(f"data: {n} Q&A pairs, {tokens:,} tokens (mean {tokens / n:.1f}); {args.epochs:g} epoch(s); "
          f"OMP_NUM_THREADS={args.threads}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)

    plan = [("specialize (packing)", lambda o: run_specialize(ws, o, env, args.epochs)),
            ("specialize (no packing)", lambda o: run_specialize(ws, o, env, args.epochs, packing=False)),
            ("TRL SFTTrainer (no packing)", lambda o: run_trl(ws, o, env, args.epochs, "none", tokens / n)),
            ("TRL SFTTrainer (packing, bfd)", lambda o: run_trl(ws, o, env, args.epochs, "packing", tokens / n)),
            ("TRL SFTTrainer (padding_free)", lambda o: run_trl(ws, o, env, args.epochs, "padding_free", tokens / n))]
    # Rounds interleave the systems, so a load change on a shared machine hits all of them; medians reported.
    rounds: dict[str, list[dict]] = {name: [] for name, _ in plan}
    for round_index in range(args.repeats):
        for i, (name, run) in enumerate(plan):
            result = run(args.work / f"run{i}-{round_index}")
            rounds[name].append(result)
            print(f"  round {round_index + 1}: {name:32s} {result['process_s']:7.1f} s  train {result['train_s']:5.1f} s  "
                  f"steps {result['steps']:3d}", flush=True)
    if not args.no_compile:
        name = "specialize (packing, compile)"
        rounds[name] = [run_specialize(ws, args.work / "run-compile", env, args.epochs, compile=True)]
        print(f"  {name:41s} {rounds[name][0]['process_s']:7.1f} s", flush=True)
    runs: dict[str, dict] = {}
    for name, results in rounds.items():
        runs[name] = {key: statistics.median(r[key] for r in results) for key in ("process_s", "train_s", "last_loss")}
        runs[name]["final_loss"] = final_loss(results[0]["model"], ws)  # the same in every round (seeded)

    print(f"\nmedians of {args.repeats} round(s):\n{'system':32s} {'process s':>9s} {'train s':>8s} {'tokens/s':>9s} {'final loss':>10s} {'last logged':>11s}")
    for name, r in runs.items():
        print(f"{name:32s} {r['process_s']:9.1f} {r['train_s']:8.1f} {tokens * args.epochs / r['process_s']:9,.0f} "
              f"{r['final_loss']:10.4f} {r['last_loss']:11.4f}")
    ours = runs["specialize (packing)"]
    trl_names = [k for k in rounds if k.startswith("TRL")]
    trl_name = min(trl_names, key=lambda k: runs[k]["process_s"])
    # Paired per round (same load for both): TRL's fastest configuration in that round / specialize.
    process_ratios = [min(rounds[k][i]["process_s"] for k in trl_names) / rounds["specialize (packing)"][i]["process_s"]
                      for i in range(args.repeats)]
    loop_ratios = [min(rounds[k][i]["train_s"] for k in trl_names) / rounds["specialize (packing)"][i]["train_s"]
                   for i in range(args.repeats)]
    print(f"\nspecialize vs TRL's fastest configuration, per round: whole process "
          f"{' '.join(f'{r:.2f}x' for r in process_ratios)} (median {statistics.median(process_ratios):.2f}x); "
          f"training loop alone {' '.join(f'{r:.2f}x' for r in loop_ratios)} (median {statistics.median(loop_ratios):.2f}x)")
    trl = runs[trl_name]
    print(f"final loss: specialize {ours['final_loss']:.4f}, {trl_name} {trl['final_loss']:.4f} "
          f"({(ours['final_loss'] / trl['final_loss'] - 1):+.1%}); best TRL {min(runs[k]['final_loss'] for k in trl_names):.4f}")
    print("(tokens/s: every token of the data, prompt included, per whole-process second)")


if __name__ == "__main__":
    main()
