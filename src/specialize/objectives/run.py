"""`specialize finetune --objective dpo|orpo|kto`: preference rows → the one training loop with a
preference loss (`PreferenceLoss`) and batch source (`PreferenceBatches`).

`finetune` dispatches here after loading the tokenizer; the model is prepared as for SFT
(`specialize.prepare`), and the reference is the LoRA-disabled base or, for full training,
log-probabilities scored once before the loop and stored in the run folder.
"""

from __future__ import annotations

from specialize import defaults
from specialize.config import FinetuneConfig
from specialize.data.preference import check_preferences, encode_preferences, load_preferences, unpair
from specialize.data.templates import install_template, resolve_template
from specialize.data.tokenize import pad_token_id
from specialize.errors import UserError
from specialize.model import model_dir, set_generation_ids
from specialize.objectives.preference import (REFERENCE_FILE, PreferenceBatches, PreferenceLoss, compute_reference,
                                              load_reference, save_reference)
from specialize.prepare import console, disable_dropout, prepare_model, warn
from specialize.rundir import RunDir
from specialize.train import train

DEFAULT_BETA = 0.1


def finetune_preferences(cfg: FinetuneConfig, run: RunDir, accelerator, tokenizer) -> RunDir:
    """--objective dpo|orpo|kto: preference rows → the same loop with a preference loss and batch source."""
    main = accelerator.is_main_process
    if cfg.objective == "kto" and accelerator.num_processes > 1:
        # A KTO row's KL term needs a forward on a mismatched answer that some micro-batches lack;
        # processes would then run different forwards and their collectives would not line up.
        raise UserError("--objective kto runs on one process for now (under torchrun/accelerate launch its "
                        "processes would run different numbers of forwards); dpo and orpo run on several")
    if cfg.beta is None:
        cfg = cfg.model_copy(update={"beta": DEFAULT_BETA})  # saved resolved with the run
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
            warn(finding.message)
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
            warn(line)
        console.print(f"data: {len(items)} {unit}, {len(eval_items)} eval answers, template '{template.name}', "
                      f"objective {cfg.objective} (beta {cfg.beta})")

    model, cfg, trainable, total = prepare_model(cfg, accelerator, choices)
    disable_dropout(model)
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

    objective = PreferenceLoss(cfg.objective, cfg.beta, cfg.dpo_loss, cfg.sft_weight)

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
            summary["dpo_loss"], summary["sft_weight"] = cfg.dpo_loss, cfg.sft_weight
        summary[f"{unit}_trained"] = summary.pop("tokens")  # the loop counts weight units: here, examples
        run.finish(model, tokenizer, summary, state_dict=result.full_state_dict)
        console.print(f"done: {result.steps} steps, {result.tokens:,} {unit} in {result.seconds:.1f}s, "
                      f"final loss {result.train_loss:.4f} → {run.model}")
    accelerator.wait_for_everyone()
    return run
