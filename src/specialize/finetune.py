"""`specialize finetune`: a base model (hub id, folder or run) + data → a specialist run folder.

    specialize finetune --base runs/base --data faq.jsonl --out runs/faq --method lora

The run folder holds everything later verbs need: `config.yaml`, `model/` (HF folder, or a
PEFT adapter pointing at its base, with the tokenizer and the chat template used in training),
`metrics.jsonl`, `checkpoints/` and `train_summary.json`.
"""

from __future__ import annotations

import random

from specialize import defaults
from specialize.config import FinetuneConfig
from specialize.data.formats import Example, load_examples
from specialize.data.templates import install_template, resolve_template
from specialize.data.tokenize import encode_examples, pad_token_id
from specialize.errors import UserError
from specialize.model import load_tokenizer, model_dir, set_generation_ids
from specialize.prepare import console, largest_micro_batch, prepare_model, warn
from specialize.retention import compare_scores, load_retention, measure, replay_items
from specialize.rundir import RunDir
from specialize.train import make_accelerator, train

MIN_EXAMPLES_FOR_SPLIT = 20


def _prompt_key(example: Example) -> str:
    text = example.text if example.messages is None else example.prompt_messages[-1]["content"]
    return " ".join(text.lower().split())


def split_examples(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Seeded train/eval split; small data sets (< 20 examples) are all trained on.

    Examples with the same prompt stay on the same side, so a duplicated question never leaks
    from training into the held-out loss.
    """
    if fraction <= 0 or len(examples) < MIN_EXAMPLES_FOR_SPLIT:
        return examples, []
    keys = sorted({_prompt_key(e) for e in examples})
    random.Random(seed).shuffle(keys)
    n_eval = max(1, round(len(keys) * fraction))
    held = set(keys[:n_eval])
    return ([e for e in examples if _prompt_key(e) not in held], [e for e in examples if _prompt_key(e) in held])


def _add_retrieved_context(examples: list[Example], cfg: FinetuneConfig) -> list[Example]:
    """Put retrieved passages into a share of the prompts, so the model learns to use context."""
    from specialize.retrieval import Retriever, rag_prompt

    retriever = Retriever.build(cfg.rag_docs)
    rng = random.Random(cfg.seed)
    out = []
    for example in examples:
        if example.messages is None or rng.random() >= cfg.rag_fraction:
            out.append(example)
            continue
        messages = [dict(m) for m in example.messages]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        question = messages[last_user]["content"]
        messages[last_user]["content"] = rag_prompt(question, retriever.search(question, cfg.rag_top_k))
        out.append(Example(messages=messages, shape=example.shape, source=example.source, meta=example.meta))
    return out


def finetune(cfg: FinetuneConfig) -> RunDir:
    """Fine-tune and write the run folder; returns it."""
    if not cfg.base:
        raise UserError("no base model given (use --base HUB_ID_OR_FOLDER)")
    if cfg.objective != "sft" and (cfg.retention or cfg.replay_data):
        raise UserError(f"--retention and --replay-data work with --objective sft only, not {cfg.objective}")
    if cfg.sft_weight and cfg.objective != "dpo":
        raise UserError(f"--sft-weight works with --objective dpo only, not {cfg.objective}")
    accelerator = make_accelerator(cfg.precision, cfg.report_to, cfg.out)
    main = accelerator.is_main_process
    # First, before minutes of loading: a folder we may not write is refused at once.
    with RunDir.start(cfg, kind="finetune", inputs=[model_dir(cfg.base), *cfg.data, *cfg.eval_data, cfg.rag_docs,
                                                       *cfg.replay_data, *cfg.retention],
                      main=main) as run:
        return _finetune(cfg, run, accelerator)


def _finetune(cfg: FinetuneConfig, run: RunDir, accelerator) -> RunDir:
    main = accelerator.is_main_process
    tokenizer = load_tokenizer(cfg.base, cfg.trust_remote_code)
    if cfg.objective == "grpo":
        from specialize.objectives.grpo import finetune_grpo

        return finetune_grpo(cfg, run, accelerator, tokenizer)
    if cfg.objective != "sft":
        from specialize.objectives.run import finetune_preferences

        return finetune_preferences(cfg, run, accelerator, tokenizer)
    examples = load_examples(cfg.data, cfg.system_prompt)
    if cfg.eval_data:
        train_examples, eval_examples = examples, load_examples(cfg.eval_data, cfg.system_prompt)
    else:
        train_examples, eval_examples = split_examples(examples, cfg.eval_fraction, cfg.seed)
    template = resolve_template(cfg.template, tokenizer, {e.shape for e in examples})
    context = defaults.model_context(cfg.base, cfg.trust_remote_code)
    if context is not None and cfg.max_seq_tokens is not None and context < cfg.max_seq_tokens:
        raise UserError(f"--max-seq-tokens {cfg.max_seq_tokens} is longer than the {context} positions "
                        f"'{cfg.base}' holds; lower it to at most {context}, or leave it unset")
    limit = cfg.max_seq_tokens or context or defaults.TEXT_WINDOW * 64  # unset: the data decides, below
    _lint(cfg, train_examples, eval_examples, tokenizer, template, limit)
    if cfg.rag_docs:
        train_examples = _add_retrieved_context(train_examples, cfg)
    if cfg.max_seq_tokens is None and any(e.text is not None for e in train_examples):
        limit = min(limit, defaults.TEXT_WINDOW)  # raw text is cut into windows of the limit
    train_items, report = encode_examples(train_examples, tokenizer, template, limit, cfg.train_on_prompt)
    eval_items, eval_report = encode_examples(eval_examples, tokenizer, template, limit,
                                              cfg.train_on_prompt, required=False)
    choices = []
    if cfg.max_seq_tokens is None:
        longest = max((len(i.input_ids) for i in train_items + eval_items), default=0)
        if any("--max-seq-tokens" in reason for r in (report, eval_report) for reason in r.dropped):
            longest = limit  # an example did not fit even the model's context: that is the binding limit
        choices.append(defaults.max_seq_tokens(context, longest, any(e.text is not None for e in train_examples)))
        cfg = cfg.model_copy(update={"max_seq_tokens": choices[-1].value})
    if main:
        for line in report.lines():
            warn(line)
        for line in eval_report.lines():
            warn("eval data: " + line)
        if eval_examples and not eval_items:
            warn("no eval example is left, so this run reports no eval loss")
        console.print(f"data: {len(train_items)} training sequences, {len(eval_items)} eval, template '{template.name}'")

    say = console.print if main else (lambda *a, **k: None)
    retention_sets = load_retention(cfg.retention, base=cfg.base, tokenizer=tokenizer, context=context, say=say)
    replay = _replay(cfg, train_items, tokenizer, template, retention_sets, say) if cfg.replay_data else None
    if replay:
        train_items = train_items + replay["items"]

    model, cfg, trainable, total = prepare_model(cfg, accelerator, choices, largest_micro_batch(train_items, cfg))
    run.begin(cfg, kind="finetune", main=main, say=console.print)
    accelerator.wait_for_everyone()  # the old run's outputs are gone before anyone writes

    pad_id = pad_token_id(tokenizer)
    before = _retention_scores(retention_sets, model, tokenizer, template, cfg, accelerator, pad_id)
    model, result = train(model, train_items, eval_items, cfg, run.path, pad_id=pad_id, accelerator=accelerator)
    after = _retention_scores(retention_sets, model, tokenizer, template, cfg, accelerator, pad_id)
    if main:
        install_template(tokenizer, template, cfg.system_prompt)
        set_generation_ids(model, tokenizer)
        summary = result.summary() | {"base": cfg.base, "base_model_dir": model_dir(cfg.base), "method": cfg.method,
                                    "objective": cfg.objective, "template": template.name,
                                    "trainable_parameters": trainable, "total_parameters": total,
                                    "dropped": dict(report.dropped)}
        if retention_sets:
            summary["retention"] = compare_scores(retention_sets, before, after)
            for name, row in summary["retention"].items():
                console.print(f"retention on {name}: {row['kind']} {row['before']:.4g} -> {row['after']:.4g} "
                              f"({row['change']:+.4g})")
        if replay:
            summary["replay"] = {k: v for k, v in replay.items() if k != "items"}
        run.finish(model, tokenizer, summary, state_dict=result.full_state_dict)
        console.print(f"done: {result.steps} steps, {result.tokens:,} target tokens in {result.seconds:.1f}s, "
                      f"final loss {result.train_loss:.4f} → {run.model}")
    accelerator.wait_for_everyone()
    return run


def _retention_scores(sets, model, tokenizer, template, cfg: FinetuneConfig, accelerator, pad_id: int) -> dict:
    """Retention scores of the model as it is now (before training: the prepared base, LoRA's
    adapters still zero; after: the trained model)."""
    if not sets:
        return {}
    if cfg.method != "qlora" and next(model.parameters()).device != accelerator.device:
        model.to(accelerator.device)  # before training, the base may still be where it was loaded
    return measure(sets, model, tokenizer, template, cfg, accelerator, pad_id)


def _replay(cfg: FinetuneConfig, train_items, tokenizer, template, retention_sets, say) -> dict:
    """General data drawn into training: `replay_fraction` of the trained target tokens."""
    examples = load_examples(cfg.replay_data, cfg.system_prompt)
    leave_out = {text for s in retention_sets for text in s.texts}
    items, left_out = replay_items(examples, train_items, cfg.replay_fraction, cfg.seed, tokenizer, template,
                                   cfg.max_seq_tokens, leave_out)
    tokens = sum(i.target_tokens for i in items)
    share = tokens / max(tokens + sum(i.target_tokens for i in train_items), 1)
    say(f"replay: {len(items)} sequences from {', '.join(cfg.replay_data)} ({tokens:,} target tokens, "
        f"{share:.0%} of training)" + (f"; {left_out} retention document(s) left out" if left_out else ""))
    return {"items": items, "sequences": len(items), "target_tokens": tokens, "share": share,
            "fraction": cfg.replay_fraction, "files": list(cfg.replay_data), "left_out": left_out}


def _lint(cfg: FinetuneConfig, train_examples, eval_examples, tokenizer, template, max_seq_tokens: int) -> None:
    """Refuse data that lint finds errors in, unless told otherwise."""
    from specialize.data.lint import check_examples

    findings = check_examples(train_examples, eval_examples, tokenizer, template, max_seq_tokens,
                              for_training=True)
    for finding in findings:
        if finding.severity == "warning" and finding.code != "too_long":  # too_long: reported when dropped
            warn(finding.message)
    errors = [f for f in findings if f.severity == "error"]
    if errors and not cfg.allow_data_errors:
        raise UserError(f"data has {len(errors)} error(s), first: {errors[0].message} "
                        "(run `specialize lint` for all; --allow-data-errors trains anyway)")
