"""Continuous batching: one running batch whose rows join and leave at token boundaries.

The worker thread owns one `RunningBatch`. New requests are prefilled together (left-padded,
their own KV cache) and merged into the running batch between two decode steps; a row leaves
as soon as its answer ends (stop token, stop string, its budget, or its client gone), so a short
answer never waits for the longest one beside it.

Rows are right-aligned: every row's newest token sits in the last cache column, and the columns
before a row's first token are padding that the attention mask hides. Each row keeps its own
position ids (its real token count), so an answer is the one the row would get alone, and the
cache is never wider than its longest row: leading columns that only padding uses are cut
whenever rows leave. Each row samples with its own settings: HF's own logits processors for its
temperature and top_p, and, when the request has a seed, its own `torch.Generator`, so a seeded
answer equals `Generator.generate_ids(..., seed=)` whoever shares the batch.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from transformers import DynamicCache, LogitsProcessorList
from transformers.cache_utils import DynamicLayer

from specialize.generate import SEED_SPACE, Completion, Generator, _stops, is_greedy
from specialize.stopping import safe_end
from specialize.tools import TOOL_CALL_CLOSE, first_call_end


def supports(model) -> bool:
    """Whether `model`'s KV cache can be merged and cut by rows: plain per-layer key/value tensors.

    Sliding-window and recurrent caches (Gemma 2/3, Mamba, ...) keep only part of the past, so
    left-padding them into a shared batch is not sound; those models answer one request at a time.
    """
    if getattr(model.config, "is_encoder_decoder", False):
        return False
    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # a config this transformers version cannot map to cache layers
        return False
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


def _end_after(text: str, end_after: str, final: bool) -> int | None:
    """Where an answer that ends after `end_after` ends, None while it goes on. A single tool call ends
    where the parser ends its block, so a `</tool_call>` inside an argument string does not cut it."""
    if end_after == TOOL_CALL_CLOSE:
        return first_call_end(text, final)
    at = text.find(end_after)
    return None if at < 0 else at + len(end_after)


def _emit(row: Row, piece: str, tokens: int) -> None:
    """Stream `piece` (and the logprobs of the first `tokens` tokens not sent yet) to the row's client;
    a client that cannot take it leaves, without failing its neighbours."""
    try:
        if row.job.on_logprobs is not None and tokens > row.sent_logprobs:
            row.job.on_logprobs(row.logprobs[row.sent_logprobs: tokens])
            row.sent_logprobs = tokens
        row.job.on_text(piece)
    except Exception:  # e.g. its event loop closed: the server is shutting down
        row.job.cancelled.set()


@dataclass(eq=False)
class Row:
    """One request in the running batch: its tokens so far, what it streamed, how it samples."""

    job: object  # worker.Job: prompt_ids, max_tokens, sampling, on_text, cancelled
    processors: LogitsProcessorList  # empty: the plain argmax (greedy) or softmax (sampling at temperature 1)
    sample: bool
    rng: torch.Generator | None  # a seeded request's own random stream; None: the global one
    tokens: list[int] = field(default_factory=list)
    shown: str = ""  # the streamed text so far (never a stop string nor the start of one)
    logprobs: list = field(default_factory=list)  # per token: (id, log-probability, top [(id, log-probability)])
    sent_logprobs: int = 0  # how many of them were streamed


class AdmitFailed(Exception):
    """New requests could not be prefilled; the running batch is as it was."""


class RunningBatch:
    """The rows being generated and their shared KV cache, advanced one token at a time."""

    def __init__(self, generator: Generator):
        self.generator, self.model, self.device = generator, generator.model, generator.device
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None  # per layer (B, heads, T, head_dim)
        self.mask = None  # (B, T): 1 where a row has a real token in the cache
        self.last = None  # (B,): each row's newest token, not yet in the cache
        self.positions = None  # (B,): the position id of `last`, i.e. the row's real tokens so far
        # Prefill needs the logits of the last position only; models without `logits_to_keep` give all.
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters \
            else {}

    def __len__(self) -> int:
        return len(self.rows)

    def clear(self) -> None:
        self.rows, self.cache, self.mask, self.last, self.positions = [], None, None, None, None

    @torch.inference_mode()
    def admit(self, jobs: list) -> list[tuple[object, Completion]]:
        """Prefill `jobs` together and merge them into the batch; returns any that finished at once.

        Raises `AdmitFailed` when the prefill fails (out of memory on one long prompt, say): the
        running batch is untouched then, so only `jobs` fail and the other rows go on.
        """
        try:
            rows, cache, mask, tokens = self._prefill(jobs)
        except Exception as e:
            raise AdmitFailed(e) from e
        new_last = torch.tensor(tokens, dtype=torch.long, device=self.device)
        new_positions = mask.sum(-1)
        if self.cache is None:
            self.rows, self.cache, self.mask, self.last, self.positions = rows, cache, mask, new_last, new_positions
        else:
            self._merge(rows, cache, mask, new_last, new_positions)
        return self._advance(tokens, first=len(self.rows) - len(rows))

    def _prefill(self, jobs: list) -> tuple:
        """The new rows, their KV cache, mask and first tokens; changes nothing in the batch."""
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(jobs), width), self.generator.pad_id, dtype=torch.long)  # (n, P)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)  # (n, P)
        for i, job in enumerate(jobs):  # left padding: every prompt ends in the last column
            ids[i, width - len(job.prompt_ids):] = torch.tensor(job.prompt_ids, dtype=torch.long)
            mask[i, width - len(job.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (n, P): each prompt counts from 0
        cache = DynamicCache(config=self.model.config)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                            use_cache=True, **self.last_only).logits[:, -1, :]  # (n, V)
        rows = [self._row(job) for job in jobs]
        return rows, cache, mask, self._choose(rows, logits)

    @torch.inference_mode()
    def step(self) -> list[tuple[object, Completion]]:
        """Drop rows whose client left, then one token for every row; returns the answers that ended."""
        gone = [(r.job, self._complete(r, cancelled=True)) for r in self.rows if r.job.cancelled.is_set()]
        if gone:
            self._keep([not r.job.cancelled.is_set() for r in self.rows])
        if not self.rows:
            return gone
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)  # (B, T + 1)
        logits = self.model(input_ids=self.last[:, None], attention_mask=self.mask,
                            position_ids=self.positions[:, None], cache=self.cache, use_cache=True).logits[:, -1, :]
        tokens = self._choose(self.rows, logits)
        self.last = torch.tensor(tokens, dtype=torch.long, device=self.device)
        self.positions = self.positions + 1
        return gone + self._advance(tokens, first=0)

    def _row(self, job) -> Row:
        s = job.sampling
        kwargs = self.generator._sampling(job.max_tokens, s.temperature, s.top_p)
        # The processors `model.generate` would apply for these settings and the model's own
        # generation_config (its top_k, repetition penalty, ...): answers equal `generate_ids`.
        config, _ = self.model._prepare_generation_config(None, **kwargs)
        prompt = torch.tensor([job.prompt_ids], dtype=torch.long, device=self.device)
        processors = self.model._get_logits_processor(generation_config=config, input_ids_seq_length=prompt.shape[1],
                                                      encoder_input_ids=prompt, device=self.device, model_kwargs={})
        rng = None
        if s.seed is not None and not is_greedy(s.temperature):
            rng = torch.Generator(device=self.device).manual_seed(s.seed % SEED_SPACE)
        return Row(job, processors, not is_greedy(s.temperature), rng)

    def _choose(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        """Each row's next token from its logits (B, V), as `model.generate` picks it, within the row's grammar.

        Logprobs are the model's own distribution (before the grammar, temperature and top_p), as vLLM reports them.
        """
        logits = logits.to(torch.float32)
        logprobs = {i: logits[i].log_softmax(-1) for i, row in enumerate(rows)
                    if row.job.top_logprobs is not None}  # (V,) each
        for i, row in enumerate(rows):
            if row.job.constraint is not None:
                allowed = row.job.constraint.mask(logits.shape[-1], logits.device)  # (V,)
                logits[i].masked_fill_(~allowed, float("-inf"))
        tokens = logits.argmax(dim=-1).tolist()  # (B,): right for every plain greedy row
        for i, row in enumerate(rows):
            if not row.sample and not row.processors:
                continue
            scores = logits[i: i + 1]  # (1, V)
            if row.processors:
                seen = torch.tensor([row.job.prompt_ids + row.tokens], dtype=torch.long, device=self.device)
                scores = row.processors(seen, scores)
            if row.sample:
                tokens[i] = int(torch.multinomial(F.softmax(scores, dim=-1), 1, generator=row.rng))
            else:
                tokens[i] = int(scores.argmax(dim=-1))
        for i, lp in logprobs.items():
            top = lp.topk(rows[i].job.top_logprobs) if rows[i].job.top_logprobs else None
            rows[i].logprobs.append((tokens[i], float(lp[tokens[i]]),
                                     list(zip(top.indices.tolist(), top.values.tolist())) if top else []))
        return tokens

    def _advance(self, tokens: list[int], first: int) -> list[tuple[object, Completion]]:
        """Give rows `first`.. their new tokens (streaming what is final); remove and return those that ended."""
        ended, keep = [], [True] * len(self.rows)
        g = self.generator
        for i, token in enumerate(tokens, start=first):
            row = self.rows[i]
            row.tokens.append(token)
            if row.job.constraint is not None:
                row.job.constraint.take(token)
            stop = _stops(list(row.job.sampling.stop))
            visible = row.tokens[: g._first_stop(row.tokens)]
            end_after = row.job.end_after
            text = g.tokenizer.decode(visible, skip_special_tokens=True) \
                if stop or end_after or row.job.on_text else ""
            if row.job.on_text is not None:
                end = safe_end(text, stop)
                if end > len(row.shown) and text.startswith(row.shown):
                    _emit(row, text[len(row.shown):end], len(visible))
                    row.shown = text[:end]
            if (len(visible) < len(row.tokens) or len(row.tokens) >= row.job.max_tokens
                    or any(s in text for s in stop) or (end_after and _end_after(text, end_after, False) is not None)):
                ended.append((row.job, self._complete(row)))
                keep[i] = False
        if ended:
            self._keep(keep)
        return ended

    def _complete(self, row: Row, cancelled: bool = False) -> Completion:
        job = row.job
        completion = self.generator._finish(list(row.tokens), len(job.prompt_ids), job.max_tokens,
                                            _stops(list(job.sampling.stop)), cancelled=cancelled)
        cut = _end_after(completion.text, job.end_after, True) if job.end_after else None
        if cut is not None:  # what came after it is not part of the answer
            completion = replace(completion, text=completion.text[:cut], finish_reason="stop")
        if job.top_logprobs is not None:
            completion.logprobs = row.logprobs[: completion.completion_tokens]
        text = completion.text
        if job.on_text is not None and text.startswith(row.shown) and len(text) > len(row.shown):
            _emit(row, text[len(row.shown):], completion.completion_tokens)  # whatever was held back at the end
        return completion  # logprobs not streamed yet go with the last chunk (completion.logprobs has them all)

    def _keep(self, keep: list[bool]) -> None:
        """Keep only the rows marked True, and cut the leading columns that only padding uses now."""
        if not any(keep):
            self.clear()
            return
        if all(keep):
            return
        index = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long, device=self.device)
        self.rows = [r for r, k in zip(self.rows, keep) if k]
        self.cache.batch_select_indices(index)
        self.mask, self.last, self.positions = self.mask[index], self.last[index], self.positions[index]
        used = self.mask.any(dim=0).nonzero()
        lead = int(used[0]) if len(used) else 0
        if lead:
            self.mask = self.mask[:, lead:]
            for layer in self.cache.layers:
                if layer.is_initialized:
                    layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]

    def _merge(self, rows: list[Row], cache: DynamicCache, mask, last, positions) -> None:
        """Append prefilled rows to the batch, left-padding whichever side is narrower."""
        width = max(self.mask.shape[1], mask.shape[1])

        def widen(t: torch.Tensor, dim: int) -> torch.Tensor:  # zero columns on the left of dimension `dim`
            missing = width - t.shape[dim]
            if not missing:
                return t
            pad = [0, 0] * (t.dim() - 1 - dim) + [missing, 0]
            return F.pad(t, pad)

        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([widen(mine.keys, 2), widen(theirs.keys, 2)])
            mine.values = torch.cat([widen(mine.values, 2), widen(theirs.values, 2)])
        self.mask = torch.cat([widen(self.mask, 1), widen(mask, 1)])
        self.last, self.positions = torch.cat([self.last, last]), torch.cat([self.positions, positions])
        self.rows += rows
