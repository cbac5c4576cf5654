"""`specialize finetune`: a base model (hub id, folder or run) + data → a specialist run folder.

    specialize finetune --base runs/base --data faq.jsonl --out runs/faq --method lora

The run folder holds everything later verbs need: `config.yaml`, `model/` (HF folder, or a
PEFT adapter pointing at its base, with the tokenizer and the chat template used in training),
`metrics.jsonl`, `checkpoints/` and `train_summary.json`.
"""

from __future__ import annotations

import random

import torch
from accelerate.utils import set_seed
from rich.console import Console
from rich.text import Text

from specialize import defaults
from specialize.config import FinetuneConfig
from specialize.data.formats import Example, load_examples
from specialize.data.templates import install_template, resolve_template
from specialize.data.tokenize import encode_examples, pad_token_id
from specialize.errors import UserError
from specialize.memory import estimate_memory, resident_bytes
from specialize.model import (add_lora, count_parameters, load_model, load_tokenizer, model_dir,
                              pick_dtype, set_generation_ids)
from specialize.rundir import RunDir
from specialize.train import make_accelerator, train

console = Console(stderr=True, markup=False)  # paths and data are printed verbatim

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


def _weights_dtype(cfg: FinetuneConfig, device):
    """Full fine-tuning keeps fp32 master weights (bf16 comes from autocast): in bf16 weights, most
    updates at fine-tuning learning rates (~1e-5) are below the format's resolution and vanish.
    Frozen LoRA bases can be stored in the compute dtype (`auto` decides after loading, in fp32)."""
    if cfg.method in ("full", "auto") and cfg.precision == "auto":
        return torch.float32
    return pick_dtype(cfg.precision, device)


def finetune(cfg: FinetuneConfig) -> RunDir:
    """Fine-tune and write the run folder; returns it."""
    if not cfg.base:
        raise UserError("no base model given (use --base HUB_ID_OR_FOLDER)")
    accelerator = make_accelerator(cfg.precision, cfg.report_to, cfg.out)
    main = accelerator.is_main_process
    # First, before minutes of loading: a folder we may not write is refused at once.
    with RunDir.start(cfg, kind="finetune", inputs=[model_dir(cfg.base), *cfg.data, *cfg.eval_data, cfg.rag_docs],
                      main=main) as run:
        return _finetune(cfg, run, accelerator)


def _finetune(cfg: FinetuneConfig, run: RunDir, accelerator) -> RunDir:
    main = accelerator.is_main_process
    tokenizer = load_tokenizer(cfg.base, cfg.trust_remote_code)
    if cfg.objective != "sft":
        return _finetune_preferences(cfg, run, accelerator, tokenizer)
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
            _warn(line)
        for line in eval_report.lines():
            _warn("eval data: " + line)
        if eval_examples and not eval_items:
            _warn("no eval example is left, so this run reports no eval loss")
        console.print(f"data: {len(train_items)} training sequences, {len(eval_items)} eval, template '{template.name}'")

    model, cfg, trainable, total = _prepare_model(cfg, accelerator, choices, _largest_micro_batch(train_items, cfg))
    run.begin(cfg, kind="finetune", main=main, say=console.print)
    accelerator.wait_for_everyone()  # the old run's outputs are gone before anyone writes

    model, result = train(model, train_items, eval_items, cfg, run.path, pad_id=pad_token_id(tokenizer),
                          accelerator=accelerator)
    if main:
        install_template(tokenizer, template, cfg.system_prompt)
        set_generation_ids(model, tokenizer)
        summary = result.summary() | {"base": cfg.base, "base_model_dir": model_dir(cfg.base), "method": cfg.method,
                                    "objective": cfg.objective, "template": template.name,
                                    "trainable_parameters": trainable, "total_parameters": total,
                                    "dropped": dict(report.dropped)}
        run.finish(model, tokenizer, summary, state_dict=result.full_state_dict)
        console.print(f"done: {result.steps} steps, {result.tokens:,} target tokens in {result.seconds:.1f}s, "
                      f"final loss {result.train_loss:.4f} → {run.model}")
    accelerator.wait_for_everyone()
    return run


def _largest_micro_batch(items, cfg: FinetuneConfig) -> tuple[int, int]:
    """(tokens, target tokens) of the largest micro-batch the data can make: the memory estimate's
    activations follow the data, not `micro_batch_size x max_seq_tokens` (packed rows hold the
    examples' real lengths, and only target positions are projected to the vocabulary)."""
    lengths = sorted((len(i.input_ids) for i in items), reverse=True)[:cfg.micro_batch_size]
    targets = sorted((i.target_tokens for i in items), reverse=True)[:cfg.micro_batch_size]
    tokens = sum(lengths) if cfg.packing else len(lengths) * (lengths[0] if lengths else 0)
    return tokens, sum(targets)


def _prepare_model(cfg: FinetuneConfig, accelerator, choices: list,
                   micro_batch: tuple[int, int] | None = None) -> tuple:
    """Load the base, resolve method and learning rate, add LoRA: (model, resolved cfg, trainable, total)."""
    main = accelerator.is_main_process
    method = cfg.method
    counted = defaults.model_parameters(cfg.base, cfg.trust_remote_code) if method == "auto" else None
    if counted is not None:  # decided before loading, so the weights load once, in the method's dtype
        choices.append(defaults.method(counted))
        method = choices[-1].value
    model = load_model(cfg.base, trust_remote_code=cfg.trust_remote_code, quantize_4bit=method == "qlora",
                       dtype=_weights_dtype(cfg.model_copy(update={"method": method}), accelerator.device),
                       merge_adapter=True)  # a LoRA run: merged
    parameters = count_parameters(model)[1]
    if method == "auto":  # the config alone could not tell
        choices.append(defaults.method(parameters))
        method = choices[-1].value
        if method == "lora" and (dtype := pick_dtype(cfg.precision, accelerator.device)) != model.dtype:
            model = model.to(dtype)  # a frozen base may live in the compute dtype (bf16 on GPUs)
    if cfg.learning_rate is None:
        choices.append(defaults.learning_rate(method, parameters))
    cfg = cfg.model_copy(update={"method": method, "learning_rate": cfg.learning_rate or choices[-1].value})
    if main:
        for choice in choices:
            console.print(str(choice))
    set_seed(cfg.seed)  # LoRA's initial weights are drawn here
    if cfg.method in ("lora", "qlora"):
        model = add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules,
                         quantized=cfg.method == "qlora")
    trainable, total = count_parameters(model)
    if main:
        console.print(f"model: {total:,} parameters, {trainable:,} trainable ({cfg.method})")
        tokens, targets = micro_batch or (None, None)
        # Measured only where the weights already are (CPU runs); on a GPU they move there later.
        where = next(model.parameters()).device
        resident = resident_bytes(where) if where.type == accelerator.device.type else None
        console.print(str(estimate_memory(model, cfg, cfg.method, tokens=tokens, target_tokens=targets,
                                          resident=resident)))
    return model, cfg, trainable, total


def _finetune_preferences(cfg: FinetuneConfig, run: RunDir, accelerator, tokenizer) -> RunDir:
    """--objective dpo|orpo|kto: preference rows → the same loop with a preference loss and batch source."""
    from specialize.data.preference import check_preferences, encode_preferences, load_preferences, unpair
    from specialize.objectives.preference import (REFERENCE_FILE, PreferenceBatches, PreferenceLoss,
                                                  compute_reference, load_reference, save_reference)

    main = accelerator.is_main_process
    if cfg.objective == "kto" and accelerator.num_processes > 1:
        # A KTO row's KL term needs a forward on a mismatched answer that some micro-batches lack;
        # processes would then run different forwards and their collectives would not line up.
        raise UserError("--objective kto runs on one process for now (under torchrun/accelerate launch its "
                        "processes would run different numbers of forwards); dpo and orpo run on several")
    prefs = load_preferences(cfg.data, cfg.system_prompt)
    eval_prefs = load_preferences(cfg.eval_data, cfg.system_prompt) if cfg.eval_data else []
    if cfg.objective == "kto":
        prefs, eval_prefs = unpair(prefs), unpair(eval_prefs)
    elif unpaired := next((p for p in prefs if not p.is_pair), None):
        raise UserError(f"--objective {cfg.objective} needs pairs (prompt/chosen/rejected, or OpenAI's "
                        f"preferred_output/non_preferred_output); prompt/completion/label rows train with "
                        f"--objective kto (first: {unpaired.source})")
    multi_turn = any(len(p.prompt) > 1 for p in prefs)  # a system message or earlier turns: chatml
    template = resolve_template(cfg.template, tokenizer, {"messages"} if multi_turn else {"qa"})
    context = defaults.model_context(cfg.base, cfg.trust_remote_code)
    if context is not None and cfg.max_seq_tokens is not None and context < cfg.max_seq_tokens:
        raise UserError(f"--max-seq-tokens {cfg.max_seq_tokens} is longer than the {context} positions "
                        f"'{cfg.base}' holds; lower it to at most {context}, or leave it unset")
    limit = cfg.max_seq_tokens or context or defaults.TEXT_WINDOW * 64
    findings = check_preferences(prefs)
    if findings and not cfg.allow_data_errors:
        raise UserError(f"data has {len(findings)} error(s), first: {findings[0].message} "
                        "(--allow-data-errors trains anyway)")
    if main:
        for finding in findings:
            _warn(finding.message)
    items, report = encode_preferences(prefs, tokenizer, template, limit)
    # the eval loss is on the answers the run should give: chosen, or (KTO) the desirable ones only
    eval_items = [i.chosen for i in encode_preferences(eval_prefs, tokenizer, template, limit, required=False)[0]
                  if getattr(i, "desirable", True)]
    choices = []
    if cfg.max_seq_tokens is None:
        longest = max(len(s.input_ids) for i in items for s in (i.chosen, i.rejected, i.mismatched) if s is not None)
        choices.append(defaults.max_seq_tokens(context, longest, False))
        cfg = cfg.model_copy(update={"max_seq_tokens": choices[-1].value})
    unit = "rows" if cfg.objective == "kto" else "pairs"
    if main:
        for line in report.lines():
            _warn(line)
        console.print(f"data: {len(items)} {unit}, {len(eval_items)} eval answers, template '{template.name}', "
                      f"objective {cfg.objective} (beta {cfg.beta})")

    model, cfg, trainable, total = _prepare_model(cfg, accelerator, choices)
    _disable_dropout(model)
    lora = cfg.method in ("lora", "qlora")
    run.begin(cfg, kind="finetune", main=main, say=console.print)
    accelerator.wait_for_everyone()
    reference_path = run.path / REFERENCE_FILE
    reference = "none (orpo)" if cfg.objective == "orpo" else "the base with adapters disabled" if lora else None
    if reference is None:
        # Full training: the reference is the model as it is now, scored once, before the loop changes it.
        if not (cfg.resume and load_reference(items, reference_path)):
            if main:
                console.print(f"reference log-probs: scoring {len(items)} {unit} with the base model")
            model.to(accelerator.device)
            with accelerator.autocast():  # as the training steps run, so step 1's log-ratio is exactly 0
                compute_reference(model, items, pad_token_id(tokenizer), cfg.micro_batch_size, accelerator.device)
            if main:
                save_reference(items, reference_path)
        reference = f"precomputed ({REFERENCE_FILE})"
    elif main and not cfg.resume:
        reference_path.unlink(missing_ok=True)  # an earlier full run's, which this run does not use

    objective = PreferenceLoss(cfg.objective, cfg.beta, cfg.dpo_loss)

    def log_rewards(step: int, row: dict) -> dict:
        return objective.row()  # the loop writes it to metrics.jsonl and the trackers

    model, result = train(model, [], eval_items, cfg, run.path, pad_id=pad_token_id(tokenizer),
                          accelerator=accelerator, loss=objective,
                          batches=PreferenceBatches(items, cfg, pad_token_id(tokenizer)), callback=log_rewards)
    if main:
        install_template(tokenizer, template, cfg.system_prompt)
        set_generation_ids(model, tokenizer)
        summary = result.summary() | {
            "base": cfg.base, "base_model_dir": model_dir(cfg.base), "method": cfg.method,
            "objective": cfg.objective, "beta": cfg.beta, "reference": reference, "template": template.name,
            "trainable_parameters": trainable, "total_parameters": total, unit: len(items),
            "dropped": dict(report.dropped)}
        if cfg.objective == "dpo":
            summary["dpo_loss"] = cfg.dpo_loss
        summary[f"{unit}_trained"] = summary.pop("tokens")  # the loop counts weight units: here, examples
        run.finish(model, tokenizer, summary, state_dict=result.full_state_dict)
        console.print(f"done: {result.steps} steps, {result.tokens:,} {unit} in {result.seconds:.1f}s, "
                      f"final loss {result.train_loss:.4f} → {run.model}")
    accelerator.wait_for_everyone()
    return run


def _warn(message: str) -> None:
    console.print(Text.assemble(("warning:", "yellow"), " ", message), highlight=False)


def _lint(cfg: FinetuneConfig, train_examples, eval_examples, tokenizer, template, max_seq_tokens: int) -> None:
    """Refuse data that lint finds errors in, unless told otherwise."""
    from specialize.data.lint import check_examples

    findings = check_examples(train_examples, eval_examples, tokenizer, template, max_seq_tokens,
                              for_training=True)
    for finding in findings:
        if finding.severity == "warning" and finding.code != "too_long":  # too_long: reported when dropped
            _warn(finding.message)
    errors = [f for f in findings if f.severity == "error"]
    if errors and not cfg.allow_data_errors:
        raise UserError(f"data has {len(errors)} error(s), first: {errors[0].message} "
                        "(run `specialize lint` for all; --allow-data-errors trains anyway)")


def _disable_dropout(model) -> None:
    """Preference objectives compare the policy with the reference on the same tokens: with dropout
    the two differ by noise (step 1's log-ratio would not be 0), so it is off, as in TRL by default."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0  # attention that applies dropout functionally (Llama, Qwen, ...)
