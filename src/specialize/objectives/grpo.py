"""`specialize finetune --objective grpo`: reward tuning with verifiable rewards on the one loop.

    specialize finetune --base runs/faq --data qa.jsonl --out runs/faq-grpo --objective grpo \\
        --reward f1 --reward stop --group-size 4 --max-steps 100 --learning-rate 1e-5

GRPO (Shao et al. 2024): for every prompt, `group_size` answers are sampled from the model as it is
now (the batched `Generator`), scored by the rewards (`objectives.rewards`: the project's metrics
against the reference answer, the LLM judge, or your own `module:function`), and each answer's
advantage is its reward relative to its group, (r - mean) / (std + 1e-4). The loss is TRL 1.16's
default: the clipped surrogate per token, summed over every completion token of the optimizer step
and divided by their count (`loss_type="dapo"`); the loop's token-weighted steps are exactly that
normalisation, across accumulation and processes. Sampling happens inside the batch source, so
every optimizer step trains on answers from the weights of that step: the importance ratio is 1
and the clip never binds (TRL's `num_iterations=1`, its default).

KL to the reference (`--beta`, default 0 as in TRL and DAPO): with LoRA the reference is the base
with adapters disabled; full training would need a second copy of the model, so beta > 0 there is
refused. A prompt is a Q&A example's conversation before its last answer; that answer is the
reference the rewards compare with.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from specialize import defaults
from specialize.batches import blank, plan_epoch
from specialize.config import FinetuneConfig
from specialize.data.formats import load_examples
from specialize.data.preference import encode_answer
from specialize.data.templates import Template, install_template, resolve_template
from specialize.data.tokenize import (IGNORE, Batch, Encoded, EncodeReport, collate_padded, encode_rendered,
                                      pad_token_id)
from specialize.errors import UserError
from specialize.generate import Completion, Generator
from specialize.model import model_dir, set_generation_ids
from specialize.objectives import losses
from specialize.objectives.preference import _adapters_off
from specialize.objectives.rewards import Rewards, Sample
from specialize.prepare import console, disable_dropout, prepare_model, warn
from specialize.rundir import RunDir
from specialize.train import is_sharded, train

EPSILON = 0.2  # PPO/GRPO clip range (TRL's default); binds only if a batch were trained on twice


@dataclass
class Prompt:
    messages: list[dict[str, Any]]  # the conversation before the answer
    reference: str
    ids: list[int]  # as the generator feeds it to the model
    source: str = ""


@dataclass
class GRPOBatch:
    """Sampled answers (group by group) after their prompts, padded, with one advantage per row."""

    sequences: Batch  # (B, T); targets on the answer tokens
    advantages: torch.Tensor  # (B,)

    @property
    def weight(self) -> int:
        return self.sequences.target_tokens  # the step divides by all its completion tokens ("dapo")

    def to(self, device) -> GRPOBatch:
        return GRPOBatch(self.sequences.to(device), self.advantages.to(device))


def token_logps(model, batch: Batch, only_targets: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-probability of every target token (N,) and the row it belongs to (N,), row-major."""
    keep = batch.targets != IGNORE  # (B, T)
    extra = {"logits_to_keep": keep} if only_targets else {}
    logits = model(**batch.model_inputs(), use_cache=False, **extra).logits
    if logits.ndim == 3:
        logits = logits[keep]  # (N, V)
    logps = -torch.nn.functional.cross_entropy(logits.float(), batch.targets[keep], reduction="none")
    return logps, keep.nonzero()[:, 0]


class GRPOLoss:
    """The loop's `loss`: GRPO's per-token loss summed over a batch's completion tokens."""

    def __init__(self, beta: float, epsilon: float = EPSILON):
        self.beta, self.epsilon = beta, epsilon
        self._kl = torch.zeros(2, dtype=torch.float64)  # sum over tokens, tokens

    def __call__(self, model, batch: GRPOBatch, only_targets: bool = False) -> torch.Tensor:
        logps, rows = token_logps(model, batch.sequences, only_targets)
        reference = None
        if self.beta:
            peft = _adapters_off(model)
            if peft is None:
                raise UserError("--beta > 0 needs the LoRA base as the reference (use --method lora)")
            with torch.no_grad(), peft.disable_adapter():
                reference = token_logps(model, batch.sequences, only_targets)[0]
            delta = (reference - logps).detach()
            self._kl += torch.tensor([float((delta.exp() - delta - 1).sum()), delta.numel()], dtype=torch.float64)
        # One step per batch of samples: the policy that sampled them is this one, detached.
        per_token = losses.grpo_per_token(logps, logps.detach(), batch.advantages[rows], self.beta, reference,
                                          self.epsilon)
        return per_token.sum()

    def row(self) -> dict[str, float]:
        kl, tokens = self._kl.tolist()
        self._kl.zero_()
        return {"kl": kl / tokens} if tokens else {}


class GRPOBatches:
    """The loop's batch source: each step's prompts (the seeded plan), answered `group_size` times now."""

    def __init__(self, prompts: list[Prompt], cfg: FinetuneConfig, generator: Generator, template: Template,
                 rewards: Rewards, accelerator):
        self.prompts, self.cfg, self.generator, self.template = prompts, cfg, generator, template
        self.rewards, self.accelerator = rewards, accelerator
        self.pad_id = generator.pad_id
        digest = hashlib.sha256()
        for p in prompts:
            digest.update(json.dumps([p.ids, p.reference]).encode())
        self.fingerprint: str | None = digest.hexdigest()[:16]
        self._stats: dict[str, float] = {}

    def steps_per_epoch(self, world: int) -> int:
        return len(plan_epoch(len(self.prompts), 0, self.cfg, world))

    def step(self, step: int, rank: int, world: int) -> list[GRPOBatch]:
        epoch, index = divmod(step, self.steps_per_epoch(world))
        micro = plan_epoch(len(self.prompts), epoch, self.cfg, world)[index]
        own = []
        for k, indices in enumerate(micro[rank::world]):
            # Seeded by position, so a resumed run samples what the uninterrupted one did.
            seed = ((self.cfg.seed * 1_000_003 + step) * 4096 + rank) * 4096 + k
            own.append(self.rollout([self.prompts[i] for i in indices], seed))
        while world > 1 and own and len(own) < math.ceil(len(micro) / world):
            own.append(replace(own[-1], sequences=blank(own[-1].sequences)))  # weight 0: keeps the others company
        return own

    def rollout(self, prompts: list[Prompt], seed: int) -> GRPOBatch:
        """Sample, score and encode `group_size` answers for each prompt."""
        group = self.cfg.group_size
        model = self.generator.model
        was_training = model.training
        model.eval()
        try:
            with self.accelerator.autocast():
                completions = self.generator.generate_ids(
                    [p.ids for p in prompts for _ in range(group)], max_new_tokens=self.cfg.max_new_tokens,
                    temperature=self.cfg.temperature, seed=seed)
        finally:
            model.train(was_training)
        asked = [p for p in prompts for _ in range(group)]
        samples = [Sample(p.messages, c.text, p.reference, c.finish_reason, c.completion_tokens)
                   for p, c in zip(asked, completions)]
        scores = self.rewards.score(samples)
        total = torch.tensor(Rewards.total(scores), dtype=torch.float32)  # (P * group,)
        advantages = losses.group_advantages(total, group)
        self._record(scores, total, completions)
        encoded = [self.encode(p, c) for p, c in zip(asked, completions)]
        return GRPOBatch(collate_padded(encoded, self.pad_id), advantages)

    def encode(self, prompt: Prompt, completion: Completion) -> Encoded:
        """The prompt and the answer's ids as sampled: an answer that ended by itself keeps the end of
        turn it sampled (as TRL's completion mask does), one cut at the token budget has none (it did
        not end). Re-tokenising the decoded text gives other ids (merges, spaces, dropped special
        tokens), so the loss would score tokens the model never chose. Without sampled ids (an answer
        not from `generate_ids`): SFT's encoding of a stopped answer, the text's ids of a cut one."""
        if completion.ids is not None:
            ids = list(completion.ids)
            return Encoded(prompt.ids + ids, [IGNORE] * len(prompt.ids) + ids, prompt.source)
        if completion.finish_reason == "stop":
            answer = [{"role": "assistant", "content": completion.text}]
            return encode_answer(prompt.messages, answer, self.generator.tokenizer, self.template, prompt.source)
        ids = self.generator.text_ids(completion.text)
        return Encoded(prompt.ids + ids, [IGNORE] * len(prompt.ids) + ids, prompt.source)

    def _record(self, scores: dict[str, list[float]], total: torch.Tensor, completions: list[Completion]) -> None:
        group = self.cfg.group_size
        stats = self._stats
        for name, values in scores.items():
            stats[f"rewards/{name}/mean"] = stats.get(f"rewards/{name}/mean", 0.0) + sum(values)
        grouped_std = total.view(-1, group).std(dim=1)
        for key, value in (("n", len(total)), ("reward", float(total.sum())), ("reward_sq", float((total ** 2).sum())),
                           ("groups", len(grouped_std)), ("zero_std", int((grouped_std < 1e-8).sum())),
                           ("tokens", sum(c.completion_tokens for c in completions)),
                           ("clipped", sum(c.finish_reason != "stop" for c in completions))):
            stats[key] = stats.get(key, 0.0) + value

    def row(self) -> dict[str, float]:
        """TRL's names, means since the last call (then reset), over this process's samples."""
        stats, self._stats = self._stats, {}
        n = stats.get("n", 0)
        if not n:
            return {}
        mean = stats["reward"] / n
        variance = max(stats["reward_sq"] / n - mean ** 2, 0.0) * n / max(n - 1, 1)
        return {"reward": mean, "reward_std": math.sqrt(variance),
                **{k: v / n for k, v in stats.items() if k.startswith("rewards/")},
                "frac_reward_zero_std": stats["zero_std"] / stats["groups"],
                "completions/mean_length": stats["tokens"] / n, "completions/clipped_ratio": stats["clipped"] / n}


def load_prompts(cfg: FinetuneConfig, tokenizer) -> tuple[list[Prompt], Template]:
    """Q&A examples → prompts with their references, rendered as the generator renders them.

    A prompt that leaves no room for `max_new_tokens` in the context (or `--max-seq-tokens`) is
    dropped and counted.
    """
    examples = load_examples(cfg.data, cfg.system_prompt)
    if text := next((e for e in examples if e.messages is None), None):
        raise UserError(f"--objective grpo needs prompts with reference answers (any Q&A format); "
                        f"{text.source} is raw text")
    template = resolve_template(cfg.template, tokenizer, {e.shape for e in examples})
    context = defaults.model_context(cfg.base, cfg.trust_remote_code)
    limit = min(x for x in (cfg.max_seq_tokens, context, 1 << 30) if x is not None)
    prompts, report = [], EncodeReport(unit="prompt")
    for example in examples:
        messages = example.prompt_messages
        # As `Generator.prompt_ids` renders and tokenises it: exactly the ids sampling starts from.
        ids = encode_rendered(tokenizer, template.render(tokenizer, messages, add_generation_prompt=True))
        if len(ids) + cfg.max_new_tokens > limit:
            report.drop(f"prompt + --max-new-tokens {cfg.max_new_tokens} longer than {limit} tokens", example.source)
            continue
        prompts.append(Prompt(messages, example.reference, ids, example.source))
    for line in report.lines():
        warn(line)
    if not prompts:
        raise UserError(f"nothing left to train on: {'; '.join(report.lines()) or 'no prompts'}")
    return prompts, template


def finetune_grpo(cfg: FinetuneConfig, run: RunDir, accelerator, tokenizer) -> RunDir:
    """--objective grpo: prompts → sampled groups → rewards → the same loop with the GRPO loss."""
    main = accelerator.is_main_process
    if cfg.beta is None:
        cfg = cfg.model_copy(update={"beta": 0.0})  # saved resolved with the run
    if not cfg.reward:
        cfg = cfg.model_copy(update={"reward": ["f1"]})
    if is_sharded(accelerator):
        raise UserError("--objective grpo samples with the whole model on every process; FSDP/DeepSpeed shard "
                        "it (use DDP or one process)")
    rewards = Rewards(cfg.reward, judge_url=cfg.judge_url, judge_model=cfg.judge_model)
    prompts, template = load_prompts(cfg, tokenizer)
    choices = []
    if cfg.max_seq_tokens is None:
        choices.append(defaults.max_seq_tokens(defaults.model_context(cfg.base, cfg.trust_remote_code),
                                               max(len(p.ids) for p in prompts) + cfg.max_new_tokens, False))
        cfg = cfg.model_copy(update={"max_seq_tokens": choices[-1].value})
    if main:
        if cfg.eval_data:
            warn("--eval-data is not used by --objective grpo (no eval loss); score the run with specialize eval")
        console.print(f"data: {len(prompts)} prompts, template '{template.name}', objective grpo (rewards "
                      f"{' + '.join(rewards.names)}, {cfg.group_size} answers per prompt, beta {cfg.beta})")
    model, cfg, trainable, total = prepare_model(cfg, accelerator, choices)
    if cfg.beta and cfg.method not in ("lora", "qlora"):
        raise UserError(f"--beta {cfg.beta} with --method {cfg.method}: the KL penalty needs a reference model, "
                        "which full training would hold as a second copy in memory; use --method lora (the "
                        "reference is then the base with adapters disabled) or --beta 0")
    disable_dropout(model)
    run.begin(cfg, kind="finetune", main=main, say=console.print)
    accelerator.wait_for_everyone()
    # The loop moves the model to the device (accelerate's prepare) before the first sampling.
    generator = Generator(model, tokenizer, template, device=accelerator.device)
    model.train()  # Generator() puts the model in eval mode; the loop trains it
    objective = GRPOLoss(cfg.beta)
    batches = GRPOBatches(prompts, cfg, generator, template, rewards, accelerator)

    def log_rewards(step: int, row: dict) -> dict:
        return batches.row() | objective.row()  # the loop writes it to metrics.jsonl and the trackers

    with rewards:
        model, result = train(model, [], [], cfg, run.path, pad_id=pad_token_id(tokenizer), accelerator=accelerator,
                              loss=objective, batches=batches, callback=log_rewards)
    if main:
        install_template(tokenizer, template, cfg.system_prompt)
        set_generation_ids(model, tokenizer)
        summary = result.summary() | {
            "base": cfg.base, "base_model_dir": model_dir(cfg.base), "method": cfg.method, "objective": "grpo",
            "loss_type": "dapo", "beta": cfg.beta, "reward": list(rewards.names), "group_size": cfg.group_size,
            "temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens,
            "reference": "the base with adapters disabled" if cfg.beta else "none (beta 0)",
            "template": template.name, "trainable_parameters": trainable, "total_parameters": total,
            "prompts": len(prompts)}
        summary["completion_tokens_trained"] = summary.pop("tokens")
        run.finish(model, tokenizer, summary, state_dict=result.full_state_dict)
        console.print(f"done: {result.steps} steps, {result.tokens:,} completion tokens in {result.seconds:.1f}s, "
                      f"final loss {result.train_loss:.4f} → {run.model}")
    accelerator.wait_for_everyone()
    return run
