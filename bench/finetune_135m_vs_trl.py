"""`specialize finetune` vs TRL's SFTTrainer (+ PEFT) at the size people train: a SmolLM2-135M-shaped Llama.

    python bench/finetune_135m_vs_trl.py                          # ~300 pairs, LoRA and full, device auto
    python bench/finetune_135m_vs_trl.py --pairs 40 --methods lora  # a reduced epoch (CPU)
    python bench/finetune_135m_vs_trl.py --size tiny               # the harness itself in a minute

The model is built from a config with random weights (no download): Llama, 30 layers, hidden 576,
MLP 1536, 9 heads and 3 KV heads, vocabulary 49,152, tied embeddings (SmolLM2-135M's shape). The
tokenizer is a byte-level BPE trained here on the Q&A text; the model's vocabulary is padded to
49,152, so the output layer and the loss cost what they cost at that size.

Each side runs as a whole process, timed from launch to exit, one after the other, on the same
data for one epoch: micro-batch 8, no accumulation, length limit 256, lr 2e-4 (LoRA) or 2e-5
(full) cosine without warmup, clipping 1.0, loss on the answer tokens + EOS only; LoRA rank 16,
alpha 32, dropout 0.05 on every linear layer but the head. TRL runs with packing on and off and
its faster one is compared. Peak memory is each process's own peak RSS (`wait4`), and on CUDA
also `torch.cuda.max_memory_allocated` as the process reports it. The memory estimate is the one
`specialize finetune` prints before training. "final loss" is the mean answer-token loss of each
saved model over the training set, computed by one function for both.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train_vs_trl import docstring_pairs  # noqa: E402  the same stdlib-docstring Q&A pairs

MICRO_BATCH, MAX_SEQ_TOKENS, SEED = 8, 256, 42
LEARNING_RATE = {"lora": 2e-4, "full": 2e-5}
LORA = dict(rank=16, alpha=32, dropout=0.05)
SIZES = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152),
}


def build_workspace(folder: Path, pairs: int, size: str) -> dict[str, Path]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from specialize.tokenizer import train_bpe

    folder.mkdir(parents=True, exist_ok=True)
    rows = docstring_pairs(pairs)
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    prompts = folder / "prompts.jsonl"  # the `qa` template written out for TRL's prompt/completion form
    prompts.write_text("".join(json.dumps({"prompt": f"### Question:\n{r['question']}\n\n### Answer:\n",
                                           "completion": r["answer"]}) + "\n" for r in rows), encoding="utf-8")
    base = folder / f"base-{size}"
    if not (base / "model.safetensors").is_file():
        tokenizer = train_bpe([f"### Question:\n{r['question']}\n\n### Answer:\n{r['answer']}" for r in docstring_pairs(400)],
                              vocab_size=8192)
        config = LlamaConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             max_position_embeddings=2048, rope_theta=100000.0, tie_word_embeddings=True,
                             **SIZES[size])  # vocabulary padded to 49,152 beyond the tokenizer's ids
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(base)
        tokenizer.save_pretrained(base)
    return {"data": data, "prompts": prompts, "base": base}


def timed(command: list[str], env: dict, what: str) -> tuple[float, float, str]:
    """(seconds, peak RSS in MiB, output) of one whole process, from launch to exit."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss in KiB on Linux)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{output[-3000:]}")
    return seconds, usage.ru_maxrss / 1024, output


def run_specialize(ws: dict, out: Path, env: dict, method: str, device: str) -> dict:
    values = dict(base=str(ws["base"]), data=[str(ws["data"])], out=str(out), epochs=1, method=method,
                  micro_batch_size=MICRO_BATCH, grad_accum_steps=1, max_seq_tokens=MAX_SEQ_TOKENS,
                  learning_rate=LEARNING_RATE[method], lr_schedule="cosine", warmup_steps=0, max_grad_norm=1.0,
                  weight_decay=0.0, seed=SEED, eval_fraction=0.0, template="qa", progress=False,
                  lora_rank=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                  precision="fp32" if device == "cpu" else "auto", allow_data_errors=True)
    config = out.with_suffix(".yaml")
    config.write_text(json.dumps(values), encoding="utf-8")  # JSON is YAML
    seconds, rss, output = timed([sys.executable, "-m", "specialize", "finetune", "--config", str(config)], env,
                                 f"specialize ({method})")
    estimate = re.search(r"=\s+([\d.,]+)\s+(KB|MB|GB)\s+\(±", output)  # rich wraps lines anywhere
    scale = {"KB": 1 / 1024, "MB": 1, "GB": 1024}
    return {"process_s": seconds, "rss_mib": rss, "model": out / "model",
            "estimate_mib": float(estimate.group(1).replace(",", "")) * scale[estimate.group(2)] if estimate else None}


def run_trl(ws: dict, out: Path, env: dict, method: str, packing: bool, device: str) -> dict:
    job = {"base": str(ws["base"]), "prompts": str(ws["prompts"]), "out": str(out), "method": method,
           "packing": packing, "device": device}
    seconds, rss, _ = timed([sys.executable, __file__, "--trl-worker", json.dumps(job)], env,
                            f"TRL ({method}, packing {packing})")
    return {"process_s": seconds, "rss_mib": rss, "model": out / "model"}


def trl_inputs(job: dict) -> tuple:
    """(tokenizer, fp32 model, PEFT LoRA config or None) as every TRL worker of the benchmarks loads them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(job["base"])
    model = AutoModelForCausalLM.from_pretrained(job["base"], dtype=torch.float32)
    peft_config = None
    if job["method"] == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    return tokenizer, model, peft_config


def trl_worker(job: dict) -> None:
    """Runs in its own process: SFTTrainer (+ PEFT LoRA) on prompt/completion data, completion-only loss."""
    import torch
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    cuda = job["device"] == "cuda"
    tokenizer, model, peft_config = trl_inputs(job)
    args = SFTConfig(
        output_dir=job["out"], num_train_epochs=1, per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=1, learning_rate=LEARNING_RATE[job["method"]], lr_scheduler_type="cosine",
        warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0, seed=SEED, completion_only_loss=True,
        packing=job["packing"], max_length=MAX_SEQ_TOKENS, bf16=cuda and torch.cuda.is_bf16_supported(), fp16=False,
        use_cpu=not cuda, logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0,
        disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=load_dataset("json", data_files=job["prompts"],
                                                                             split="train"),
                         processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
    model = trainer.model.merge_and_unload() if job["method"] == "lora" else trainer.model
    model.save_pretrained(str(Path(job["out"]) / "model"))
    tokenizer.save_pretrained(str(Path(job["out"]) / "model"))


def final_loss(model_ref: Path, ws: dict) -> float:
    """Mean answer-token loss of a saved model (LoRA merged) over the training set."""
    import torch
    from transformers import AutoTokenizer

    from specialize.data.formats import load_examples
    from specialize.data.templates import resolve_template
    from specialize.data.tokenize import collate_padded, encode_examples, pad_token_id
    from specialize.model import load_model
    from specialize.train import token_loss_sum

    tokenizer = AutoTokenizer.from_pretrained(ws["base"])
    items = encode_examples(load_examples([str(ws["data"])]), tokenizer, resolve_template("qa", tokenizer, set()),
                            MAX_SEQ_TOKENS)[0]
    model = load_model(model_ref, merge_adapter=True).eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(items), 16):
            batch = collate_padded(items[start: start + 16], pad_token_id(tokenizer))
            total += float(token_loss_sum(model, batch))
            tokens += batch.target_tokens
    return total / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/specialize-bench-135m"), help="scratch folder")
    parser.add_argument("--pairs", type=int, default=300, help="Q&A pairs in the epoch")
    parser.add_argument("--size", choices=sorted(SIZES), default="135m", help="model shape")
    parser.add_argument("--methods", default="lora,full", help="comma-separated: lora, full")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP_NUM_THREADS for every run")
    parser.add_argument("--trl-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        trl_worker(json.loads(args.trl_worker))
        return
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    shutil.rmtree(args.work / "runs", ignore_errors=True)
    ws = build_workspace(args.work, args.pairs, args.size)
    (args.work / "runs").mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0") if device == "cuda" else "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent / "src"), os.environ.get("PYTHONPATH")]))}
    print(f"{args.size} Llama, {args.pairs} pairs, device {device}, OMP_NUM_THREADS={args.threads}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    for method in args.methods.split(","):
        runs = {"specialize": run_specialize(ws, args.work / "runs" / f"specialize-{method}", env, method, device)}
        for packing in (False, True):
            runs[f"TRL packing={packing}"] = run_trl(ws, args.work / "runs" / f"trl-{method}-{packing}", env, method,
                                                     packing, device)
        for name, run in runs.items():
            run["final_loss"] = final_loss(run["model"], ws)
            print(f"  {method:4s} {name:20s} {run['process_s']:8.1f} s  peak RSS {run['rss_mib']:8.0f} MiB  "
                  f"final answer loss {run['final_loss']:.4f}", flush=True)
        ours = runs["specialize"]
        trl_name = min((k for k in runs if k != "specialize"), key=lambda k: runs[k]["process_s"])
        trl = runs[trl_name]
        print(f"{method}: {trl['process_s'] / ours['process_s']:.2f}x faster than {trl_name} (target >= 1.5x); peak "
              f"RSS {ours['rss_mib'] / trl['rss_mib']:.2f}x TRL's (target <= 1); final loss "
              f"{ours['final_loss'] / trl['final_loss'] - 1:+.1%} (target within 5%)", flush=True)
        if ours["estimate_mib"]:
            print(f"{method}: printed estimate {ours['estimate_mib']:.0f} MiB vs measured peak RSS "
                  f"{ours['rss_mib']:.0f} MiB ({ours['estimate_mib'] / ours['rss_mib'] - 1:+.0%}; target within 25%; "
                  "RSS includes the Python/torch runtime the estimate leaves out)", flush=True)


if __name__ == "__main__":
    main()
