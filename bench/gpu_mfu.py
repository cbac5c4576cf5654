"""Model FLOPs utilisation of specialize's training loop on one GPU, for a ~0.5B Llama-shaped model.

    python bench/gpu_mfu.py                      # bf16, packed Q&A-shaped sequences, 30 steps
    python bench/gpu_mfu.py --gradient-checkpointing --micro-batch-size 32
    python bench/gpu_mfu.py --attn flash_attention_2 --compile

The model is built from a config (Qwen2.5-0.5B's shape as a plain Llama: hidden 896, 24
layers, 14 heads / 2 KV heads, MLP 4864, vocabulary 151,936, tied embeddings; 494M
parameters), no download. The data are random token sequences of 128..1024 tokens whose first
30% is a masked prompt, like instruction data. Training goes through `specialize.train.train`
exactly as `specialize finetune` does (bf16 weights, bf16 autocast, fused AdamW, packing).

MFU = achieved model FLOP/s / the GPU's dense bf16 peak, where model FLOPs per token are
  6 x (parameters in matmuls, without the embedding lookup)         forward + backward
  + 12 x layers x heads x head_dim x S                               attention scores and values
S is the attention span: the token-weighted mean sequence length (PaLM, appendix B, no causal
discount). The output projection is counted only for target tokens, because the loop skips it
for prompt tokens (`logits_to_keep`): this is what the loss needs, so the number is
conservative next to reports that count it for every token.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

# dense bf16 tensor-core peak, TFLOP/s (no sparsity); the first name found in the device name wins
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H800", 989.0), ("H100", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("A10", 125.0), ("RTX 4090", 165.0), ("RTX A6000", 155.0), ("RTX 3090", 71.0),
]

QWEN_05B_SHAPE = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096)


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s for a CUDA device name (e.g. 'NVIDIA H100 80GB HBM3'), None if unknown."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None


def matmul_parameters(config) -> tuple[int, int]:
    """(parameters in the decoder layers' matmuls, parameters of the output projection) of a Llama config."""
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    attention = h * q + 2 * h * kv + q * h  # q, k, v, o projections (no biases in Llama)
    mlp = 3 * h * inter  # gate, up, down
    return layers * (attention + mlp), h * config.vocab_size


def flops_per_token(config, span: float) -> float:
    """Training FLOPs for one token whose output logits are computed (6N + attention)."""
    body, head = matmul_parameters(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * span
    return 6 * (body + head) + attention


def step_flops(config, lengths: list[int], target_tokens: int) -> float:
    """FLOPs of one optimizer step: every token through the body, target tokens through the head."""
    body, head = matmul_parameters(config)
    tokens = sum(lengths)
    span = sum(n * n for n in lengths) / max(tokens, 1)  # token-weighted mean sequence length
    return flops_per_token(config, span) * tokens - 6 * head * (tokens - target_tokens)


def mfu(flops: float, seconds: float, peak: float) -> float:
    return flops / seconds / peak


def synthetic_items(n: int, seed: int, vocab: int, shortest: int = 128, longest: int = 1024):
    """Q&A-shaped sequences: random tokens, first 30% a masked prompt, the rest trained."""
    from specialize.data.tokenize import IGNORE, Encoded

    rng = random.Random(seed)
    items = []
    for _ in range(n):
        length = rng.randint(shortest, longest)
        ids = [rng.randrange(vocab) for _ in range(length)]
        prompt = int(0.3 * length)
        items.append(Encoded(ids, [IGNORE] * prompt + ids[prompt:]))
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps to run")
    parser.add_argument("--warmup-steps", type=int, default=5, help="first steps left out of the timing")
    parser.add_argument("--micro-batch-size", type=int, default=16, help="sequences per micro-step")
    parser.add_argument("--grad-accum-steps", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, flash_attention_2, ...)")
    parser.add_argument("--no-packing", action="store_true", help="padded batches instead of packed rows")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense bf16 peak")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu_mfu: no CUDA device found; this benchmark measures GPU utilisation and needs one GPU. "
              "(bench/train_vs_trl.py runs on CPU.)", file=sys.stderr)
        return 2
    from transformers import AutoModelForCausalLM, LlamaConfig

    from specialize.config import TrainConfig
    from specialize.train import plan_epoch, train

    name = torch.cuda.get_device_name()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(name)
    if peak is None:
        print(f"gpu_mfu: unknown peak for '{name}'; pass --peak-tflops (dense bf16)", file=sys.stderr)
        return 2
    config = LlamaConfig(**QWEN_05B_SHAPE, attn_implementation=args.attn)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda()
    params = sum(p.numel() for p in model.parameters())
    per_step = args.micro_batch_size * args.grad_accum_steps
    items = synthetic_items(per_step * args.steps, seed=0, vocab=config.vocab_size)
    cfg = TrainConfig(out=Path("/tmp/specialize-gpu-mfu"), max_steps=args.steps, micro_batch_size=args.micro_batch_size,
                      grad_accum_steps=args.grad_accum_steps, learning_rate=1e-5, warmup_steps=0, precision="bf16",
                      gradient_checkpointing=args.gradient_checkpointing, compile=args.compile,
                      packing=not args.no_packing, progress=False, save_every=10**9)

    stamps: dict[int, float] = {}
    train(model, items, [], cfg, cfg.out, pad_id=0, on_step=lambda step, row: stamps.__setitem__(step, time.perf_counter()))
    plan = plan_epoch(len(items), 0, cfg, 1)
    timed = range(args.warmup_steps, args.steps)  # step indices after warm-up (compile, allocator, autotune)
    flops = 0.0
    for s in timed:
        step_items = [items[i] for mb in plan[s] for i in mb]
        flops += step_flops(config, [len(x.input_ids) for x in step_items], sum(x.target_tokens for x in step_items))
    seconds = stamps[args.steps] - stamps[args.warmup_steps]
    tokens = sum(len(items[i].input_ids) for s in timed for mb in plan[s] for i in mb)
    memory = torch.cuda.max_memory_allocated() / 1e9
    print(f"device           {name} (dense bf16 peak {peak / 1e12:.0f} TFLOP/s)")
    print(f"model            Llama-shaped, {params / 1e6:.0f}M parameters, attention {args.attn}")
    print(f"batch            {args.micro_batch_size} x {args.grad_accum_steps} sequences of 128..1024 tokens, "
          f"packing {'off' if args.no_packing else 'on'}, gradient checkpointing {args.gradient_checkpointing}, "
          f"compile {args.compile}")
    print(f"throughput       {tokens / seconds:,.0f} tokens/s over {len(timed)} steps ({seconds:.1f} s)")
    print(f"achieved         {flops / seconds / 1e12:.1f} TFLOP/s")
    print(f"MFU              {mfu(flops, seconds, peak):.1%}")
    print(f"peak memory      {memory:.1f} GB allocated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
