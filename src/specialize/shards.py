"""Pre-training text on disk: documents streamed from the sources, tokenised in batches, and
appended to token files that the training loop reads through a memory map.

    run/data/
      train.bin      token ids (uint16, or uint32 for vocabularies over 65,536): the training
                     documents in source order, each followed by EOS
      eval.bin       the held-out documents, likewise
      text.bin       instead of the two: every document, when blocks are held out (see below),
      eval-blocks.bin  and which blocks of it (int64 block numbers)
      shards.json    written last: what the files were made from, their counts and digest

Nothing holds the corpus: a document is read, tokenised in a batch, written and dropped, so the
peak is one batch (or the largest document), not the corpus. A block is `max_seq_tokens`
consecutive ids of one file, read from the map only when a micro-batch needs it.

The held-out split is the in-memory one (`pretrain.split_held_out`), decided per document while
streaming: a first pass counts the documents, then the seeded `held_documents(count)` says
which go to eval.bin. With fewer than MIN_DOCUMENTS_FOR_EVAL documents, or when either side
fills no block, blocks of the whole stream are held out instead (`split_blocks` on indices).

`--resume` reuses the files when shards.json matches this run's sources (path, size and mtime
of every file), tokenizer, block length, eval fraction and seed, so nothing is read or
tokenised again; the checkpoint's data fingerprint is the digest of the training ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from accelerate.utils import broadcast_object_list

from specialize.batches import PlannedBatches
from specialize.config import TrainConfig
from specialize.data.tokenize import IGNORE, Encoded
from specialize.documents import Documents
from specialize.files import write_json

FORMAT = 1
MANIFEST = "shards.json"
BATCH_DOCUMENTS = 1000  # documents per call of the fast tokenizer (parallel in Rust)
BATCH_CHARS = 256_000  # ... or fewer: a batch's ids and encodings take ~100 bytes per token
MIN_BLOCKS_FOR_EVAL = 10  # fewer blocks are all trained on: one held-out block says little
MIN_DOCUMENTS_FOR_EVAL = 10  # fewer documents: blocks are held out instead of whole documents


@contextmanager
def _no_length_warning(tokenizer):
    """Documents are longer than the model's context on purpose (they are cut into blocks
    afterwards); lift `model_max_length` meanwhile so transformers does not warn about it."""
    saved = tokenizer.model_max_length
    tokenizer.model_max_length = int(1e30)
    try:
        yield
    finally:
        tokenizer.model_max_length = saved


def tokenize_documents(tokenizer, documents: list[str]) -> list[list[int]]:
    """Token ids of every document, in one batched call of the fast tokenizer (parallel in Rust).

    Special tokens written in the text ("<|endoftext|>" in a document about tokenizers) are read
    as text: only the packing puts EOS ids between documents.
    """
    with _no_length_warning(tokenizer):
        return tokenizer(documents, add_special_tokens=False, return_attention_mask=False,
                         split_special_tokens=True)["input_ids"]


def _batches(documents: Documents) -> Iterator[list[str]]:
    batch, chars = [], 0
    for text in documents:
        batch.append(text)
        chars += len(text)
        if len(batch) >= BATCH_DOCUMENTS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def cuttable(tokenizer) -> bool:
    """Whether a long text may be tokenised in `cut_text` pieces with the same ids as whole: a
    byte-level BPE with GPT-2's split pattern, no prefix space, no normalizer, no dropout and no
    added tokens but special ones (this project's own BPE, GPT-2's)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str())
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    return (spec.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("add_prefix_space") is False
            and pre.get("use_regex", True) and model.get("type") == "BPE" and not model.get("dropout")
            and all(token.get("special") for token in spec.get("added_tokens", [])))


def cut_text(text: str, size: int) -> Iterator[str]:
    """`text` in pieces of about `size` characters, each cut after a newline that stands between
    two visible characters: the split pattern starts a pre-token there anyway ("x", "\n", "y"
    whole or cut), so a `cuttable` tokenizer gives the same ids."""
    def visible(c: str) -> bool:
        return c.isalnum() or "!" <= c <= "~"

    start = 0
    while len(text) - start > size:
        cut = text.find("\n", start + size)
        while cut != -1 and not (cut + 1 < len(text) and visible(text[cut - 1]) and visible(text[cut + 1])):
            cut = text.find("\n", cut + 1)
        if cut == -1:
            break
        yield text[start: cut + 1]
        start = cut + 1
    yield text[start:]


def _encoded(tokenizer, documents: Documents, cut: bool) -> Iterator[Iterable[list[int]]]:
    """Every document's ids, in pieces: most whole, in batches; a long one piece by piece when `cut`,
    so its ids never sit in memory as Python ints all at once."""
    for batch in _batches(documents):
        long = [cut and len(text) > BATCH_CHARS for text in batch]
        short = iter(tokenize_documents(tokenizer, [t for t, x in zip(batch, long) if not x]) if not all(long) else [])
        for text, is_long in zip(batch, long):
            if is_long:
                yield (tokenize_documents(tokenizer, [piece])[0] for piece in cut_text(text, BATCH_CHARS))
            else:
                yield [next(short)]


# --- the held-out split ---------------------------------------------------------------------------


def held_documents(count: int, fraction: float, seed: int) -> set[int]:
    """The seeded indices of the documents held out: `fraction` of `count`, at least one, never all;
    none below MIN_DOCUMENTS_FOR_EVAL documents."""
    if fraction <= 0 or count < MIN_DOCUMENTS_FOR_EVAL:
        return set()
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return set(order[:min(count - 1, max(1, round(count * fraction)))])


def split_blocks(blocks: list, fraction: float, seed: int) -> tuple[list, list]:
    """Seeded (train, held-out) blocks: `fraction` of them, at least one once there are 10 or more."""
    if fraction <= 0 or len(blocks) < MIN_BLOCKS_FOR_EVAL:
        return blocks, []
    order = list(range(len(blocks)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(blocks) - 1, max(1, round(len(blocks) * fraction)))  # keep a block to train on
    held = set(order[:n_eval])
    return [b for i, b in enumerate(blocks) if i not in held], [b for i, b in enumerate(blocks) if i in held]


# --- blocks ---------------------------------------------------------------------------------------


class TokenBlocks(Sequence):
    """Blocks of a token file as training items, built on access: `blocks[i]` is an `Encoded`
    whose every token but the first is a target. `index` picks and orders the blocks; slices
    are views (evaluate_loss takes `items[rank::world]`)."""

    def __init__(self, tokens: np.ndarray, block_tokens: int, index: Sequence[int] | None = None):
        self.tokens, self.block_tokens = tokens, block_tokens
        self.index = range(len(tokens) // block_tokens) if index is None else index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return TokenBlocks(self.tokens, self.block_tokens, self.index[key])
        start = int(self.index[key]) * self.block_tokens
        block = self.tokens[start: start + self.block_tokens].tolist()
        return Encoded(block, [IGNORE] + block[1:], "pretrain")

    def ids(self) -> list[list[int]]:
        """Every block's ids (for tests and small data: this does materialise them)."""
        return [item.input_ids for item in self]


class ShardBatches(PlannedBatches):
    """The loop's default batch source over token blocks, fingerprinted by the shards' digest
    (written with them) instead of by hashing every block's ids again at each start."""

    def __init__(self, blocks: TokenBlocks, cfg: TrainConfig, fingerprint: str):
        super().__init__(blocks, cfg, collate=lambda items: None, fingerprint=fingerprint)  # the loop sets the collator


# --- writing and opening --------------------------------------------------------------------------


def token_dtype(vocab: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)


def tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{spec}\n{tokenizer.eos_token_id}".encode()).hexdigest()[:16]


def settings_key(documents: Documents, tokenizer, block_tokens: int, fraction: float, seed: int) -> str:
    """A digest of everything the files depend on (a folder of a million files stays one line)."""
    key = {"format": FORMAT, "sources": documents.key(), "tokenizer": tokenizer_digest(tokenizer),
           "block_tokens": block_tokens, "eval_fraction": fraction, "seed": seed}
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def run_ticket(accelerator) -> str:
    """One random id for this run, the same in every process (the main process's)."""
    ticket = [os.urandom(8).hex()]
    if accelerator.num_processes > 1:
        broadcast_object_list(ticket, from_process=0)
    return ticket[0]


def wait_for(folder: Path, ticket: str, poll_s: float = 1.0) -> None:
    """Until the main process has written this run's shards.json (stamped with `ticket`)."""
    while True:
        try:
            if json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("ticket") == ticket:
                return
        except (OSError, ValueError):
            pass  # not there yet, or being replaced
        time.sleep(poll_s)


def prepare(folder: Path, documents: Documents, tokenizer, block_tokens: int, fraction: float, seed: int, *,
            reuse: bool, ticket: str = "") -> bool:
    """Write the token files into `folder` unless `reuse` and they match; True when reused.

    The main process calls this; every process then opens them with `Shards(folder)`. shards.json
    is stamped with `ticket`, for the processes that `wait_for` it.
    """
    key = settings_key(documents, tokenizer, block_tokens, fraction, seed)
    if reuse and _matches(folder, key):
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        write_json(folder / MANIFEST, manifest | {"ticket": ticket})
        return True
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    dtype, eos = token_dtype(len(tokenizer)), tokenizer.eos_token_id
    held = held_documents(documents.counted(), fraction, seed)
    sides = {"train": _TokenFile(folder / "train.bin", dtype), "eval": _TokenFile(folder / "eval.bin", dtype)}
    lengths = array("Q")  # each document's tokens + EOS (0: no tokens), in order: enough to merge the sides
    for index, pieces in enumerate(_encoded(tokenizer, documents, cuttable(tokenizer))):
        side, tokens = sides["eval" if index in held else "train"], 0
        for ids in pieces:
            side.write(np.asarray(ids, dtype=dtype))
            tokens += len(ids)
        if tokens:
            side.write(np.asarray([eos], dtype=dtype))
        lengths.append(tokens + 1 if tokens else 0)
    for side in sides.values():
        side.close()
    train_blocks, eval_blocks = (side.tokens // block_tokens for side in sides.values())
    counts = {"documents": sum(1 for n in lengths if n), "stream_tokens": sides["train"].tokens + sides["eval"].tokens}
    if held and train_blocks and eval_blocks:
        manifest = counts | {"by": "documents", "files": {"train": "train.bin", "eval": "eval.bin"},
                             "dropped_tokens": sum(side.tokens % block_tokens for side in sides.values()),
                             "digest": sides["train"].digest.hexdigest()}
    else:
        text = _merge(folder, sides, lengths, held, dtype)
        n_blocks = text.tokens // block_tokens
        _, evaluation = split_blocks(range(n_blocks), fraction, seed)
        blocks = "none"
        if evaluation:  # the train indices are all but these, so these identify the split
            blocks = "blocks"
            np.asarray(evaluation, dtype=np.int64).tofile(folder / "eval-blocks.bin")
            text.digest.update(np.asarray(evaluation, dtype=np.int64).tobytes())
        files = {"train": "text.bin", "eval": "eval-blocks.bin" if evaluation else "text.bin"}
        manifest = counts | {"by": blocks, "files": files,
                             "dropped_tokens": text.tokens % block_tokens, "digest": text.digest.hexdigest()}
    write_json(folder / MANIFEST, manifest | {"key": key, "dtype": dtype.name, "block_tokens": block_tokens,
                                              "ticket": ticket})
    return False


class _TokenFile:
    """An append-only file of token ids, with their count and a running digest."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype, self.file = path, dtype, open(path, "wb")  # noqa: SIM115 (closed by close())
        self.tokens, self.digest = 0, hashlib.sha256()

    def write(self, ids: np.ndarray) -> None:
        data = ids.tobytes()
        self.file.write(data)
        self.digest.update(data)
        self.tokens += len(ids)

    def close(self) -> None:
        self.file.close()


def _merge(folder: Path, sides: dict[str, _TokenFile], lengths: array, held: set[int], dtype) -> _TokenFile:
    """text.bin: both sides back in document order (one stream, for holding out blocks)."""
    if not held:  # every document went to train.bin, in order
        sides["eval"].path.unlink()
        sides["train"].path.rename(folder / "text.bin")
        return sides["train"]
    text = _TokenFile(folder / "text.bin", dtype)
    maps = {name: _map(side.path, dtype) for name, side in sides.items()}
    at = {"train": 0, "eval": 0}
    for index, n in enumerate(lengths):
        if n:
            name = "eval" if index in held else "train"
            text.write(maps[name][at[name]: at[name] + n])
            at[name] += n
    text.close()
    del maps
    for side in sides.values():
        side.path.unlink()
    return text


def _map(path: Path, dtype) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)  # mmap refuses an empty file
    return np.memmap(path, dtype=dtype, mode="r")


def _matches(folder: Path, key: str) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    files = set(manifest.get("files", {}).values())
    return manifest.get("key") == key and all((folder / name).is_file() for name in files)


class Shards:
    """The token files of a run, opened read-only: training and held-out blocks, and the counts."""

    def __init__(self, folder: Path):
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        self.folder, self.block_tokens = folder, manifest["block_tokens"]
        self.by, self.documents = manifest["by"], manifest["documents"]
        self.stream_tokens, self.dropped_tokens = manifest["stream_tokens"], manifest["dropped_tokens"]
        # The training ids and how they are cut: a change in either must stop --resume.
        self.fingerprint = hashlib.sha256(f"{manifest['digest']}/{self.block_tokens}".encode()).hexdigest()[:16]
        dtype = np.dtype(manifest["dtype"])
        if self.by == "documents":
            self.train = TokenBlocks(_map(folder / "train.bin", dtype), self.block_tokens)
            self.eval = TokenBlocks(_map(folder / "eval.bin", dtype), self.block_tokens)
            return
        text = _map(folder / "text.bin", dtype)
        n_blocks = len(text) // self.block_tokens
        held = np.fromfile(folder / "eval-blocks.bin", dtype=np.int64) if self.by == "blocks" else np.zeros(0, np.int64)
        keep = np.ones(n_blocks, dtype=bool)
        keep[held] = False
        self.train = TokenBlocks(text, self.block_tokens, np.flatnonzero(keep))
        self.eval = TokenBlocks(text, self.block_tokens, held)
