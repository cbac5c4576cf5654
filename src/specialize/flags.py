"""Flags from the config models: every field of a stage's config is a flag of its command.

    @config_command(app, FinetuneConfig)
    def finetune(cfg: FinetuneConfig) -> None: ...

makes `specialize finetune --max-seq-tokens N ...` with one flag per field of FinetuneConfig,
named after the field, with the field's description as its help and its real default shown.
A field added to a config is a flag at once: nothing in `cli.py` repeats a field by hand.

A flag the user did not type (click's parameter source says so) is not passed on: the value then
comes from `--config file.yaml`, else from the config's own default (defaults < YAML < flags,
in `load_config`).
A field that defaults to a value but accepts null (`max_grad_norm`) takes `none` on the command line.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import typer
from pydantic.fields import FieldInfo
from rich.markup import escape

from specialize.config import NULL, StageConfig, TrainConfig, load_config

CONFIG_FLAG = "config"
LOOP_PANEL = "Training loop (same flags on pretrain and finetune)"
LORA_PANEL = "LoRA"


def _strip_none(annotation: Any) -> tuple[Any, bool]:
    """(the type without None, whether None was allowed): `int | None` -> (int, True)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _default(info: FieldInfo) -> Any:
    return info.get_default(call_default_factory=True)


def _metavar(inner: Any) -> str | None:
    if typing.get_origin(inner) is typing.Literal:
        return "|".join(map(str, typing.get_args(inner)))
    if typing.get_origin(inner) is list:
        return "TEXT"
    return {int: "INTEGER", float: "FLOAT", str: "TEXT", Path: "PATH"}.get(inner)


def _nullable_parser(inner: type) -> Callable[[str], Any]:
    def parse(value: Any) -> Any:
        if not isinstance(value, str):  # click passes the default through the parser too
            return value
        if value.strip().lower() in ("none", "null"):
            return NULL
        return inner(value)
    return parse


def _panel(cls: type[StageConfig], field: str) -> str | None:
    if issubclass(cls, TrainConfig) and field in TrainConfig.model_fields:
        return LOOP_PANEL
    if field.startswith("lora_"):
        return LORA_PANEL
    return None


def field_parameter(cls: type[StageConfig], field: str, info: FieldInfo, *, argument: bool = False,
                    aliases: Sequence[str] = ()) -> inspect.Parameter:
    """The typer parameter for one config field (an option, or a positional argument).

    Its default is the field's own, so `--help` shows the real one; whether the user gave the
    flag is read from click's parameter source, not from the value (see `config_command`).
    """
    inner, nullable = _strip_none(info.annotation)
    help_text = escape(info.description or "")  # help is rich markup: "[INST]" in a description stays text
    default = _default(info)
    if typing.get_origin(inner) is list:
        help_text += " (repeatable)"
    if argument:
        return inspect.Parameter(field, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[inner],
                                 default=typer.Argument(default or None, help=help_text, show_default=False,
                                                        metavar=field.upper()))
    options: dict[str, Any] = dict(help=help_text, show_default=default not in (None, [], ""),
                                   rich_help_panel=_panel(cls, field), metavar=_metavar(inner))
    names = [flag_name(field), *aliases]
    annotation: Any = Optional[inner]
    if typing.get_origin(inner) is list and typing.get_args(inner) not in ((str,), ()):
        # `--fractions 0.1,0.25` is one value that the config's validator splits: the flag takes
        # text and pydantic converts it (click would reject "0.1,0.25" as a float).
        annotation = Optional[list[str]]
        options["default"] = [str(v) for v in default] if default else default
    if inner is bool:
        names = [f"{flag_name(field)}/--no-{field.replace('_', '-')}", *aliases]
        options["metavar"] = ""  # an on/off flag takes no value
    elif nullable and default is not None and inner in (int, float, str):
        # Only null can switch such a field off, so the flag takes `none` too.
        options["parser"] = _nullable_parser(inner)
        options["metavar"] = f"{_metavar(inner)}|none"
    default = options.pop("default", default)
    return inspect.Parameter(field, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(default, *names, **options))


def quiet_library_bars() -> None:
    """`--no-progress` also silences the bars transformers and huggingface_hub draw while loading and
    saving weights ("Loading weights: 100%|...", one per load, in every log)."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()


def config_command(app: typer.Typer, cls: type[StageConfig], name: str | None = None, *,
                   arguments: Sequence[str] = (), aliases: dict[str, Sequence[str]] | None = None,
                   extra: Sequence[inspect.Parameter] = ()) -> Callable:
    """Register `body(cfg, **extra)` as a command whose flags are the fields of `cls`.

    Args:
        arguments: fields taken as positional arguments instead of flags (`convert INPUTS...`).
        aliases: other names a field's flag also answers to (`--json` for `json_output`).
        extra: parameters that are not config fields (`generate`'s prompts), passed to `body` by name.
    """
    aliases = aliases or {}

    def register(body: Callable) -> Callable:
        params = list(extra)
        for field, info in cls.model_fields.items():
            params.append(field_parameter(cls, field, info, argument=field in arguments,
                                          aliases=aliases.get(field, ())))
        params.append(inspect.Parameter(
            CONFIG_FLAG, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
            default=typer.Option(None, "--config", help="YAML file with the same keys as the flags (flags win)")))
        extra_names = {p.name for p in extra}

        def command(ctx: typer.Context, **values: Any) -> Any:
            config_file = values.pop(CONFIG_FLAG)
            passed = {k: values.pop(k) for k in list(values) if k in extra_names}
            # A flag left out must not override the YAML file: only flags the user typed count.
            given = {k: v for k, v in values.items()
                     if ctx.get_parameter_source(k).name not in ("DEFAULT", "DEFAULT_MAP")}
            cfg = load_config(cls, config_file, **given)
            if getattr(cfg, "progress", True) is False:
                quiet_library_bars()
            return body(cfg, **passed)

        params.insert(0, inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context))
        command.__signature__ = inspect.Signature(params)  # what typer reads the flags from
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__doc__ = body.__doc__
        command.__name__ = body.__name__
        app.command(name or body.__name__.replace("_", "-"))(command)
        return body

    return register
