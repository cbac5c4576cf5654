"""`specialize pretrain`: random weights → a base model, on raw text.

    specialize pretrain --data corpus/ --size tiny --out runs/base
    specialize finetune --base runs/base --data faq.jsonl --out runs/faq

The pipeline, one function per step:
1. `documents.Documents`: text files, folders of text, or rows with a `text` field → documents,
   streamed from the files on every pass (the corpus is never held in memory);
2. `prepare_tokenizer`: an existing tokenizer, or a byte-level BPE trained here on the text;
3. `shards.prepare`: one stream doc + EOS + doc + EOS …, tokenised in batches into token files
   in `data/`, cut into consecutive blocks of `max_seq_tokens` read through a memory map; the
   last partial block is dropped and reported;
4. held out while writing: seeded whole documents for perplexity (a share of blocks when there
   are too few documents), so no held-out block shares a document with training;
5. the shared training loop (`specialize.train.train`), from a seeded random init.

The in-memory functions (`read_documents`, `pack_blocks`, `split_held_out`, `to_items`) define
what the token files hold: the tests check the files against them.

The run folder matches finetune's: `config.yaml`, `metrics.jsonl`, `checkpoints/`,
`train_summary.json`, and `model/`, a plain HF folder with no chat template (it is a base
model), which `specialize finetune --base RUN` and `AutoModelForCausalLM.from_pretrained` load.
A locally trained tokenizer is also kept in `tokenizer/`, so `--resume` uses the same one, and
the token files in `data/` (see `specialize.shards`), which `--resume` reuses when the text,
tokenizer and split settings are unchanged.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from transformers import AutoTokenizer

from specialize.config import PretrainConfig
from specialize.data.tokenize import IGNORE, Encoded, pad_token_id
from specialize.errors import UserError
from specialize.files import write_dir_atomic
from specialize.model import (SIZES, build_config, build_model, context_length, count_parameters, load_tokenizer,
                              model_dir, set_generation_ids)
from specialize.rundir import DATA, TOKENIZER, RunDir
from specialize.documents import Documents
from specialize.shards import (BATCH_CHARS, MIN_BLOCKS_FOR_EVAL, ShardBatches, Shards, cut_text, held_documents,
                               prepare, run_ticket, split_blocks, wait_for)
from specialize.shards import tokenize_documents  # noqa: F401  (re-exported: the in-memory API)
from specialize.tokenizer import train_bpe
from specialize.train import evaluate_loss, make_accelerator, train

console = Console(stderr=True, markup=False)  # paths and data are printed verbatim



def read_documents(sources: list[str]) -> list[str]:
    """Every document's text, in source order: one per text file, one per row with a `text` field.

    Whitespace-only documents are skipped (they would only add an EOS). Any other row shape is a
    `UserError` naming the file, line and field, since pre-training has no use for Q&A pairs.
    `pretrain` streams them instead (`documents.Documents`); this list is for small data and tests.
    """
    return list(Documents(sources))


def _load_existing_tokenizer(ref: str, trust_remote_code: bool):
    """A hub id, model folder or run via `load_tokenizer`; also a folder holding only tokenizer files."""
    folder = Path(model_dir(ref))
    if folder.is_dir() and not (folder / "config.json").exists() and (folder / "tokenizer_config.json").exists():
        # load_tokenizer wants a model folder; a bare tokenizer folder (e.g. our own tokenizer/) is fine here.
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load tokenizer: {str(e).splitlines()[0]}", path=folder) from None
        if tokenizer.eos_token_id is None:
            raise UserError("tokenizer has no EOS token; set eos_token in its tokenizer_config.json", path=folder)
        return tokenizer
    return load_tokenizer(ref, trust_remote_code)


def prepare_tokenizer(cfg: PretrainConfig, documents: Iterable[str], out: Path, accelerator):
    """`cfg.tokenizer` when given, else a byte-level BPE trained on `documents` (streamed: one pass)
    and kept in `out/tokenizer/`.

    The main process trains and saves; the others call this once it has (`_pretrain` waits for
    the token files) and load the saved files, so all ranks (and a resumed run, which reuses the
    folder) tokenise with exactly the same vocabulary.
    """
    if cfg.tokenizer:
        tokenizer = _load_existing_tokenizer(cfg.tokenizer, cfg.trust_remote_code)
    else:
        saved = out / "tokenizer"
        reuse = cfg.resume and (saved / "tokenizer.json").is_file()
        if accelerator.is_main_process and not reuse:
            started = time.perf_counter()
            status = (console.status(f"training a byte-level BPE tokenizer (vocab {cfg.vocab_size:,})…")
                      if cfg.progress else nullcontext())
            with status:
                # A long document in pieces cut between pre-tokens: the same word counts, so the same
                # tokenizer, without the trainer splitting a whole huge file at once.
                pieces = itertools.chain.from_iterable(cut_text(text, BATCH_CHARS) for text in documents)
                trained = train_bpe(pieces, vocab_size=cfg.vocab_size)
            write_dir_atomic(saved, trained.save_pretrained)
            chars = f" on {documents.chars:,} characters" if isinstance(documents, Documents) else ""
            console.print(f"tokenizer: byte-level BPE, {len(trained):,} tokens, trained{chars} in "
                          f"{time.perf_counter() - started:.1f}s → {saved}")
        tokenizer = _load_existing_tokenizer(str(saved), trust_remote_code=False)
    # A base model has no chat template: finetune then picks a template by data shape (qa for Q&A).
    tokenizer.chat_template = None
    tokenizer.init_kwargs.pop("specialize_template", None)
    return tokenizer


@dataclass
class Blocks:
    """The packed text: `blocks` of exactly `block_tokens` ids, and what did not fit."""

    blocks: list[list[int]]
    block_tokens: int
    documents: int
    stream_tokens: int  # every document's tokens plus one EOS per document
    dropped_tokens: int  # the last partial block, reported, never trained on


def pack_blocks(token_docs: list[list[int]], eos_id: int, block_tokens: int) -> Blocks:
    """doc + EOS + doc + EOS … as one stream, cut into consecutive blocks of `block_tokens`.

    Blocks cross document boundaries on purpose (the EOS tells the model where one ends), so no
    token is padding; only the remainder after the last full block is dropped.
    """
    stream: list[int] = []
    documents = 0
    for ids in token_docs:
        if ids:
            stream.extend(ids)
            stream.append(eos_id)
            documents += 1
    n_blocks = len(stream) // block_tokens
    blocks = [stream[i * block_tokens: (i + 1) * block_tokens] for i in range(n_blocks)]
    return Blocks(blocks, block_tokens, documents, len(stream), len(stream) - n_blocks * block_tokens)


@dataclass
class HeldOut:
    """Training and held-out blocks, and how they were split ("documents", "blocks" or "none")."""

    train: list[list[int]]
    eval: list[list[int]]
    by: str
    documents: int
    stream_tokens: int
    dropped_tokens: int  # the last partial block of each side


def split_held_out(token_docs: list[list[int]], eos_id: int, block_tokens: int, fraction: float,
                   seed: int) -> HeldOut:
    """Hold out a seeded `fraction` of whole documents, and pack each side into blocks on its own.

    Blocks cut from one stream cross documents, so holding out blocks would put the rest of a
    held-out block's document (and any duplicate of it) into training, and the held-out
    perplexity would flatter the model. With fewer than MIN_DOCUMENTS_FOR_EVAL documents (one big
    text file), or when the held-out documents fill no block, blocks are held out instead.
    """
    docs = [ids for ids in token_docs if ids]
    held = held_documents(len(docs), fraction, seed)
    if held:
        train = pack_blocks([d for i, d in enumerate(docs) if i not in held], eos_id, block_tokens)
        evaluation = pack_blocks([d for i, d in enumerate(docs) if i in held], eos_id, block_tokens)
        if train.blocks and evaluation.blocks:
            return HeldOut(train.blocks, evaluation.blocks, "documents", len(docs),
                           train.stream_tokens + evaluation.stream_tokens,
                           train.dropped_tokens + evaluation.dropped_tokens)
    packed = pack_blocks(docs, eos_id, block_tokens)
    train_blocks, eval_blocks = split_blocks(packed.blocks, fraction, seed)
    return HeldOut(train_blocks, eval_blocks, "blocks" if eval_blocks else "none", packed.documents,
                   packed.stream_tokens, packed.dropped_tokens)


def to_items(blocks: list[list[int]], source: str = "pretrain") -> list[Encoded]:
    """Every token but the first of a block is a target (nothing in the block predicts the first)."""
    return [Encoded(block, [IGNORE] + block[1:], source) for block in blocks]


def perplexity(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))  # capped like metrics.jsonl's eval_ppl


def _build_model(cfg: PretrainConfig, tokenizer):
    """A seeded random model of a named size or a config.json, checked to fit one block."""
    try:
        config = build_config(cfg.size, tokenizer, max_positions=max(2048, cfg.max_seq_tokens))
    except (TypeError, KeyError, ValueError) as e:  # no or unknown model_type, malformed JSON
        raise UserError(f"not a usable transformers config.json: {str(e).splitlines()[0]}", path=cfg.size) from None
    positions = context_length(config)
    if positions is not None and positions < cfg.max_seq_tokens:
        raise UserError(f"the model holds {positions} positions, fewer than --max-seq-tokens {cfg.max_seq_tokens}",
                        path=None if cfg.size in SIZES else cfg.size)
    try:
        return build_model(config, seed=cfg.seed)
    except ValueError as e:  # a config without a causal-LM class (e.g. an encoder-decoder)
        raise UserError(f"cannot build a causal LM from it: {str(e).splitlines()[0]}", path=cfg.size) from None


def pretrain(cfg: PretrainConfig) -> RunDir:
    """Pre-train a model from random weights and write the run folder; returns it."""
    if cfg.size not in SIZES and not Path(cfg.size).is_file():  # fail before minutes of tokenising
        raise UserError(f"unknown size '{cfg.size}' (use {', '.join(SIZES)}, or a path to a config.json)")
    # Every block has the same length, so padded batches hold no padding and are plain (B, T)
    # tensors; packing would only concatenate them into one long row with restarting positions.
    run_cfg = cfg.model_copy(update={"packing": False})
    accelerator = make_accelerator(cfg.precision, cfg.report_to, cfg.out)
    main = accelerator.is_main_process
    with RunDir.start(cfg, inputs=[*cfg.data, cfg.tokenizer, None if cfg.size in SIZES else cfg.size],
                      main=main) as run:
        return _pretrain(cfg, run_cfg, run, accelerator)


def _pretrain(cfg: PretrainConfig, run_cfg: PretrainConfig, run: RunDir, accelerator) -> RunDir:
    main, out = accelerator.is_main_process, run.path

    show = main and cfg.progress
    documents, folder = Documents(cfg.data), out / DATA
    ticket = run_ticket(accelerator)
    if main:  # one process trains the tokenizer and writes the token files; every process maps them
        tokenizer = prepare_tokenizer(cfg, documents, out, accelerator)
        started = time.perf_counter()
        with console.status("reading and tokenising the text…") if show else nullcontext():
            reused = prepare(folder, documents, tokenizer, cfg.max_seq_tokens, cfg.eval_fraction, cfg.seed,
                             reuse=cfg.resume, ticket=ticket)
    else:
        wait_for(folder, ticket)  # polled: a collective barrier would time out (NCCL: 10 min) on a big corpus
        tokenizer = prepare_tokenizer(cfg, documents, out, accelerator)
    accelerator.wait_for_everyone()
    packed = Shards(folder)
    train_items, eval_items = packed.train, packed.eval
    if not train_items:
        raise UserError(f"the text is {packed.stream_tokens:,} tokens, less than one block of --max-seq-tokens "
                        f"{cfg.max_seq_tokens}; add text or lower --max-seq-tokens")
    if main:
        how = "reused from the earlier run" if reused else f"tokenised in {time.perf_counter() - started:.1f}s"
        console.print(f"data: {packed.documents:,} documents, {packed.stream_tokens:,} tokens ({how}, {folder}) → "
                      f"{len(train_items):,} training blocks of {cfg.max_seq_tokens} tokens, {len(eval_items):,} "
                      f"held out (by {packed.by}); the partial block at the end of each "
                      f"({packed.dropped_tokens:,} tokens) is dropped")
        if not eval_items:
            console.print(f"warning: no held-out perplexity: fewer than {MIN_BLOCKS_FOR_EVAL} blocks "
                          "or eval_fraction 0")

    run.begin(run_cfg, kind="pretrain", main=main, keep=[TOKENIZER, DATA], say=console.print)  # this run's
    accelerator.wait_for_everyone()
    model = _build_model(cfg, tokenizer).to(accelerator.device)
    _, parameters = count_parameters(model)
    pad_id = pad_token_id(tokenizer)
    # The random init's held-out loss is the yardstick: pre-training must move well below it (~ln vocab).
    initial_eval_loss = evaluate_loss(model, eval_items, run_cfg, accelerator, pad_id) if eval_items else None
    if main:
        console.print(f"model: {cfg.size}, {parameters:,} parameters, vocab {len(tokenizer):,}"
                      + (f"; random-init eval loss {initial_eval_loss:.3f}" if initial_eval_loss is not None else ""))
    # Blocks come from the map as micro-batches need them; the fingerprint is the files' digest.
    batches = ShardBatches(train_items, run_cfg, packed.fingerprint)
    model, result = train(model, train_items, eval_items, run_cfg, out, pad_id=pad_id, accelerator=accelerator,
                          batches=batches)
    if eval_items and result.eval_loss is None:  # resumed after the last step: nothing ran, still report
        result.eval_loss = evaluate_loss(model, eval_items, run_cfg, accelerator, pad_id)
    if main:
        set_generation_ids(model, tokenizer)
        summary = result.summary() | {
            "eval_perplexity": perplexity(result.eval_loss), "initial_eval_loss": initial_eval_loss,
            "initial_eval_perplexity": perplexity(initial_eval_loss), "parameters": parameters,
            "tokens_per_s": result.tokens / max(result.seconds, 1e-9), "size": cfg.size,
            "tokenizer": cfg.tokenizer or str(out / "tokenizer"), "vocab_size": len(tokenizer),
            "block_tokens": cfg.max_seq_tokens, "documents": packed.documents,
            "corpus_tokens": packed.stream_tokens, "train_blocks": len(train_items),
            "eval_blocks": len(eval_items), "held_out_by": packed.by, "dropped_tokens": packed.dropped_tokens,
            "data_dir": str(folder)}
        run.finish(model, tokenizer, summary, state_dict=result.full_state_dict)
        held_out = (f", held-out perplexity {summary['eval_perplexity']:.2f} (eval loss {result.eval_loss:.3f}, "
                    f"random init {initial_eval_loss:.3f})" if result.eval_loss is not None else "")
        console.print(f"done: {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.1f}s "
                      f"({summary['tokens_per_s']:,.0f} tok/s){held_out} → {run.model}")
    accelerator.wait_for_everyone()
    return run
