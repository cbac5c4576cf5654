"""The `specialize` command: one thin typer command per verb.

Each command turns its flags into the stage's config (defaults < --config YAML < flags) and
calls the stage's typed function. User errors are caught once, in `main`, and printed as one
line with exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text

from specialize.config import (ChatConfig, CompareConfig, ConvertConfig, DemoConfig, EvalConfig, ExportConfig,
                               FinetuneConfig, GenerateConfig, LintConfig, PretrainConfig, ServeConfig, load_config)
from specialize.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn a general-purpose language model into a specialist, locally.")
err = Console(stderr=True, markup=False)  # user text (paths, server replies) is printed verbatim

ConfigOpt = typer.Option(None, "--config", help="YAML file with the same keys as the flags (flags win)")


@app.command()
def demo(
    out: Optional[Path] = typer.Option(None, help="folder for the run, scorecard.json and report.html"),
    facts: Optional[int] = typer.Option(None, help="facts in the training split"),
    eval_examples: Optional[int] = typer.Option(None, help="questions per test split"),
    size: Optional[str] = typer.Option(None, help="size of the pre-trained base (micro, tiny, small, base)"),
    pretrain_steps: Optional[int] = typer.Option(None, help="pre-training steps (the base is cached)"),
    finetune_steps: Optional[int] = typer.Option(None, help="fine-tuning steps"),
    seed: Optional[int] = typer.Option(None),
    rebuild: Optional[bool] = typer.Option(None, "--rebuild", help="ignore the caches"),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress"),
    config: Optional[Path] = ConfigOpt,
):
    """The whole life cycle on the Python standard library docs: pretrain → finetune → compare."""
    from specialize.demo import run_demo

    run_demo(load_config(DemoConfig, config, out=out, facts=facts, eval_examples=eval_examples, size=size,
                         pretrain_steps=pretrain_steps, finetune_steps=finetune_steps, seed=seed, rebuild=rebuild,
                         progress=progress))


@app.command()
def pretrain(
    data: Optional[list[str]] = typer.Option(None, help="text files, folders, or JSONL with a text field"),
    out: Optional[Path] = typer.Option(None, help="run folder to write"),
    size: Optional[str] = typer.Option(None, help="tiny, small, base, or a config.json"),
    tokenizer: Optional[str] = typer.Option(None, help="existing tokenizer; default: train a BPE here"),
    vocab_size: Optional[int] = typer.Option(None),
    epochs: Optional[float] = typer.Option(None),
    max_steps: Optional[int] = typer.Option(None),
    learning_rate: Optional[float] = typer.Option(None),
    micro_batch_size: Optional[int] = typer.Option(None),
    grad_accum_steps: Optional[int] = typer.Option(None),
    max_seq_tokens: Optional[int] = typer.Option(None, help="block length in tokens"),
    seed: Optional[int] = typer.Option(None),
    save_every: Optional[int] = typer.Option(None),
    resume: Optional[bool] = typer.Option(None, "--resume", help="continue from the newest checkpoint in --out"),
    eval_fraction: Optional[float] = typer.Option(None, help="share of blocks held out for perplexity"),
    precision: Optional[str] = typer.Option(None, help="auto | fp32 | bf16 | fp16"),
    lr_schedule: Optional[str] = typer.Option(None, help="cosine | linear | constant"),
    warmup_steps: Optional[int] = typer.Option(None),
    eval_every: Optional[int] = typer.Option(None),
    compile: Optional[bool] = typer.Option(None, "--compile"),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress"),
    config: Optional[Path] = ConfigOpt,
):
    """Random weights → a base model, on raw text."""
    from specialize.pretrain import pretrain as run

    run(load_config(PretrainConfig, config, data=data, out=out, size=size, tokenizer=tokenizer,
                    vocab_size=vocab_size, epochs=epochs, max_steps=max_steps, learning_rate=learning_rate,
                    micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps,
                    max_seq_tokens=max_seq_tokens, seed=seed, save_every=save_every, resume=resume,
                    eval_fraction=eval_fraction, precision=precision, lr_schedule=lr_schedule,
                    warmup_steps=warmup_steps, eval_every=eval_every, compile=compile, progress=progress))


@app.command()
def finetune(
    base: Optional[str] = typer.Option(None, help="hub id, local HF folder, or a specialize run"),
    data: Optional[list[str]] = typer.Option(None, help="training data (repeatable)"),
    out: Optional[Path] = typer.Option(None, help="run folder to write"),
    method: Optional[str] = typer.Option(None, help="full | lora | qlora"),
    epochs: Optional[float] = typer.Option(None),
    max_steps: Optional[int] = typer.Option(None),
    learning_rate: Optional[float] = typer.Option(None),
    micro_batch_size: Optional[int] = typer.Option(None),
    grad_accum_steps: Optional[int] = typer.Option(None),
    max_seq_tokens: Optional[int] = typer.Option(None),
    seed: Optional[int] = typer.Option(None),
    save_every: Optional[int] = typer.Option(None),
    resume: Optional[bool] = typer.Option(None, "--resume", help="continue from the newest checkpoint in --out"),
    packing: Optional[bool] = typer.Option(None, "--packing/--no-packing", help="pack examples (exact, no cross-attention)"),
    eval_data: Optional[list[str]] = typer.Option(None, help="held-out data for eval loss"),
    template: Optional[str] = typer.Option(None, help="auto | qa | alpaca | chatml | tokenizer"),
    lora_rank: Optional[int] = typer.Option(None),
    lora_alpha: Optional[int] = typer.Option(None),
    lora_dropout: Optional[float] = typer.Option(None),
    precision: Optional[str] = typer.Option(None, help="auto | fp32 | bf16 | fp16"),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing"),
    compile: Optional[bool] = typer.Option(None, "--compile"),
    rag_docs: Optional[str] = typer.Option(None, help="documents to retrieve context from while training"),
    allow_data_errors: Optional[bool] = typer.Option(None, "--allow-data-errors"),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code"),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress"),
    optimizer: Optional[str] = typer.Option(None, help="adamw | adamw_fused | adamw_8bit"),
    keep_checkpoints: Optional[int] = typer.Option(None, help="newest checkpoints kept"),
    eval_every: Optional[int] = typer.Option(None, help="optimizer steps between eval-loss runs"),
    system_prompt: Optional[str] = typer.Option(None, help="system message added to every example that has none"),
    train_on_prompt: Optional[bool] = typer.Option(None, "--train-on-prompt", help="train on prompt tokens too"),
    config: Optional[Path] = ConfigOpt,
):
    """A base model + data → a specialist (full fine-tuning, LoRA or QLoRA)."""
    from specialize.finetune import finetune as run

    run(load_config(FinetuneConfig, config, base=base, data=data, out=out, method=method, epochs=epochs,
                    max_steps=max_steps, learning_rate=learning_rate, micro_batch_size=micro_batch_size,
                    grad_accum_steps=grad_accum_steps, max_seq_tokens=max_seq_tokens, seed=seed,
                    save_every=save_every, resume=resume, packing=packing, eval_data=eval_data, template=template,
                    lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, precision=precision,
                    gradient_checkpointing=gradient_checkpointing, compile=compile, rag_docs=rag_docs,
                    allow_data_errors=allow_data_errors, trust_remote_code=trust_remote_code, progress=progress,
                    optimizer=optimizer, keep_checkpoints=keep_checkpoints, eval_every=eval_every,
                    system_prompt=system_prompt, train_on_prompt=train_on_prompt))


@app.command()
def generate(
    prompts: list[str] = typer.Argument(..., help="prompt(s); each answer is printed on its own"),
    model: Optional[str] = typer.Option(None, help="run folder, model folder or hub id"),
    max_new_tokens: Optional[int] = typer.Option(None),
    temperature: Optional[float] = typer.Option(None, help="0 is greedy"),
    top_p: Optional[float] = typer.Option(None),
    system_prompt: Optional[str] = typer.Option(None),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code"),
    config: Optional[Path] = ConfigOpt,
):
    """Answer prompt(s) with a run's own template; prints only the answers."""
    from specialize.generate import generate_answers

    cfg = load_config(GenerateConfig, config, model=model, max_new_tokens=max_new_tokens, temperature=temperature,
                      top_p=top_p, system_prompt=system_prompt, trust_remote_code=trust_remote_code)
    if not cfg.model:
        raise UserError("no model given (use --model RUN)")
    for completion in generate_answers(cfg.model, prompts, max_new_tokens=cfg.max_new_tokens,
                                       temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.batch_size,
                                       system_prompt=cfg.system_prompt, trust_remote_code=cfg.trust_remote_code,
                                       seed=cfg.seed):
        print(completion.text)


@app.command()
def chat(
    model: Optional[str] = typer.Option(None, help="run folder, model folder or hub id"),
    max_new_tokens: Optional[int] = typer.Option(None),
    temperature: Optional[float] = typer.Option(None),
    system_prompt: Optional[str] = typer.Option(None),
    top_p: Optional[float] = typer.Option(None),
    seed: Optional[int] = typer.Option(None),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code"),
    config: Optional[Path] = ConfigOpt,
):
    """Interactive terminal chat with streaming output (/reset, /exit)."""
    from specialize.chat import chat as run

    run(load_config(ChatConfig, config, model=model, max_new_tokens=max_new_tokens, temperature=temperature,
                    system_prompt=system_prompt, top_p=top_p, seed=seed, trust_remote_code=trust_remote_code))


@app.command("eval")
def evaluate(
    model: Optional[str] = typer.Option(None, help="run folder, model folder or hub id"),
    data: Optional[str] = typer.Option(None, help="test set"),
    predictions: Optional[str] = typer.Option(None, help="JSONL of {prediction, reference} to score without a model"),
    task: Optional[str] = typer.Option(None, help="qa | classify | extract | generate"),
    max_new_tokens: Optional[int] = typer.Option(None),
    docs: Optional[str] = typer.Option(None, help="documents for RAG"),
    json_output: Optional[bool] = typer.Option(None, "--json", help="print one JSON object of metrics"),
    out: Optional[Path] = typer.Option(None, help="folder for metrics.json and predictions.jsonl"),
    batch_size: Optional[int] = typer.Option(None, help="prompts per generation batch"),
    top_k: Optional[int] = typer.Option(None, help="passages per RAG prompt"),
    judge_url: Optional[str] = typer.Option(None, help="OpenAI-compatible endpoint for LLM-as-judge"),
    judge_model: Optional[str] = typer.Option(None, help="model name at the judge endpoint"),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code"),
    config: Optional[Path] = ConfigOpt,
):
    """Metrics for one model (or a predictions file) on one test set."""
    from specialize.evaluate.run import run_eval

    run_eval(load_config(EvalConfig, config, model=model, data=data, predictions=predictions, task=task,
                         max_new_tokens=max_new_tokens, docs=docs, json_output=json_output, out=out,
                         batch_size=batch_size, top_k=top_k, judge_url=judge_url, judge_model=judge_model,
                         trust_remote_code=trust_remote_code))


@app.command()
def compare(
    base: Optional[str] = typer.Option(None, help="base model"),
    model: Optional[str] = typer.Option(None, help="fine-tuned run"),
    data: Optional[list[str]] = typer.Option(None, help="test files; each is one split"),
    docs: Optional[str] = typer.Option(None, help="documents for RAG"),
    predictions: Optional[list[str]] = typer.Option(None, help="NAME=FILE predictions of another system"),
    fewshot: Optional[int] = typer.Option(None, help="also run base+fewshot with N examples"),
    task: Optional[str] = typer.Option(None),
    max_new_tokens: Optional[int] = typer.Option(None),
    out: Optional[Path] = typer.Option(None, help="folder for scorecard.json and report.html"),
    batch_size: Optional[int] = typer.Option(None, help="prompts per generation batch"),
    top_k: Optional[int] = typer.Option(None, help="passages per RAG prompt"),
    judge_url: Optional[str] = typer.Option(None, help="OpenAI-compatible endpoint for LLM-as-judge"),
    judge_model: Optional[str] = typer.Option(None, help="model name at the judge endpoint"),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code"),
    config: Optional[Path] = ConfigOpt,
):
    """Base vs base+RAG vs fine-tuned vs fine-tuned+RAG on one test set → scorecard + report."""
    from specialize.evaluate.compare import compare as run

    run(load_config(CompareConfig, config, base=base, model=model, data=data, docs=docs, predictions=predictions,
                    fewshot=fewshot, task=task, max_new_tokens=max_new_tokens, out=out, batch_size=batch_size,
                    top_k=top_k, judge_url=judge_url, judge_model=judge_model, trust_remote_code=trust_remote_code))


@app.command()
def convert(
    inputs: list[str] = typer.Argument(..., help="files or folders to convert"),
    to: Optional[Path] = typer.Option(None, help="output JSONL"),
    kind: Optional[str] = typer.Option(None, help="auto | faq | docs | chat | slack"),
    generator: Optional[str] = typer.Option(None, help="OpenAI-compatible base URL to generate Q&A"),
    generator_model: Optional[str] = typer.Option(None),
    api_key_env: Optional[str] = typer.Option(None, help="environment variable holding the generator's key"),
    concurrency: Optional[int] = typer.Option(None, help="generator requests in flight"),
    generator_max_tokens: Optional[int] = typer.Option(None, help="most tokens per generator reply (cut off: retried)"),
    cache: Optional[Path] = typer.Option(None, help="resumable cache of generator answers"),
    conversation_column: Optional[str] = typer.Option(None, help="CSV chats: conversation id column"),
    speaker_column: Optional[str] = typer.Option(None, help="CSV chats: speaker column"),
    text_column: Optional[str] = typer.Option(None, help="CSV chats: message text column"),
    agent_speakers: Optional[list[str]] = typer.Option(None, help="CSV chats: speaker values that are the agent"),
    config: Optional[Path] = ConfigOpt,
):
    """FAQ pages, docs, support chats or a Slack export → Q&A JSONL with provenance."""
    from specialize.data.convert import convert as run

    summary = run(load_config(ConvertConfig, config, inputs=inputs, to=to, kind=kind, generator=generator,
                              generator_model=generator_model, api_key_env=api_key_env, concurrency=concurrency,
                              cache=cache, conversation_column=conversation_column, speaker_column=speaker_column,
                              text_column=text_column, agent_speakers=agent_speakers,
                              generator_max_tokens=generator_max_tokens))
    err.print(str(summary), highlight=False)


@app.command()
def lint(
    data: Optional[list[str]] = typer.Option(None, help="training data"),
    eval_data: Optional[list[str]] = typer.Option(None, help="eval data checked for leakage"),
    base: Optional[str] = typer.Option(None, help="model whose tokenizer and template are checked"),
    max_seq_tokens: Optional[int] = typer.Option(None),
    template: Optional[str] = typer.Option(None),
    show: Optional[int] = typer.Option(None, help="examples rendered with trained tokens marked"),
    near_duplicate_threshold: Optional[float] = typer.Option(None, help="similarity that counts as a near duplicate"),
    system_prompt: Optional[str] = typer.Option(None, help="system message for examples without one (as finetune)"),
    train_on_prompt: Optional[bool] = typer.Option(None, "--train-on-prompt", help="prompt tokens are trained too"),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code"),
    config: Optional[Path] = ConfigOpt,
):
    """Pre-flight: show what the model will learn, and what is wrong with the data (exit 1 on errors)."""
    from specialize.data.lint import lint as run

    code = run(load_config(LintConfig, config, data=data, eval_data=eval_data, base=base,
                           max_seq_tokens=max_seq_tokens, template=template, show=show,
                           near_duplicate_threshold=near_duplicate_threshold, system_prompt=system_prompt,
                           train_on_prompt=train_on_prompt, trust_remote_code=trust_remote_code))
    raise typer.Exit(code)


@app.command()
def serve(
    model: Optional[str] = typer.Option(None, help="run folder, model folder or hub id"),
    host: Optional[str] = typer.Option(None, help="bind address (default 127.0.0.1)"),
    port: Optional[int] = typer.Option(None),
    api_key: Optional[str] = typer.Option(None, help="require this bearer key (or set SPECIALIZE_API_KEY)"),
    max_batch_size: Optional[int] = typer.Option(None, help="requests generated together"),
    max_queue: Optional[int] = typer.Option(None, help="waiting requests before new ones get 503"),
    max_new_tokens: Optional[int] = typer.Option(None, help="most tokens per answer; a request asking for more gets 400"),
    model_name: Optional[str] = typer.Option(None, help="name shown in /v1/models"),
    log_contents: Optional[bool] = typer.Option(None, "--log-contents", help="log message contents"),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code"),
    config: Optional[Path] = ConfigOpt,
):
    """OpenAI-compatible HTTP server for a run."""
    from specialize.serve import serve as run

    if api_key:
        err.print(Text.assemble(("warning:", "yellow"), " a key given as --api-key is visible to other users in `ps` "
                                "and stays in your shell history; prefer the SPECIALIZE_API_KEY environment variable"),
                  highlight=False)

    run(load_config(ServeConfig, config, model=model, host=host, port=port, api_key=api_key,
                    max_batch_size=max_batch_size, max_queue=max_queue, max_new_tokens=max_new_tokens,
                    model_name=model_name,
                    log_contents=log_contents, trust_remote_code=trust_remote_code))


@app.command()
def export(
    model: Optional[str] = typer.Option(None, help="run folder"),
    out: Optional[Path] = typer.Option(None, help="folder to write"),
    dtype: Optional[str] = typer.Option(None, help="auto | fp32 | bf16 | fp16"),
    parity_prompts: Optional[int] = typer.Option(None, help="prompts compared before/after export"),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code"),
    config: Optional[Path] = ConfigOpt,
):
    """A standalone HF folder (LoRA merged) for transformers, vLLM or llama.cpp converters."""
    from specialize.export import export as run

    run(load_config(ExportConfig, config, model=model, out=out, dtype=dtype, parity_prompts=parity_prompts,
                    trust_remote_code=trust_remote_code))


def main() -> None:
    try:
        app()
    except UserError as e:
        # Text, not markup: a message quoting user data ("messages[0]") must print verbatim.
        err.print(Text.assemble(("error:", "bold red"), " ", str(e)), highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except OSError as e:  # a path the user gave cannot be read or written (not a folder, permissions, disk full)
        where = f"{e.filename}: " if e.filename else ""
        err.print(Text.assemble(("error:", "bold red"), f" {where}{e.strerror or e}"), highlight=False, soft_wrap=True)
        sys.exit(2)
    finally:
        # At exit CPython runs a full garbage collection over every object the imports made
        # (~1 s with torch and transformers loaded) before the OS frees the memory anyway.
        # Frozen objects are skipped by it; everything we write is closed before this point.
        gc.freeze()


if __name__ == "__main__":
    main()
