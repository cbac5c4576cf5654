"""`specialize pairs`: a run's own sampled answers, graded against the references → preference pairs.

    specialize pairs --model runs/faq --data qa.jsonl --samples 4 --out prefs.jsonl
    specialize finetune --base runs/faq --data prefs.jsonl --objective dpo --out runs/faq-dpo

Every question is answered `samples` times with the run's own template (the batched `Generator`,
temperature sampling, seeded), each answer is graded (`objectives.rewards`: the same grades GRPO
rewards with), and the best and the worst answer become one pair in TRL's prompt/chosen/rejected
format, when their grades differ by at least `--min-margin`. Ties are broken toward teaching the
model to stop: among equally good answers the chosen one ended by itself if any did, among equally
bad ones the rejected one was cut at the token budget if any was. With `--chosen reference` the
question's own reference answer is the chosen side (graded like a sample) against the worst sample,
so a question the model gets wrong every time still teaches something (SPIN's pairing, Chen et al. 2024).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from specialize.config import PairsConfig
from specialize.data.formats import load_examples
from specialize.errors import UserError
from specialize.files import write_jsonl
from specialize.generate import ContextOverflow, Completion, Generator
from specialize.objectives.rewards import Rewards, Sample
from specialize.progress import progress_bar

console = Console(stderr=True, markup=False)


@dataclass
class PairsSummary:
    questions: int
    pairs: int
    no_margin: int  # questions whose best and worst non-empty answers grade less than min_margin apart
    out: Path

    def line(self, min_margin: float) -> str:
        return (f"{self.questions} questions, {self.pairs} pairs written to {self.out}, {self.no_margin} skipped "
                f"(grades less than --min-margin {min_margin} apart; empty answers are never paired)")


def pick_pair(grades: list[float], completions: list[Completion], min_margin: float,
              chosen: int | None = None) -> tuple[int, int] | None:
    """(chosen, rejected) indices of one question's answers, or None when no pair is far enough apart.

    Chosen: the given index, else the best grade, preferring an answer that ended by itself; rejected:
    the worst grade among the others, preferring one cut at the token budget; the first in sampling
    order after that. Answers with the
    same text are never paired, and the margin must be above 0 even with --min-margin 0. Empty
    answers are left out: preference data with an empty side is refused by `check_preferences`
    (for written data it is a mistake), so such a pair could not be trained without --allow-data-errors.
    """
    order = [i for i in range(len(grades)) if completions[i].text.strip()]
    if len(order) < 2 or (chosen is not None and chosen not in order):
        return None
    if chosen is None:
        chosen = min(order, key=lambda i: (-grades[i], not completions[i].stopped, i))
    rejected = min((i for i in order if i != chosen), key=lambda i: (grades[i], completions[i].stopped, i))
    margin = grades[chosen] - grades[rejected]
    if margin <= 0 or margin < min_margin or completions[chosen].text.strip() == completions[rejected].text.strip():
        return None
    return chosen, rejected


def _pair_row(prompt: list[dict], chosen: str, rejected: str, grades: tuple[float, float]) -> dict:
    """TRL's standard text format for a single question, its conversational format otherwise."""
    extra = {"grade_chosen": round(grades[0], 6), "grade_rejected": round(grades[1], 6)}
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return {"prompt": prompt[0]["content"], "chosen": chosen, "rejected": rejected, **extra}
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], **extra}


def make_pairs(cfg: PairsConfig) -> PairsSummary:
    """Sample, grade and write the pairs; returns what was written (also printed as one line)."""
    if not cfg.model:
        raise UserError("no model given (use --model RUN_OR_MODEL)")
    if not cfg.data:
        raise UserError("no questions given (use --data qa.jsonl: questions with reference answers)")
    examples = load_examples(cfg.data, cfg.system_prompt)
    if text := next((e for e in examples if e.messages is None), None):
        raise UserError(f"specialize pairs needs questions with reference answers (any Q&A format); "
                        f"{text.source} is raw text")
    with Rewards([cfg.grade], judge_url=cfg.judge_url, judge_model=cfg.judge_model, flag="--grade") as rewards:
        generator = Generator.load(cfg.model, trust_remote_code=cfg.trust_remote_code)
        prompts = [e.prompt_messages for e in examples]
        asked = [p for p in prompts for _ in range(cfg.samples)]
        with progress_bar(cfg.progress, transient=False) as bar:
            task = bar.add_task("sampling", total=len(asked))
            try:
                completions = generator.generate(
                    asked, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                    batch_size=cfg.batch_size, seed=cfg.seed,
                    on_batch=lambda done, total: bar.update(task, completed=done))
            except ContextOverflow as e:
                raise UserError(f"{examples[e.index // cfg.samples].source}: {e}") from None
        per_question = cfg.samples
        if cfg.chosen == "reference":  # each question's reference, graded like one more sample after its own
            per_question += 1
            completions = [c for q, e in enumerate(examples) for c in (
                *completions[q * cfg.samples: (q + 1) * cfg.samples],
                Completion(e.reference, "stop", 0, len(generator.tokenizer.encode(e.reference,
                                                                                  add_special_tokens=False))))]
        samples = [Sample(prompts[k // per_question], c.text, examples[k // per_question].reference,
                          c.finish_reason, c.completion_tokens) for k, c in enumerate(completions)]
        grades = rewards.score(samples)[cfg.grade]
    rows, no_margin = [], 0
    fixed = cfg.samples if cfg.chosen == "reference" else None
    for q, example in enumerate(examples):
        span = slice(q * per_question, (q + 1) * per_question)
        picked = pick_pair(grades[span], completions[span], cfg.min_margin, chosen=fixed)
        if picked is None:
            no_margin += 1
            continue
        chosen, rejected = (q * per_question + i for i in picked)
        rows.append(_pair_row(prompts[q], completions[chosen].text, completions[rejected].text,
                              (grades[chosen], grades[rejected])))
    out = write_jsonl(cfg.out, rows)
    summary = PairsSummary(len(examples), len(rows), no_margin, Path(out))
    console.print(summary.line(cfg.min_margin), soft_wrap=True)  # one line, whatever the terminal width
    return summary
