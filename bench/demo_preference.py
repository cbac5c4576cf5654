"""The demo's preference figure: does tuning the demo's specialist on its own graded answers help?

    specialize demo --out runs/demo && python bench/demo_preference.py --demo runs/demo --sft-control
    python bench/demo_preference.py --demo runs/demo --run-demo       # run the demo first (cold: minutes)
    python bench/demo_preference.py --demo runs/demo --dpo-lrs 3e-4,1e-3 --sft-weights 0,1 --sft-control \
        --grpo-steps 0                                                 # the DPO sweep in the README

The defaults are the README's figure: pairs with the reference as chosen, sampled at temperature
0.7 on the practice phrasings; DPO with the SFT term (--sft-weight 1), lr 1e-3, two epochs; GRPO
60 steps at lr 3e-4. About 2 minutes on a 2-core CPU after the demo.

1. the SFT run: the demo's fine-tuned run (`<demo>/finetuned`), or with `--closed-book-sft STEPS` a
   cheaper one: the demo's cached base fine-tuned on the demo's closed-book training questions only
   (no reading practice, no agent rows; the demo's learning rate and batch), for STEPS steps;
2. `specialize pairs` on it (`--chosen best|reference`) over questions about the trained facts:
   `--questions-from practice` (default) asks them in the practice phrasings, which neither the
   demo's training nor its test splits use; `train` in the training phrasings (`--questions N`:
   every k-th, N in all); `--samples` answers each at `--pair-temperature`, graded by F1 against the
   reference;
3. `specialize finetune --objective dpo` from the SFT run on those pairs (full weights, `--dpo-epochs`,
   `--beta`), once per `--dpo-lrs` x `--sft-weights`; with `--sft-control`, the same number of
   steps of plain SFT on the pairs' chosen answers (is it the preference, or just more SFT?);
   optionally `--objective grpo` on the same questions (`--grpo-steps`, reward f1, 16 prompts x 4
   answers per step);
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
    parser.add_argument("--questions-from", choices=("practice", "train"), default="practice",
                        help="practice: trained facts in phrasings used by no training or test split")
    parser.add_argument("--questions", type=int, default=0, help="pairs from N of those questions, every k-th (0: all)")
    parser.add_argument("--chosen", choices=("best", "reference"), default="reference", help="pairs --chosen")
    parser.add_argument("--out", type=Path, help="where pairs, runs and the comparison go (default DEMO/preference)")
    parser.add_argument("--samples", type=int, default=4, help="answers sampled per training question")
    parser.add_argument("--pair-temperature", type=float, default=0.7, help="pairs: sampling temperature")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    parser.add_argument("--min-margin", type=float, default=0.1, help="pairs: smallest F1 difference")
    parser.add_argument("--dpo-lrs", default="1e-3", help="comma-separated DPO learning rates (full weights)")
    parser.add_argument("--sft-weights", default="1", help="comma-separated --sft-weight values for each DPO run")
    parser.add_argument("--sft-control", action="store_true",
                        help="also plain SFT on the pairs' chosen answers, as many steps as one DPO run")
    parser.add_argument("--dpo-epochs", type=float, default=2.0)
    parser.add_argument("--grpo-steps", type=int, default=60, help="also GRPO for this many steps (0: off)")
    parser.add_argument("--grpo-lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, help="seed of the pairs' sampling and of every run (default: the demo's)")
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
    seed = cfg.seed if args.seed is None else args.seed
    questions = data.practice if args.questions_from == "practice" else data.train
    if args.questions:
        source, questions = questions, out / "questions.jsonl"
        lines = source.read_text(encoding="utf-8").splitlines()
        lines = lines[:: max(1, len(lines) // args.questions)][: args.questions]  # spread over all facts
        questions.write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    pairs = make_pairs(PairsConfig(model=str(sft), data=[str(questions)], samples=args.samples, grade="f1",
                                   min_margin=args.min_margin, chosen=args.chosen, temperature=args.pair_temperature, max_new_tokens=cfg.max_new_tokens,
                                   batch_size=cfg.eval_batch_size, out=out / "pairs.jsonl", seed=seed,
                                   progress=False))
    lap("pairs")
    runs, dpo_steps = [f"sft={sft}"], 0
    for lr in args.dpo_lrs.split(","):
        for weight in args.sft_weights.split(","):
            name = f"dpo-{lr}" + (f"-sft{weight}" if float(weight) else "")
            run = finetune(FinetuneConfig(base=str(sft), data=[str(pairs.out)], out=out / name, objective="dpo",
                                          method="full", beta=args.beta, sft_weight=float(weight), learning_rate=float(lr),
                                          epochs=args.dpo_epochs, micro_batch_size=16, warmup_steps=0, seed=seed,
                                          progress=False))
            dpo_steps = run.read_summary()["steps"]
            runs.append(f"sft+{name}={run.path}")
            lap(name)
    if args.sft_control:  # the chosen answers as plain Q&A: as many steps as DPO, at each DPO learning rate
        chosen = out / "chosen.jsonl"
        rows = [json.loads(line) for line in pairs.out.read_text(encoding="utf-8").splitlines()]
        chosen.write_text("".join(json.dumps({"question": r["prompt"], "answer": r["chosen"]}) + "\n" for r in rows),
                          encoding="utf-8")
        for lr in args.dpo_lrs.split(","):
            run = finetune(FinetuneConfig(base=str(sft), data=[str(chosen)], out=out / f"sft-chosen-{lr}",
                                          method="full", learning_rate=float(lr), max_steps=dpo_steps,
                                          micro_batch_size=16, warmup_steps=0, eval_fraction=0.0, seed=seed,
                                          progress=False))
            runs.append(f"sft+sft-chosen-{lr}={run.path}")
            lap(f"sft-chosen-{lr}")
    if args.grpo_steps:
        run = finetune(FinetuneConfig(base=str(sft), data=[str(questions)], out=out / "grpo", objective="grpo",
                                      method="full", reward=["f1"], max_steps=args.grpo_steps,
                                      learning_rate=args.grpo_lr, micro_batch_size=16, group_size=4,
                                      max_new_tokens=cfg.max_new_tokens, temperature=1.0, warmup_steps=0,
                                      seed=seed, progress=False))
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
