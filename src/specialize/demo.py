"""`specialize demo`: the whole life cycle on the Python standard library's own documentation.

    specialize demo --out runs/demo

1. pydocs (`specialize.examples.pydocs`): the installed stdlib docs → corpus + Q&A splits (cached);
2. passages: the corpus cut at each documented object → `DIR/rag_passages.jsonl`, the RAG store;
3. base: a tiny Llama pre-trained from random weights on the corpus, cached under
   `default_cache_dir()/demo-base/<key>/` and reused by later runs (`--rebuild` retrains it);
4. fine-tune: full weights on the Q&A (closed-book, and some with the retrieved passage) plus
   reading practice on other functions' passages, so that the model learns the facts and how
   to read context → `DIR/finetune_data.jsonl`, `DIR/finetuned/`; with the agent (opt-in), also
   tool use → `DIR/agent_data.jsonl`: trained facts answered directly with the `search_docs`
   tool offered, other functions searched for first;
5. compare (`specialize.evaluate.compare`): base, base+rag, finetuned, finetuned+rag (and
   finetuned+agent) on `seen` (trained facts, new phrasings) and `unseen` (facts only the
   documents hold) → `DIR/scorecard.json`, `DIR/report.html`, `DIR/predictions/`;
6. a plain-words summary of what the numbers mean.

Budgets are step counts, not minutes: the same config trains as much on every machine,
which is what makes the base cacheable (a time budget would train a different model on a
busy laptop than on an idle one, under the same cache key). The defaults are calibrated for
an idle 2-core CPU: about 3.5 minutes of pre-training (once) and 2 of fine-tuning; a warm run
(cached base) takes under 3 minutes in all, a cold one about 6.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console

from specialize.cache import build_into_place, default_cache_dir
from specialize.config import CompareConfig, DemoConfig, FinetuneConfig, PretrainConfig
from specialize.evaluate.scorecard import Scorecard
from specialize.examples.demo_data import norm, read_jsonl, write_passages, write_training_data
from specialize.examples.pydocs import PydocsPaths, load_or_build
from specialize.files import write_atomic, write_json

console = Console(stderr=True, markup=False)  # paths are printed verbatim

# Bump when the way the base is trained changes without a DemoConfig field changing.
BASE_FORMAT = 2  # 2: held-out documents, not blocks
BASE_MARKER = "demo_base.json"  # written last into a cached base: its key inputs and build time
PRETRAIN_BLOCK_TOKENS = 256
PRETRAIN_BATCH_BLOCKS = 16
SYSTEMS = ("base", "base+rag", "finetuned", "finetuned+rag")
AGENT_SYSTEM = "finetuned+agent"  # with the agent on (`agent_on`)


# --- the cached base -----------------------------------------------------------------------------


def _python_tag() -> str:
    return f"{sys.implementation.name}-{platform.python_version()}-{sys.platform}"


def corpus_sha256(corpus_dir: Path) -> str:
    """Hash of the corpus files: the base depends on them only, not on the Q&A splits."""
    digest = hashlib.sha256()
    for path in sorted(Path(corpus_dir).glob("*.txt")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def base_key(cfg: DemoConfig, data: PydocsPaths) -> tuple[str, dict]:
    """(cache folder name, the inputs it stands for): pre-training settings + corpus + Python.

    The corpus hash stands in for the pydocs manifest's content hash, which also covers the Q&A
    files: asking for more facts must not retrain the base when the docs are the same.
    """
    inputs = {"format": BASE_FORMAT, "python": _python_tag(), "corpus_sha256": corpus_sha256(data.corpus_dir),
              "size": cfg.size, "vocab_size": cfg.vocab_size, "steps": cfg.pretrain_steps,
              "learning_rate": cfg.pretrain_learning_rate, "block_tokens": PRETRAIN_BLOCK_TOKENS,
              "batch_blocks": PRETRAIN_BATCH_BLOCKS, "seed": cfg.seed}
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return f"{cfg.size}-v{cfg.vocab_size}-s{cfg.pretrain_steps}-{digest}", inputs


def _is_complete(folder: Path, inputs: dict) -> bool:
    try:
        marker = json.loads((folder / BASE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("inputs") == inputs and (folder / "model" / "config.json").is_file()


def load_or_pretrain_base(cfg: DemoConfig, data: PydocsPaths, cache_dir: Path) -> tuple[Path, bool]:
    """The cached base run folder for this config, pre-trained first if missing; (folder, reused).

    Pre-training writes into a temporary sibling that is renamed into place once complete, with
    BASE_MARKER written last, so an interrupted run never leaves a base that looks finished.
    """
    from specialize.pretrain import pretrain

    name, inputs = base_key(cfg, data)
    final = cache_dir / "demo-base" / name
    if not cfg.rebuild and _is_complete(final, inputs):
        return final, True

    def build(tmp: Path) -> None:
        pretrain(PretrainConfig(
            data=[str(data.corpus_dir)], out=tmp, size=cfg.size, vocab_size=cfg.vocab_size,
            max_steps=cfg.pretrain_steps, learning_rate=cfg.pretrain_learning_rate,
            max_seq_tokens=PRETRAIN_BLOCK_TOKENS, micro_batch_size=PRETRAIN_BATCH_BLOCKS,
            save_every=cfg.pretrain_steps, eval_every=cfg.pretrain_steps, seed=cfg.seed,
            progress=cfg.progress))
        shutil.rmtree(tmp / "checkpoints", ignore_errors=True)  # nothing resumes a cached base
        shutil.rmtree(tmp / "data", ignore_errors=True)  # nor needs its token files
        for record_name in ("config.yaml", "train_summary.json"):  # written naming the temporary folder
            record = tmp / record_name
            write_atomic(record, record.read_text(encoding="utf-8").replace(str(tmp), str(final)))
        write_json(tmp / BASE_MARKER, {"inputs": inputs, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    build_into_place(final, build, lambda folder: _is_complete(folder, inputs))
    return final, False


# --- fine-tuning and comparing -------------------------------------------------------------------


def agent_on(cfg: DemoConfig) -> bool:
    """Whether the demo trains and compares the search_docs agent (DemoConfig.agent; off by default).

    Off by default because, measured (240 of the 400 steps, on a CPU shared by other runs), the
    tiny base learnt the call format but not to copy the question into the query (0 of 359
    queries; the passage held the answer once), searched for 88% of trained facts too, scored F1
    0.03/0.02 on seen/unseen against finetuned+rag's 0.39/0.19, and paid 736 prompt tokens per
    question against 114; its rows also roughly double the tokens per training step.
    """
    return cfg.agent


def finetune_config(cfg: DemoConfig, base: Path, training_data: list[Path], out: Path) -> FinetuneConfig:
    """Full fine-tuning on `write_training_data`'s rows (their context is already in the prompts).

    The agent's rows need a template that renders tools and calls: chatml; without them, the
    plain Q&A template.
    """
    return FinetuneConfig(
        base=str(base), data=[str(p) for p in training_data], out=out, method="full",
        template="chatml" if len(training_data) > 1 else "qa",
        max_steps=cfg.finetune_steps, learning_rate=cfg.finetune_learning_rate,
        micro_batch_size=cfg.finetune_batch_size, eval_fraction=0.0, save_every=cfg.finetune_steps,
        seed=cfg.seed, progress=cfg.progress)


def compare_config(cfg: DemoConfig, base: Path, run: Path, data: PydocsPaths, passages: Path,
                   out: Path) -> CompareConfig:
    """What `specialize compare` would be given: base, run, the two splits and the RAG store."""
    return CompareConfig(base=str(base), model=str(run), data=[str(data.seen), str(data.unseen)],
                         docs=str(passages), task="qa", top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens,
                         batch_size=cfg.eval_batch_size, out=out, agent=agent_on(cfg))


def retrieval_hits(out: Path) -> dict[str, float]:
    """Per split: share of RAG prompts whose passages hold the reference answer word for word.

    Read from the predictions compare wrote, so it is exactly the context the models were shown.
    """
    hits = {}
    for file in sorted((out / "predictions" / "finetuned+rag").glob("*.jsonl")):
        rows = read_jsonl(file)
        found = [any(norm(ref) in norm(row.get("context") or "") for ref in
                     ([row["reference"]] if isinstance(row["reference"], str) else row["reference"]))
                 for row in rows]
        hits[file.stem] = sum(found) / max(len(found), 1)
    return hits


# --- the summary ---------------------------------------------------------------------------------


DESCRIPTIONS = {
    "base": "the pre-trained model, asked the question as is",
    "base+rag": "the same, with the best-matching passage of the docs above the question",
    "finetuned": "the base after fine-tuning on the Q&A",
    "finetuned+rag": "the fine-tuned model, with the passage above the question",
    "finetuned+agent": "the fine-tuned model, offered a search_docs tool it calls when it decides to",
}


def summary_lines(scorecard: dict, hits: dict[str, float], timings: dict[str, float], out: Path) -> list[str]:
    """What each system is, what its numbers say, and what to do about it, in plain words."""
    metrics = {s["name"]: s["splits"] for s in scorecard["systems"]}

    def f1(system: str, split: str) -> float:
        return metrics.get(system, {}).get(split, {}).get("f1", 0.0)

    lines = ["F1 = word overlap with the documented answer (0 = no word right, 1 = all); EM = exact match;",
             "stop = share of answers that ended on their own. 'seen' asks about facts trained on, in phrasings",
             "never trained on; 'unseen' asks about functions never trained on: only the docs know those.", ""]
    for name in SYSTEMS + (AGENT_SYSTEM,):
        if name in metrics:
            cells = "   ".join(f"{split} F1 {m['f1']:.2f} EM {m['exact_match']:.2f} "
                               f"stop {m.get('stop_rate', 0):.2f}" for split, m in metrics[name].items())
            lines.append(f"  {name:<15} {cells}   ({DESCRIPTIONS[name]})")
    lines += [
        "",
        (f"- Fine-tuning taught the trained facts: F1 on seen went from {f1('base', 'seen'):.2f} to "
         f"{f1('finetuned', 'seen'):.2f}, asked in words the model had never seen with them."
         if f1("finetuned", "seen") >= f1("base", "seen") + 0.1 else
         f"- Fine-tuning barely moved F1 on seen ({f1('base', 'seen'):.2f} -> {f1('finetuned', 'seen'):.2f}): "
         "too few steps to learn the facts (raise finetune_steps)."),
        "- It cannot know what it never saw: on unseen, the fine-tuned model scores "
        f"{f1('finetuned', 'unseen'):.2f}; given the retrieved passage, {f1('finetuned+rag', 'unseen'):.2f} "
        f"({f1('finetuned+rag', 'unseen') - f1('finetuned', 'unseen'):+.2f}).",
    ]
    if "unseen" in hits:
        lines.append(f"- Retrieval put the passage holding the answer first for {hits['unseen']:.0%} of the unseen "
                     "questions; where it did, a model this small still copies the answer imperfectly.")
    if "finetuned+agent" in metrics:
        lines += agent_lines(scorecard)
    lines.append(f"- The base does not use passages ({f1('base', 'unseen'):.2f} -> {f1('base+rag', 'unseen'):.2f} "
                 "on unseen): reading context is learnt, which is why the fine-tuning set has reading practice.")
    rec = scorecard.get("recommendation")
    if rec:
        lines.append(f"Recommendation: {rec['system']} (the reasons are listed under the table above).")
    lines.append("For your own data: fine-tune on what users ask again and again, retrieve for everything else.")
    lines.append("Time: " + ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in timings.items())
                 + f". Details: {out / 'report.html'}")
    return lines


def agent_lines(scorecard: dict) -> list[str]:
    """The agent against RAG: when it searched, what it scored, what its prompts cost."""
    systems = {s["name"]: s for s in scorecard["systems"]}
    agent, rag = systems["finetuned+agent"], systems.get("finetuned+rag")
    searched = {split: m.get("search_rate", 0.0) for split, m in agent["splits"].items()}
    lines = ["- The agent searched for " + " and ".join(f"{rate:.0%} of {split}" for split, rate in searched.items())
             + " questions (ideal: none of seen, all of unseen)."]
    if rag:
        f1 = " ".join(f"{split} {m['f1']:.2f} vs {rag['splits'][split]['f1']:.2f};"
                      for split, m in agent["splits"].items())
        tokens = (f"{agent['prompt_tokens_per_example']:.0f} vs {rag['prompt_tokens_per_example']:.0f} "
                  f"({agent['prompt_tokens_per_example'] / rag['prompt_tokens_per_example'] - 1:+.0%})")
        lines.append(f"  F1 agent vs finetuned+rag: {f1} prompt tokens per question (all rounds, with the "
                     f"tool list every prompt carries): {tokens}.")
    return lines


# --- the whole demo ------------------------------------------------------------------------------


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage; returns the scorecard (also in `cfg.out/scorecard.json`)."""
    from specialize.evaluate.compare import compare
    from specialize.finetune import finetune

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = default_cache_dir()
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal started
        now = time.perf_counter()
        timings[stage] = now - started
        started = now

    console.rule("1/5 data: the standard library's docs → corpus and Q&A (pydocs)")
    data = load_or_build(cache_dir, facts=cfg.facts, eval_examples=cfg.eval_examples, seed=cfg.seed,
                         rebuild=cfg.rebuild, progress=cfg.progress, modules=cfg.modules)
    counts = json.loads(data.manifest.read_text(encoding="utf-8"))["counts"]
    passages = out / "rag_passages.jsonl"
    n_passages = write_passages(data.corpus_dir, passages, cfg.passage_words, cfg.passage_words // 4)
    console.print(f"pydocs: {counts['modules']} modules, {counts['corpus_chars']:,} characters of docs; "
                  f"{counts['train_facts']} train facts x {counts['train'] // max(counts['train_facts'], 1)} "
                  f"phrasings, {counts['seen']} seen and {counts['unseen']} unseen test questions; "
                  f"{n_passages:,} passages for retrieval → {data.root}")
    lap("data")

    console.rule("2/5 base: pre-train a tiny model from random weights on the docs")
    base, reused = load_or_pretrain_base(cfg, data, cache_dir)
    console.print(("reusing the cached base " if reused else "cached the base in ") + str(base))
    lap("pretrain")

    console.rule("3/5 fine-tune: full weights on the Q&A, with retrieved context in some prompts")
    training_data = out / "finetune_data.jsonl"
    agent_data = out / "agent_data.jsonl" if agent_on(cfg) else None
    rows = write_training_data(cfg, data, passages, training_data, agent_data)
    console.print(f"fine-tuning data: {rows['closed_book']:,} closed-book questions, {rows['context']:,} with "
                  f"their retrieved passage, {rows['reading']:,} reading-practice questions about other "
                  f"functions → {training_data}")
    if agent_data:
        console.print(f"agent data: {rows['direct']:,} trained questions answered directly with search_docs "
                      f"offered, {rows['search']:,} searched for first → {agent_data}")
    run = finetune(finetune_config(cfg, base, [training_data] + ([agent_data] if agent_data else []),
                                   out / "finetuned"))
    lap("finetune")

    console.rule("4/5 compare: base, base+rag, finetuned, finetuned+rag" + (", finetuned+agent" if agent_data else "")
                 + " on seen and unseen")
    scorecard = compare(compare_config(cfg, base, run, data, passages, out), progress=cfg.progress)
    lap("evaluate")

    hits = retrieval_hits(out)
    card = Scorecard.model_validate(scorecard)
    card.demo = {"config": cfg.model_dump(mode="json"), "base": str(base), "base_reused": reused,
                 "finetune_rows": rows, "retrieval_hit_rate": hits, "seconds": timings}
    scorecard = card.to_json()
    write_json(out / "scorecard.json", scorecard)
    console.rule("5/5 what the numbers mean")
    print("\n".join(summary_lines(scorecard, hits, timings, out)), flush=True)  # plain: no wrapping, no markup
    return scorecard
