"""`specialize eval` vs plain transformers `generate`, one question at a time, on the same 512 questions.

    python bench/eval_speed.py [--questions 512] [--max-new-tokens 32] [--workspace /tmp/bench-eval]

Both sides are whole processes, timed from start to exit (imports, model load, tokenization,
generation, and for specialize also scoring and writing metrics):
- baseline: a short script that loads the model with transformers and calls `model.generate`
  once per question (greedy, KV cache, stop at EOS) — the loop people write first;
- specialize: `specialize eval --model BASE --data questions.jsonl --json`.

The model is the tiny random-weight Llama of bench/train_vs_trl.py (hidden 128, 4 layers, its own
BPE tokenizer), so nothing is downloaded. Random weights rarely emit EOS, so every answer runs
to the `--max-new-tokens` cap on both sides: the same number of generated tokens (printed),
which makes the comparison about how they are generated. Prints both times and the ratio;
exits 1 if specialize is not at least 5x faster.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_vs_trl import build_workspace as build  # noqa: E402  (same tiny model and data)

TARGET_RATIO = 5.0

BASELINE = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_path, data_path, max_new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    rows = [json.loads(line) for line in open(data_path, encoding="utf-8")]
    generated = 0
    with torch.inference_mode():
        for row in rows:
            # the same `qa` prompt that specialize renders for a model without a chat template
            prompt = "### Question:\\n" + row["question"] + "\\n\\n### Answer:\\n"
            ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            new = out[0, ids["input_ids"].shape[1]:].tolist()
            if tok.eos_token_id in new:
                new = new[: new.index(tok.eos_token_id)]
            generated += len(new)
            tok.decode(new, skip_special_tokens=True)
    print(json.dumps({"n": len(rows), "completion_tokens": generated}))
""")


def timed(argv: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(argv[:4])} ...\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/bench-eval"))
    args = parser.parse_args()

    paths = build(args.workspace, n_examples=args.questions)
    rows = paths["data"].read_text(encoding="utf-8").splitlines()
    if len(rows) < args.questions:  # fewer documented functions than asked: repeat them
        rows = (rows * (args.questions // len(rows) + 1))[: args.questions]
    data = args.workspace / f"questions-{args.questions}.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")

    base_s, base_out = timed([sys.executable, "-c", BASELINE, str(paths["base"]), str(data),
                              str(args.max_new_tokens)])
    ours_s, ours_out = timed([sys.executable, "-m", "specialize", "eval", "--model", str(paths["base"]),
                              "--data", str(data), "--max-new-tokens", str(args.max_new_tokens), "--json"])
    base_tokens = json.loads(base_out)["completion_tokens"]
    ours = json.loads(ours_out)
    ours_tokens = round(ours["completion_tokens_per_example"] * ours["n"])
    ratio = base_s / ours_s
    print(f"questions: {args.questions}, max_new_tokens: {args.max_new_tokens}")
    print(f"plain transformers, one at a time: {base_s:7.1f} s  ({base_tokens} tokens generated)")
    print(f"specialize eval (batched):         {ours_s:7.1f} s  ({ours_tokens} tokens generated)")
    print(f"ratio: {ratio:.1f}x (target >= {TARGET_RATIO:.0f}x)")
    sys.exit(0 if ratio >= TARGET_RATIO else 1)


if __name__ == "__main__":
    main()
