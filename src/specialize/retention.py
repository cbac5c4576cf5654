"""Retention: what a model still knows of general text and general Q&A after fine-tuning.

    sets = load_retention(cfg.retention, base=cfg.base, tokenizer=tokenizer)
    before = measure(sets, model, tokenizer, template, cfg, accelerator)
    ...train...
    summary["retention"] = compare_scores(sets, before, measure(sets, model, ...))

A retention set is one file (or, by default, the held-out documents of a specialize pretrain base):
- general text (plain text, or rows with a `text` field) → perplexity, lower is better: the text is
  cut exactly as pretrain cuts its held-out text (each document + EOS, one stream, blocks of the
  base's block length; the remainder after the last block dropped), and scored with the held-out
  loss of `loss.evaluate_loss`, so the "before" of a pretrain base equals its `eval_perplexity`;
- general Q&A → F1 (and exact match) of greedy answers, through `evaluate.systems.evaluate_system`.

The default for a base that is a specialize pretrain run is its own held-out documents: the text
the base was measured on and never trained on. Which documents those were is not stored by name
(the cached demo base even drops its token files), so they are found again the way pretrain chose
them: its sources, read in order, and `shards.held_documents(count, eval_fraction, seed)`; a
corpus whose document count no longer matches the run's summary is not used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from specialize.data.formats import Example, load_examples
from specialize.data.tokenize import Encoded
from specialize.errors import UserError
from specialize.rundir import RunDir

DEFAULT_NAME = "held-out documents"  # the default set's name in train_summary.json
MAX_BLOCK_TOKENS = 1024  # text blocks of a base that is not a pretrain run: its context, at most this


@dataclass
class RetentionSet:
    """One retention file, ready to score: text blocks (perplexity) or Q&A examples (F1)."""

    name: str
    kind: str  # "perplexity" | "f1"
    source: str
    blocks: list[Encoded] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)
    # What replay must leave out (`replay_key`): the documents of a text set, the prompts of a Q&A set.
    texts: list[str] = field(default_factory=list)


@dataclass
class PretrainSplit:
    """A pretrain run's documents as it split them: trained on, and held out for perplexity."""

    train: list[str]
    held: list[str]
    block_tokens: int


def pretrain_split(base: str) -> PretrainSplit | str:
    """The documents a specialize pretrain run trained on and held out, or why they cannot be had."""
    from specialize.documents import Documents
    from specialize.shards import held_documents

    run = RunDir.find(base)
    if run is None:
        return "the base is not a specialize run"
    cfg, summary = run.read_config(), run.read_summary() or {}
    if "size" not in cfg or "block_tokens" not in summary:
        return "the base is not a specialize pretrain run"
    if summary.get("held_out_by") != "documents":
        return f"the base held out {summary.get('held_out_by')}, not whole documents"
    try:
        texts = list(Documents([str(s) for s in cfg.get("data") or []]))
    except (UserError, OSError) as e:
        return f"its pre-training text is not readable any more ({e})"
    if len(texts) != summary.get("documents"):
        return (f"its pre-training text changed ({len(texts)} documents now, {summary.get('documents')} "
                "when it was trained)")
    held = held_documents(len(texts), float(cfg.get("eval_fraction", 0.0)), int(cfg.get("seed", 0)))
    return PretrainSplit([t for i, t in enumerate(texts) if i not in held],
                         [t for i, t in enumerate(texts) if i in held], int(summary["block_tokens"]))


def block_tokens_for(base: str, tokenizer, context: int | None) -> int:
    """Text blocks as long as the base's pre-training blocks, else its context (at most 1,024)."""
    run = RunDir.find(base)
    known = (run.read_summary() or {}).get("block_tokens") if run is not None else None
    if isinstance(known, int) and known > 1:
        return known
    return min(context or MAX_BLOCK_TOKENS, MAX_BLOCK_TOKENS)


def text_blocks(texts: list[str], tokenizer, block_tokens: int, source: str) -> list[Encoded]:
    """doc + EOS + doc + EOS … cut into blocks as pretrain does (`pretrain.pack_blocks`); text shorter
    than one block is one shorter block, so a small file still scores."""
    from specialize.pretrain import pack_blocks
    from specialize.shards import tokenize_documents

    token_docs = tokenize_documents(tokenizer, texts)
    packed = pack_blocks(token_docs, tokenizer.eos_token_id, block_tokens)
    blocks = packed.blocks
    if not blocks:
        stream = [t for ids in token_docs if ids for t in [*ids, tokenizer.eos_token_id]]
        blocks = [stream] if len(stream) >= 2 else []
    return [Encoded(block, [-100] + block[1:], source) for block in blocks]


def load_retention(files: list[str], *, base: str, tokenizer, context: int | None,
                   say=print) -> list[RetentionSet]:
    """The retention sets: each file given, or by default the base's held-out documents.

    A file of text rows is scored by perplexity, a file of Q&A by F1; a file mixing the two, or one
    with nothing to score, is a UserError naming it.
    """
    block = block_tokens_for(base, tokenizer, context)
    if not files:
        split = pretrain_split(base)
        if isinstance(split, str):
            return []  # no default: only a pretrain base has held-out documents of its own
        blocks = text_blocks(split.held, tokenizer, split.block_tokens, DEFAULT_NAME)
        say(f"retention: the base's {len(split.held)} held-out documents ({len(blocks)} blocks of "
            f"{split.block_tokens} tokens), perplexity before and after")
        return [RetentionSet(DEFAULT_NAME, "perplexity", str(base), blocks=blocks, texts=split.held)]
    sets, names = [], set()
    for file in files:
        examples = load_examples([file])
        kinds = {e.text is not None for e in examples}
        if len(kinds) != 1:
            raise UserError("a retention file holds either text (perplexity) or Q&A (F1), not both", path=file)
        name = Path(file).name
        while name in names:
            name += "'"
        names.add(name)
        if kinds == {True}:
            texts = [e.text for e in examples if e.text.strip()]
            blocks = text_blocks(texts, tokenizer, block, file)
            if not blocks:
                raise UserError("no text to score in this retention file", path=file)
            sets.append(RetentionSet(name, "perplexity", str(file), blocks=blocks, texts=texts))
        else:
            sets.append(RetentionSet(name, "f1", str(file), examples=examples,
                                     texts=[k for k in map(replay_key, examples) if k is not None]))
    return sets


PROMPT_KEY = "\0prompt\0"  # no document text starts with NUL: a prompt key never equals a document


def replay_key(example: Example) -> str | None:
    """What ties a replay example to a retention one: a document's text, or a Q&A example's prompt
    (its non-system turns, whitespace collapsed: retention adds the run's system prompt, replay not)."""
    if example.text is not None:
        return example.text
    if not example.messages or not any(m["role"] == "assistant" for m in example.messages):
        return None
    turns = [" ".join(str(m.get("content") or "").split()) for m in example.prompt_messages if m["role"] != "system"]
    return PROMPT_KEY + "\n".join(turns)


def measure(sets: list[RetentionSet], model, tokenizer, template, cfg, accelerator, pad_id: int) -> dict:
    """{name: score}: perplexity on text (every process takes a share), F1 and exact match on Q&A
    (the main process answers; the others get None). Leaves the model in train mode."""
    from specialize.loss import evaluate_loss
    from specialize.pretrain import perplexity

    scores: dict[str, dict | None] = {}
    for s in sets:
        if s.kind == "perplexity":
            # Blocks of one length: plain padded batches, as pretrain scores its held-out blocks.
            loss = evaluate_loss(model, s.blocks, cfg.model_copy(update={"packing": False}), accelerator, pad_id)
            scores[s.name] = {"perplexity": perplexity(loss), "loss": loss, "blocks": len(s.blocks)}
        elif accelerator.is_main_process:
            scores[s.name] = answer_f1(s.examples, model, tokenizer, template, cfg.max_new_tokens)
        else:
            scores[s.name] = None
    model.train()
    return scores


def answer_f1(examples: list[Example], model, tokenizer, template, max_new_tokens: int) -> dict:
    """F1 and exact match of the model's greedy answers (its training template) on Q&A examples."""
    from specialize.evaluate.systems import evaluate_system
    from specialize.generate import Generator

    generator = Generator(model, tokenizer, template)  # a PEFT model answers with its adapters on
    result = evaluate_system(generator, examples, "qa", max_new_tokens=max_new_tokens, batch_size=32,
                             description="retention")
    return {"f1": result.metrics["f1"], "exact_match": result.metrics["exact_match"], "examples": len(examples)}


def compare_scores(sets: list[RetentionSet], before: dict, after: dict) -> dict:
    """train_summary.json's `retention`: {name: {kind, before, after, change, ...}} per set.

    `change` is after - before (perplexity: up is forgetting; F1: down is forgetting);
    `relative_change` is change / before (perplexity +0.25: a quarter more perplexed).
    """
    out = {}
    for s in sets:
        b, a = before.get(s.name), after.get(s.name)
        if b is None or a is None:
            continue
        key = "perplexity" if s.kind == "perplexity" else "f1"
        row = {"kind": s.kind, "before": b[key], "after": a[key], "change": a[key] - b[key],
               "relative_change": (a[key] - b[key]) / b[key] if b[key] else None, "source": s.source}
        if s.kind == "perplexity":
            row["blocks"] = b["blocks"]
        else:
            row |= {"exact_match_before": b["exact_match"], "exact_match_after": a["exact_match"],
                    "examples": b["examples"]}
        out[s.name] = row
    return out


# --- replay: general data mixed into training, the mitigation measured against forgetting -------


def replay_items(examples: list[Example], task_items: list[Encoded], fraction: float, seed: int, tokenizer,
                 template, max_seq_tokens: int, leave_out: set[str]) -> tuple[list[Encoded], int]:
    """A seeded draw of replay sequences carrying `fraction` of all trained target tokens.

    Counted in target tokens, not rows: a text window trains on every token and a Q&A row only on its
    answer, so 20% of rows of text would be most of the loss. Text is cut into windows of the task's
    `max_seq_tokens`, so replay rows are as long as task rows. Examples in `leave_out` (the retention
    sets' `texts`: documents, and Q&A prompts by `replay_key`) are dropped first: replaying them
    would measure memorising, not retention. Returns (items, examples left out).
    """
    import random

    from specialize.data.tokenize import encode_examples

    kept = [e for e in examples if replay_key(e) not in leave_out]
    pool, _ = encode_examples(kept, tokenizer, template, max_seq_tokens, required=False)
    if not pool:
        raise UserError("nothing to replay: every --replay-data example is longer than --max-seq-tokens "
                        f"{max_seq_tokens} or is in a retention set")
    want = fraction / (1 - fraction) * sum(i.target_tokens for i in task_items)
    rng, chosen, tokens = random.Random(seed), [], 0
    while tokens < want:  # cycles through the pool again when it is smaller than the share asked for
        order = list(range(len(pool)))
        rng.shuffle(order)
        for i in order:
            if tokens >= want:
                break
            chosen.append(pool[i])
            tokens += pool[i].target_tokens
    return chosen, len(examples) - len(kept)
