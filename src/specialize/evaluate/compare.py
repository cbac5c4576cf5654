"""`specialize compare`: was fine-tuning worth it? Prompting + RAG vs fine-tuning, same test sets.

    specialize compare --model runs/faq --data test.jsonl --data unseen.jsonl --docs docs/ \
        --predictions gpt4o=gpt4o.jsonl --out runs/faq/compare

Systems (each answers every split; a split is one `--data` file, named by its file stem):

| system          | model        | prompt                                                     |
| --------------- | ------------ | ---------------------------------------------------------- |
| `base`          | --base       | the run's template (same prompt the fine-tuned model gets) |
| `base+fewshot`  | --base       | + `fewshot` solved examples as earlier turns (fewshot > 0) |
| `base+rag`      | --base       | last user message = rag_prompt(question, top_k passages)   |
| `finetuned`     | --model      | the run's template                                         |
| `finetuned+rag` | --model      | as base+rag                                                |
| `finetuned+agent` | --model    | the run's template + the `search_docs` tool; the model searches --docs when it decides to (`agent.py`) |
| NAME, NAME+rag, NAME+agent | `--runs NAME=RUN` | as finetuned, finetuned+rag, finetuned+agent (e.g. `sft+dpo=runs/dpo`) |
| NAME            | none         | `--predictions NAME=FILE` (or `NAME@SPLIT=FILE`), scored as is |

`finetuned+agent` (and NAME+agent) runs when `--agent`, or by default when --docs is given and
the run trained with `search_docs` calls; `--no-agent` turns it off. A fine-tuned system's
scorecard entry carries its run's training cost and, when the run measured it, its retention
(train_summary.json's `retention`: before/after scores on general data).

The base is prompted with the fine-tuned run's template (and its system prompt, if it trained
with one), so the comparison measures what training changed, not a prompt-format mismatch.
`--base` defaults to the base recorded in the run's `train_summary.json`. Few-shot turns come
from the run's training data (its `config.yaml` `data`), else from the first `--data` file; a
solved example never shares the asked question or (but for `classify`) its answer, normalised
as exact_match does, so a paraphrase of the same fact cannot hand the base its answer.

Writes to `--out`: `scorecard.json` (`scorecard.Scorecard`), `predictions/<system>/<split>.jsonl`,
`report.html`. The summary table is printed on stdout; progress goes to stderr.
`compare(cfg, progress=True)` returns the scorecard as written, for the demo and for tests.
"""

from __future__ import annotations

import gc
import itertools
import os
import shutil
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from specialize.config import CompareConfig
from specialize.data.formats import Example, load_examples
from specialize.errors import UserError
from specialize.rundir import RunDir
from specialize.evaluate.metrics import normalize_answer
from specialize.evaluate.report import scorecard_table, write_report
from specialize.evaluate.scorecard import Scorecard, SystemScore, Training, recommend
from specialize.evaluate.systems import (SystemResult, console, evaluate_system, judge_config, load_test_examples,
                                         output_folder, question_of, run_settings, stdout_console, warm_up)
from specialize.evaluate.tasks import detect_task, load_predictions, score
from specialize.files import write_json, write_jsonl
from specialize.progress import progress_bar

GENERATED = ("base", "base+fewshot", "base+rag", "finetuned", "finetuned+rag", "finetuned+agent")
STAGED = ".predictions.tmp"  # predictions/ of this run (and judge verdicts) until it is swapped in


def find_base(run: str) -> str:
    """The base a run was fine-tuned from (train_summary.json, else config.yaml)."""
    summary = RunDir(run).read_summary() or {}
    base = summary.get("base") or run_settings(run).get("base")
    if not base:
        raise UserError("cannot tell which base the run was trained from; give --base", path=run)
    return str(base)


def training_cost(run: str) -> Training | None:
    """Seconds and tokens of a run's training (train_summary.json), None if unknown."""
    summary = RunDir(run).read_summary()
    if summary is None:
        return None
    return Training(seconds=summary.get("seconds"), tokens=summary.get("tokens"))


def retention_of(run: str) -> dict | None:
    """A run's measured retention (train_summary.json `retention`, as finetune wrote it), None if none."""
    retention = (RunDir(run).read_summary() or {}).get("retention")
    return retention if isinstance(retention, dict) and retention else None


def parse_runs(specs: list[str], taken: set[str]) -> dict[str, str]:
    """{name: run folder} from NAME=RUN; a name may not shadow another system (its +rag/+agent included)."""
    runs: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--runs '{spec}': expected NAME=RUN (e.g. sft+dpo=runs/dpo)", field="runs")
        names = {name, f"{name}+rag", f"{name}+agent"}
        clash = sorted(names & (taken | set(GENERATED) | set(runs)))
        if clash:
            raise UserError(f"--runs '{spec}': '{clash[0]}' is already the name of a system; pick another",
                            field="runs")
        if not Path(path).is_dir():  # now, not after the other models have answered every split
            raise UserError("run folder not found", path=path, field="runs")
        runs[name] = path
    return runs


def load_base_generator(base: str, run: str | None, trust_remote_code: bool = False):
    """The base model, prompted with the run's template (its own template when there is no run)."""
    from specialize.generate import Generator, default_device, template_of
    from specialize.model import load_model, load_tokenizer, pick_dtype

    if not run:
        return Generator.load(base, trust_remote_code=trust_remote_code)
    template = template_of(load_tokenizer(run, trust_remote_code))
    device = default_device()
    tokenizer = load_tokenizer(base, trust_remote_code)
    model = load_model(base, trust_remote_code=trust_remote_code, dtype=pick_dtype("auto", device))
    return Generator(model.to(device), tokenizer, template=template, device=device)


def load_splits(paths: list[str], system_prompt: str | None) -> dict[str, list[Example]]:
    splits: dict[str, list[Example]] = {}
    for path in paths:
        name = Path(path).stem
        if name in splits:
            raise UserError(f"two test files are both named '{name}'; splits are named by file stem, "
                            "rename one", path=path)
        splits[name] = load_test_examples(path, system_prompt)
    return splits


def fewshot_pool(run: str | None, splits: dict[str, list[Example]]) -> list[Example]:
    """Solved examples for base+fewshot: the run's training data when it can be read, else the first split.

    Training data is what the fine-tuned model learnt from, so the base is shown the same solved
    examples; the asked row's own fact is filtered out by `with_fewshot` either way.
    """
    if run:
        settings = run_settings(run)
        try:
            pool = [e for e in load_examples(list(settings.get("data") or []), settings.get("system_prompt"))
                    if e.messages and any(m["role"] == "assistant" for m in e.messages)]
        except (OSError, UserError):
            pool = []  # not a specialize run, or its data moved
        if pool:
            return pool
    return next(iter(splits.values()))


def with_fewshot(examples: list[Example], pool: list[Example], k: int, task: str = "qa") -> list[Example]:
    """Each example with the first `k` fitting solved examples of `pool` as earlier turns.

    A solved example fits when neither its question nor its answer equals the asked one's
    (normalised): paraphrases of one fact share an answer, and would otherwise give it away.
    For `classify` only the question counts: labels are shared by design, and hiding the asked
    row's label from the examples would push the base away from the right one. The turns go
    after any system message, so the model's own template renders them like a conversation.
    """
    out = []
    for example in examples:
        question = normalize_answer(question_of(example))
        answer = normalize_answer(example.reference) if task != "classify" else None
        fitting = (s for s in pool if normalize_answer(question_of(s)) != question
                   and (answer is None or normalize_answer(s.reference) != answer))
        turns = [turn for s in itertools.islice(fitting, k)
                 for turn in ({"role": "user", "content": question_of(s)},
                              {"role": "assistant", "content": s.reference})]
        messages = [dict(m) for m in example.messages or []]
        at = 1 if messages and messages[0]["role"] == "system" else 0
        out.append(replace(example, messages=messages[:at] + turns + messages[at:]))
    return out


def parse_predictions(specs: list[str], splits: list[str]) -> dict[str, dict[str, str]]:
    """{system: {split: file}} from NAME=FILE (first split) or NAME@SPLIT=FILE."""
    systems: dict[str, dict[str, str]] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--predictions '{spec}': expected NAME=FILE or NAME@SPLIT=FILE", field="predictions")
        name, _, split = name.partition("@")
        split = split or splits[0]
        if name in GENERATED:
            raise UserError(f"--predictions '{spec}': '{name}' is the name of a generated system; pick another",
                            field="predictions")
        if split not in splits:
            raise UserError(f"--predictions '{spec}': no split '{split}' (splits: {', '.join(splits)})",
                            field="predictions")
        if not Path(path).is_file():  # now, not after the models have answered every split
            raise UserError("predictions file not found", path=path, field="predictions")
        systems.setdefault(name, {})[split] = path
    return systems


def _release_memory() -> None:
    """Return a dropped model's memory before the next is loaded (base and run may not fit together)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _system(name: str, results: dict[str, SystemResult], run: str | None, measured: bool) -> SystemScore:
    """A scorecard system; cost is averaged over the examples of all splits (unknown unless `measured`).

    `run` is the fine-tuned run behind the system (None: no training), for its training cost
    and retention.
    """
    n = sum(len(r.rows) for r in results.values())
    latency = sum(r.seconds for r in results.values()) / n
    tokens = sum(r.prompt_tokens_per_example * len(r.rows) for r in results.values()) / n
    calls = [r.extra.get("tool_calls_per_example") for r in results.values()]
    tool_calls = (sum(c * len(r.rows) for c, r in zip(calls, results.values())) / n
                  if calls and all(c is not None for c in calls) else None)
    return SystemScore(name=name, latency_s_per_example=latency if measured else None,
                       prompt_tokens_per_example=tokens if measured else None,
                       tool_calls_per_example=tool_calls,
                       training=training_cost(run) if run else None,
                       retention=retention_of(run) if run else None,
                       splits={split: r.metrics for split, r in results.items()})


def agent_wanted(cfg: CompareConfig, run: str) -> bool:
    """Whether a fine-tuned run also answers as an agent: `--agent/--no-agent`, else when it trained
    with search_docs calls and there are --docs to search."""
    from specialize.evaluate.agent import trained_with_search

    wanted = cfg.agent
    if wanted is None:
        return bool(cfg.docs) and trained_with_search(run)
    if wanted and not cfg.docs:
        raise UserError("--agent needs --docs: the documents search_docs searches", field="agent")
    return bool(wanted)


def _plan(cfg: CompareConfig, base: str, runs: dict[str, str], retriever) -> list[tuple[str, str, str, str, int]]:
    """(model key, model ref, system name, mode, fewshot) for every generated system, grouped by model,
    so that each model is loaded once. Modes: plain, rag, agent."""
    plan = []
    if base:
        plan += [("base", base, "base", "plain", 0)]
        plan += [("base", base, "base+fewshot", "plain", cfg.fewshot)] if cfg.fewshot else []
        plan += [("base", base, "base+rag", "rag", 0)] if retriever else []
    for key, (prefix, run) in enumerate(runs.items()):
        plan += [(f"run{key}", run, prefix, "plain", 0)]
        plan += [(f"run{key}", run, f"{prefix}+rag", "rag", 0)] if retriever else []
        plan += [(f"run{key}", run, f"{prefix}+agent", "agent", 0)] if agent_wanted(cfg, run) else []
    return plan


def compare(cfg: CompareConfig, progress: bool = True) -> dict:
    """Run every system on every split, write scorecard.json, predictions and report.html.

    Returns:
        the scorecard as written to scorecard.json (`Scorecard.to_json()`).
    """
    if not cfg.data:
        raise UserError("no test data (use --data FILE; repeat it for more splits)")
    extra_runs = list(cfg.runs)
    if not (cfg.model or cfg.base or cfg.predictions or extra_runs):
        raise UserError("nothing to compare: give --model RUN (and/or --base MODEL, --predictions NAME=FILE, "
                        "--runs NAME=RUN)")
    if cfg.fewshot and not (cfg.base or cfg.model):
        raise UserError("--fewshot needs a base model (--base or --model RUN)")
    base = cfg.base or (find_base(cfg.model) if cfg.model else "")
    splits = load_splits(cfg.data, run_settings(cfg.model).get("system_prompt") if cfg.model else None)
    # a test set whose answers are tool calls is scored as tool_call unless another task is asked for
    cfg = cfg.model_copy(update={"task": detect_task(cfg.task, [e.reference for split in splits.values()
                                                                for e in split])})
    extra = parse_predictions(cfg.predictions, list(splits))
    runs = ({"finetuned": cfg.model} if cfg.model else {}) | parse_runs(extra_runs, set(extra))
    retriever = None
    if cfg.docs:
        from specialize.retrieval import Retriever

        retriever = Retriever.build(cfg.docs)
    shots = fewshot_pool(cfg.model or None, splits) if cfg.fewshot else []
    judged = judge_config(cfg)
    out = output_folder(cfg.out)
    shutil.rmtree(out / STAGED, ignore_errors=True)  # left by an interrupted run
    console.print(f"compare: splits {', '.join(f'{k} ({len(v)})' for k, v in splits.items())}; "
                  f"base {base or '-'}; run {cfg.model or '-'}" + (f"; docs {cfg.docs}" if cfg.docs else "")
                  + "".join(f"; {name} {run}" for name, run in runs.items() if name != "finetuned"),
                  markup=False, highlight=False)

    if not retriever:
        console.print("no --docs: the +rag systems are left out")
    results: dict[str, dict[str, SystemResult]] = {}
    trained: dict[str, str | None] = {}  # system -> the run it was fine-tuned in
    plan = _plan(cfg, base, runs, retriever)
    with progress_bar(progress) as bar:
        for key, group in itertools.groupby(plan, key=lambda p: p[0]):
            steps = list(group)
            ref = steps[0][1]
            if key == "base":
                generator = load_base_generator(base, cfg.model or None, cfg.trust_remote_code)
            else:
                from specialize.generate import Generator

                generator = Generator.load(ref, trust_remote_code=cfg.trust_remote_code)
            warm_up(generator)
            for _, _, name, mode, k in steps:
                trained[name] = ref if key != "base" else None
                for split, examples in splits.items():
                    asked = with_fewshot(examples, shots, k, cfg.task) if k else examples
                    options = dict(top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                   progress=bar, description=f"{name} / {split}")
                    if mode == "agent":
                        from specialize.evaluate.agent import evaluate_agent

                        result = evaluate_agent(generator, asked, cfg.task, retriever,
                                                max_rounds=cfg.agent_rounds, **options)
                    else:
                        result = evaluate_system(generator, asked, cfg.task, retriever if mode == "rag" else None,
                                                 **options)
                    result.metrics["prompt_tokens_per_example"] = result.prompt_tokens_per_example
                    results.setdefault(name, {})[split] = result
            del generator
            _release_memory()

    for name, files in extra.items():
        for split, path in files.items():
            rows = load_predictions(path)
            metrics, per_example = score(cfg.task, rows)
            results.setdefault(name, {})[split] = SystemResult(metrics, per_example, rows, 0.0, 0.0, 0.0, 0.0)
        trained[name] = None

    if judged:
        from specialize.evaluate.judge import Judge

        with Judge(*judged) as judge:
            for name, by_split in results.items():
                for split, r in by_split.items():
                    verdicts = out / STAGED / name / f"{split}.judge.jsonl"
                    r.metrics.update(judge.judge_rows(cfg.task, r.rows, verdicts))

    # the cost of an outside system (--predictions) is unknown, not zero
    systems = [_system(name, by_split, trained[name], measured=name not in extra)
               for name, by_split in results.items()]
    scorecard = Scorecard(task=cfg.task, base=base or None, model=cfg.model or None,
                          splits={name: path for name, path in zip(splits, cfg.data)},
                          systems=systems, recommendation=recommend(systems))
    _write(out, scorecard, results, cfg.model)
    terminal = stdout_console()
    terminal.print(scorecard_table(scorecard))
    rec = scorecard.recommendation
    terminal.print(f"recommendation: {rec.system}\n" + "\n".join(f"  - {r}" for r in rec.reasons),
                   markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {out / 'scorecard.json'}, {out / 'report.html'}, {out / 'predictions'}/",
                  markup=False, highlight=False)
    return scorecard.to_json()


def _write(out: Path, scorecard: Scorecard | Mapping, results: dict[str, dict[str, SystemResult]],
           run: str | None) -> None:
    """predictions/, report.html, then scorecard.json, each swapped in whole by a rename: a re-run
    into the same --out never leaves an earlier run's predictions (a system it no longer has)
    beside the new scorecard, and a crash never leaves a half-written file that looks complete.
    The judge's verdicts, already in the staged folder, move with the predictions."""
    scorecard = Scorecard.model_validate(scorecard)
    staged = out / STAGED
    for name, by_split in results.items():
        for split, r in by_split.items():
            write_jsonl(staged / name / f"{split}.jsonl", r.rows)
    shutil.rmtree(out / "predictions", ignore_errors=True)
    os.replace(staged, out / "predictions")
    loss_curve = RunDir(run).read_metrics() if run else []
    examples = {name: {split: r.per_example for split, r in by_split.items()} for name, by_split in results.items()}
    write_report(scorecard, out / "report.html", loss_curve=loss_curve, examples=examples)
    write_json(out / "scorecard.json", scorecard.to_json())  # last: the run is complete

