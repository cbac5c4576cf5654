"""Forms from the config models, and form values back to command-line flags.

The Train form is `FinetuneConfig` read field by field, the same source `flags.py` builds the
CLI from: the same names, defaults, descriptions and choices. What the form sends back is
checked by the same pydantic model, then written as the flags `specialize finetune` takes
(`flags.flag_name`), only for the fields that differ from their default. Fields that name files
or folders are confined to the workspace first.
"""

from __future__ import annotations

import os
import typing
from typing import Any

from pydantic import ValidationError

from specialize.config import CompareConfig, ExportConfig, FinetuneConfig, StageConfig
from specialize.errors import UserError
from specialize.flags import _default, _panel, _strip_none, flag_name
from specialize.studio.workspace import Workspace

FORMS: dict[str, type[StageConfig]] = {"finetune": FinetuneConfig, "compare": CompareConfig, "export": ExportConfig}
# Every text field (str, Path or a list of them) is taken to name a file or folder and confined to
# the workspace, unless it is listed here: a field added to a config later is confined by default.
# A base or data entry that is not in the workspace may still be a hub id or dataset name: those
# are relative names, and no absolute path or `..` gets through either way.
NOT_PATHS = {"report_to", "system_prompt", "lora_target_modules", "reward", "judge_url", "judge_model"}
# NAME=PATH values (compare's --predictions, --runs): the child reads the part after the first `=`.
NAMED_PATHS = {"predictions", "runs"}
# Set by the studio itself: the log is a file, not a terminal.
FIXED = {"progress", "config"}


def _kind(annotation: Any) -> tuple[str, list[Any] | None, bool]:
    """(input kind, choices, nullable) of a field for the page."""
    inner, nullable = _strip_none(annotation)
    if typing.get_origin(inner) is typing.Literal:
        return "choice", list(typing.get_args(inner)), nullable
    if typing.get_origin(inner) is list:
        return "list", None, nullable
    kind = {bool: "bool", int: "int", float: "float"}.get(inner, "text")
    return kind, None, nullable


def is_path(cls: type[StageConfig], field: str) -> bool:
    """Whether the form sends `field` on as a file or folder (confined to the workspace)."""
    if field in NOT_PATHS or field in FIXED:
        return False
    inner, _ = _strip_none(cls.model_fields[field].annotation)
    if typing.get_origin(inner) is list:
        inner, _ = _strip_none(typing.get_args(inner)[0])
    return isinstance(inner, type) and issubclass(inner, (str, os.PathLike))


def schema(name: str) -> list[dict[str, Any]]:
    """The fields of a form: name, flag, kind, default, help, choices, panel."""
    cls = FORMS[name]
    fields = []
    for field, info in cls.model_fields.items():
        if field in FIXED:
            continue
        kind, choices, nullable = _kind(info.annotation)
        default = _default(info)
        fields.append({"name": field, "flag": flag_name(field), "kind": kind, "choices": choices,
                       "nullable": nullable, "default": str(default) if hasattr(default, "__fspath__") else default,
                       "help": info.description or "", "panel": _panel(cls, field) or "",
                       "path": is_path(cls, field)})
    return fields


def _confine(workspace: Workspace, cls: type[StageConfig], field: str, value: Any) -> Any:
    if field not in cls.model_fields or not is_path(cls, field) or value in (None, ""):
        return value
    if isinstance(value, list):
        return [_confine(workspace, cls, field, v) for v in value]
    if not isinstance(value, str):
        return value  # pydantic refuses it with the field's name
    path = value.partition("=")[2] if field in NAMED_PATHS and "=" in value else value
    try:
        workspace.resolve(path)  # raises for absolute paths, `..` and symlinks out
    except UserError as e:
        raise type(e)(f"{field}: {e}") from None
    return value


def to_flags(workspace: Workspace, name: str, values: dict[str, Any]) -> tuple[StageConfig, list[str]]:
    """Check `values` with the form's config model and turn them into flags.

    Returns the validated config and the flags for the fields that differ from their defaults,
    plus `--no-progress`. Raises UserError naming the first bad field, as the CLI would.
    """
    cls = FORMS[name]
    unknown = sorted(set(values) - set(cls.model_fields) - FIXED)
    if unknown:
        raise UserError(f"unknown field '{unknown[0]}'")
    given = {k: _confine(workspace, cls, k, v) for k, v in values.items() if k not in FIXED}
    try:
        cfg = cls(**given)
    except ValidationError as e:
        err = e.errors()[0]
        raise UserError(f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    flags: list[str] = []
    for field, info in cls.model_fields.items():
        if field not in given or field in FIXED:
            continue
        value, default = getattr(cfg, field), _default(info)
        if value == default:
            continue
        flag = flag_name(field)
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{field.replace('_', '-')}")
        elif isinstance(value, list):
            for item in value:
                flags += [flag, str(item)]
        elif value is None:
            flags += [flag, "none"]
        else:
            flags += [flag, str(value)]
    if "progress" in cls.model_fields:
        flags.append("--no-progress")
    return cfg, flags
