"""The demo's preference figure: does tuning the demo's specialist on its own graded answers help?

    specialize demo --out runs/demo && python bench/demo_preference.py --demo runs/demo
    python bench/demo_preference.py --demo runs/demo --run-demo       # run the demo first (cold: minutes)
    python bench/demo_preference.py --closed-book-sft 150 --questions 300 --dpo-lrs 1e-4,5e-4 \
        --grpo-steps 20 --grpo-lr 5e-4 --out /tmp/pref                # what was measured on a busy CPU

1. the SFT run: the demo's fine-tuned run (`<demo>/finetuned`), or with `--closed-book-sft STEPS` a
   cheaper one: the demo's cached base fine-tuned on the demo's closed-book training questions only
   (no reading practice, no agent rows; the demo's learning rate and batch), for STEPS steps;
2. `specialize pairs` on it over the training questions (`--questions N`: every k-th, N in all): `--samples`
   answers each at temperature 1, graded by F1 against the reference;
3. `specialize finetune --objective dpo` from the SFT run on those pairs (full weights, one epoch,
   beta 0.1), once per `--dpo-lrs`; optionally `--objective grpo` on the same questions (`--grpo-steps`,
   reward f1, 16 prompts x 4 answers per step);
4. `specialize compare --runs sft=... --runs sft+dpo-LR=...` on the demo's seen and unseen splits,
   closed book (no RAG), with the demo's answer budget.

Prints a table (F1, EM, stop rate, hallucination rate per system and split) and one JSON line.
Every system is scored on the same test questions; none of them were used to pick anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

METRICS = ("f1", "exact_match", "stop_rate", "hallucination_rate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a finished `specialize demo --out`")
    parser.add_argument("--run-demo", action="store_true", help="run `specialize demo --out DEMO` first")
    parser.add_argument("--closed-book-sft", type=int, default=0,
                        help="instead of DEMO/finetuned: fine-tune the cached demo base on the closed-book "
                             "training questions for this many steps")
    parser.add_argument("--questions", type=int, default=0, help="pairs from N training questions, every k-th (0: all)")
    parser.add_argument("--out", type=Path, help="where pairs, runs and the comparison go (default DEMO/preference)")
    parser.add_argument("--samples", type=int, default=4, help="answers sampled per training question")
    parser.add_argument("--min-margin", type=float, default=0.1, help="pairs: smallest F1 difference")
    parser.add_argument("--dpo-lrs", default="1e-4,3e-4", help="comma-separated DPO learning rates (full weights)")
    parser.add_argument("--dpo-epochs", type=float, default=1.0)
    parser.add_argument("--grpo-steps", type=int, default=0, help="also GRPO for this many steps (0: off)")
    parser.add_argument("--grpo-lr", type=float, default=1e-4)
    parser.add_argument("--device-note", default="", help="free text recorded in the JSON line (machine)")
    args = parser.parse_args()

    from specialize.cache import default_cache_dir
    from specialize.config import CompareConfig, DemoConfig, FinetuneConfig, PairsConfig
    from specialize.demo import finetune_config, load_or_pretrain_base, run_demo
    from specialize.evaluate.compare import compare
    from specialize.examples.pydocs import load_or_build
    from specialize.finetune import finetune
    from specialize.pairs import make_pairs

    timings: dict[str, float] = {}
    started = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal started
        timings[stage] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()

    if args.run_demo:
        run_demo(DemoConfig(out=args.demo, progress=False))
        lap("demo")
    out = args.out or args.demo / "preference"
    out.mkdir(parents=True, exist_ok=True)
    if args.closed_book_sft:
        cfg = DemoConfig(out=out, finetune_steps=args.closed_book_sft, progress=False)
    else:
        card = json.loads((args.demo / "scorecard.json").read_text(encoding="utf-8"))
        cfg = DemoConfig(**card["demo"]["config"])
    data = load_or_build(default_cache_dir(), facts=cfg.facts, eval_examples=cfg.eval_examples, seed=cfg.seed,
                         progress=False, modules=cfg.modules)
    if args.closed_book_sft:
        base, _ = load_or_pretrain_base(cfg, data, default_cache_dir())
        sft = finetune(finetune_config(cfg, base, [data.train], out / "sft")).path
        lap("sft")
    else:
        sft = args.demo / "finetuned"
    questions = data.train
    if args.questions:
        questions = out / "questions.jsonl"
        lines = data.train.read_text(encoding="utf-8").splitlines()
        lines = lines[:: max(1, len(lines) // args.questions)][: args.questions]  # spread over all facts
        questions.write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    pairs = make_pairs(PairsConfig(model=str(sft), data=[str(questions)], samples=args.samples, grade="f1",
                                   min_margin=args.min_margin, temperature=1.0, max_new_tokens=cfg.max_new_tokens,
                                   batch_size=cfg.eval_batch_size, out=out / "pairs.jsonl", seed=cfg.seed,
                                   progress=False))
    lap("pairs")
    runs = [f"sft={sft}"]
    for lr in args.dpo_lrs.split(","):
        run = finetune(FinetuneConfig(base=str(sft), data=[str(pairs.out)], out=out / f"dpo-{lr}", objective="dpo",
                                      method="full", beta=0.1, learning_rate=float(lr), epochs=args.dpo_epochs,
                                      micro_batch_size=16, warmup_steps=0, seed=cfg.seed, progress=False))
        runs.append(f"sft+dpo-{lr}={run.path}")
        lap(f"dpo-{lr}")
    if args.grpo_steps:
        run = finetune(FinetuneConfig(base=str(sft), data=[str(questions)], out=out / "grpo", objective="grpo",
                                      method="full", reward=["f1"], max_steps=args.grpo_steps,
                                      learning_rate=args.grpo_lr, micro_batch_size=16, group_size=4,
                                      max_new_tokens=cfg.max_new_tokens, temperature=1.0, warmup_steps=0,
                                      seed=cfg.seed, progress=False))
        runs.append(f"sft+grpo={run.path}")
        lap("grpo")
    # --runs only (no --model): the base is not scored; every system is NAME=RUN
    scorecard = compare(CompareConfig(runs=runs, data=[str(data.seen), str(data.unseen)], task="qa",
                                      max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size,
                                      out=out / "compare"), progress=False)
    lap("compare")

    table = {s["name"]: {split: {k: s["splits"][split].get(k) for k in METRICS} for split in s["splits"]}
             for s in scorecard["systems"]}
    print(f"pairs: {pairs.pairs} from {pairs.questions} training questions ({pairs.no_margin} without margin)")
    print(f"{'system':22s} {'split':7s} " + " ".join(f"{k:>18s}" for k in METRICS))
    for name, splits in table.items():
        for split, values in splits.items():
            print(f"{name:22s} {split:7s} " + " ".join(f"{'' if v is None else round(v, 3):>18}" for v in
                                                         values.values()))
    curve = {}
    if args.grpo_steps:  # the reward at the start and the end of GRPO (means over 5 steps)
        rows = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "reward" in r]
        for key in ("reward", "completions/mean_length", "completions/clipped_ratio"):
            curve[key] = [round(sum(r[key] for r in part) / len(part), 4) for part in (rows[:5], rows[-5:])]
        print("grpo first 5 steps -> last 5 steps: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in curve.items()))
    print(json.dumps({"figure": "demo_preference", "pairs": pairs.pairs, "questions": pairs.questions,
                      "systems": table, "grpo": curve, "seconds": timings, "note": args.device_note}), flush=True)


if __name__ == "__main__":
    main()
