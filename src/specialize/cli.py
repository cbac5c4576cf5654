"""The `specialize` command: one thin typer command per verb.

Each command's flags are generated from its stage's config model (`flags.config_command`: one
flag per field, its description as help, its default shown); the command receives the resolved
config (defaults < --config YAML < flags) and calls the stage's typed function. User errors are caught once, in `main`, and printed as one
line with exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import gc
import inspect
import os
import sys

import typer
from rich.console import Console
from rich.text import Text

from specialize.config import (ChatConfig, CompareConfig, ConvertConfig, CurveConfig, DemoConfig, EvalConfig,
                               ExportConfig, FinetuneConfig, GenerateConfig, LintConfig, PairsConfig, PretrainConfig,
                               ServeConfig, StudioConfig)
from specialize.errors import Stopped, UserError
from specialize.flags import config_command

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode="rich",
                  help="Turn a general-purpose language model into a specialist, locally.")
err = Console(stderr=True, markup=False)  # user text (paths, server replies) is printed verbatim


@config_command(app, DemoConfig)
def demo(cfg: DemoConfig) -> None:
    """The whole life cycle on the Python standard library docs: pretrain → finetune → compare."""
    if cfg.updates:
        from specialize.updates import run_updates

        run_updates(cfg)
        return
    from specialize.demo import run_demo

    run_demo(cfg)


@config_command(app, PretrainConfig)
def pretrain(cfg: PretrainConfig) -> None:
    """Random weights → a base model, on raw text."""
    from specialize.pretrain import pretrain as run

    run(cfg)


@config_command(app, FinetuneConfig)
def finetune(cfg: FinetuneConfig) -> None:
    """A base model + data → a specialist (full fine-tuning, LoRA or QLoRA)."""
    from specialize.finetune import finetune as run

    run(cfg)


PROMPTS = inspect.Parameter("prompts", inspect.Parameter.KEYWORD_ONLY, annotation=list[str],
                            default=typer.Argument(..., help="prompt(s); each answer is printed on its own"))


@config_command(app, GenerateConfig, extra=[PROMPTS])
def generate(cfg: GenerateConfig, prompts: list[str]) -> None:
    """Answer prompt(s) with a run's own template; prints only the answers."""
    from specialize.generate import generate_answers

    if not cfg.model:
        raise UserError("no model given (use --model RUN)")
    for completion in generate_answers(cfg.model, prompts, max_new_tokens=cfg.max_new_tokens,
                                       temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.batch_size,
                                       system_prompt=cfg.system_prompt, trust_remote_code=cfg.trust_remote_code,
                                       seed=cfg.seed):
        print(completion.text)


@config_command(app, ChatConfig)
def chat(cfg: ChatConfig) -> None:
    """Interactive terminal chat with streaming output (/reset, /exit)."""
    from specialize.chat import chat as run

    run(cfg)


@config_command(app, EvalConfig, "eval", aliases={"json_output": ["--json"]})
def evaluate(cfg: EvalConfig) -> None:
    """Metrics for one model (or a predictions file) on one test set."""
    from specialize.evaluate.run import run_eval

    run_eval(cfg)


@config_command(app, CompareConfig)
def compare(cfg: CompareConfig) -> None:
    """Base vs base+RAG vs fine-tuned vs fine-tuned+RAG on one test set → scorecard + report."""
    from specialize.evaluate.compare import compare as run

    run(cfg)


@config_command(app, ConvertConfig, arguments=["inputs"])
def convert(cfg: ConvertConfig) -> None:
    """FAQ pages, docs, support chats or a Slack export → Q&A JSONL with provenance."""
    from specialize.data.convert import convert as run

    err.print(str(run(cfg)), highlight=False)


@config_command(app, LintConfig)
def lint(cfg: LintConfig) -> None:
    """Pre-flight: show what the model will learn, and what is wrong with the data (exit 1 on errors)."""
    from specialize.data.lint import lint as run

    raise typer.Exit(run(cfg))


@config_command(app, CurveConfig)
def curve(cfg: CurveConfig) -> None:
    """Learning curve: one fine-tuning run per data fraction and seed, scored on each split and on retention."""
    from specialize.curve import run_curve

    run_curve(cfg)


@config_command(app, PairsConfig)
def pairs(cfg: PairsConfig) -> None:
    """A run's own sampled answers, graded against the references → chosen/rejected preference pairs."""
    from specialize.pairs import make_pairs

    make_pairs(cfg)


@config_command(app, ServeConfig)
def serve(cfg: ServeConfig) -> None:
    """OpenAI-compatible HTTP server for a run."""
    from specialize.serve import serve as run

    if cfg.api_key and not os.environ.get("SPECIALIZE_API_KEY") == cfg.api_key:
        err.print(Text.assemble(("warning:", "yellow"), " a key given as --api-key is visible to other users in `ps` "
                                "and stays in your shell history; prefer the SPECIALIZE_API_KEY environment variable"),
                  highlight=False)
    run(cfg)


@config_command(app, ExportConfig)
def export(cfg: ExportConfig) -> None:
    """A standalone HF folder (LoRA merged) for transformers, vLLM or llama.cpp converters."""
    from specialize.export import export as run

    run(cfg)


@config_command(app, StudioConfig)
def studio(cfg: StudioConfig) -> None:
    """The life cycle in the browser: data and lint, training with live curves, runs, compare, playground, export."""
    from specialize.studio import studio as run

    run(cfg)


def main() -> None:
    try:
        app()
    except UserError as e:
        # Text, not markup: a message quoting user data ("messages[0]") must print verbatim.
        err.print(Text.assemble(("error:", "bold red"), " ", str(e)), highlight=False, soft_wrap=True)
        sys.exit(2)
    except Stopped as e:  # a signal ended training at a step boundary, after a checkpoint
        err.print(str(e), highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
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
