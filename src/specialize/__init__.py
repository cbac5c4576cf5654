"""specialize: turn a general-purpose causal language model into a specialist, locally.

The Python API is the same typed functions and configs the command line calls:

    from specialize import FinetuneConfig, finetune, evaluate, EvalConfig

    run = finetune(FinetuneConfig(base="runs/base", data=["faq.jsonl"], out="runs/faq", method="lora"))
    metrics = evaluate(EvalConfig(model=str(run), data="test.jsonl"))

Everything is imported on first use, so `import specialize` (and the `specialize` command's
start-up, shell completion included) does not pay for torch and transformers.

Some functions share their name with the module that defines them (`specialize.finetune` the
function lives in `specialize/finetune.py`). As in mlx-lm, the package attribute is the
function: `from specialize import finetune` and `specialize.finetune(...)` call it, and the
module stays reachable as `from specialize.finetune import split_examples` or
`importlib.import_module("specialize.finetune")`.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (module, attribute)
_API: dict[str, tuple[str, str]] = {
    "pretrain": ("specialize.pretrain", "pretrain"),
    "finetune": ("specialize.finetune", "finetune"),
    "evaluate": ("specialize.evaluate.run", "run_eval"),
    "compare": ("specialize.evaluate.compare", "compare"),
    "convert": ("specialize.data.convert", "convert"),
    "lint": ("specialize.data.lint", "lint"),
    "export": ("specialize.export", "export"),
    "run_demo": ("specialize.demo", "run_demo"),
    "Generator": ("specialize.generate", "Generator"),
    "generate_answers": ("specialize.generate", "generate_answers"),
    "RunDir": ("specialize.rundir", "RunDir"),
    "UserError": ("specialize.errors", "UserError"),
    **{name: ("specialize.config", name) for name in (
        "TrainConfig", "PretrainConfig", "FinetuneConfig", "GenerateConfig", "ChatConfig", "EvalConfig",
        "CompareConfig", "ConvertConfig", "LintConfig", "ServeConfig", "ExportConfig", "DemoConfig",
        "load_config")},
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'specialize' has no attribute {name!r}")
    module, attribute = _API[name]
    return getattr(importlib.import_module(module), attribute)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


class _Package(types.ModuleType):
    """Keeps the public functions public when their same-named submodule is imported.

    Importing `specialize.finetune` makes Python bind the submodule to the package attribute
    `finetune`; for names of the API that binding is skipped, so the attribute stays the
    function (served by `__getattr__` above), whatever was imported first.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

if TYPE_CHECKING:  # what type checkers and IDEs see
    from specialize.config import (ChatConfig, CompareConfig, ConvertConfig, DemoConfig, EvalConfig,  # noqa: F401
                                   ExportConfig, FinetuneConfig, GenerateConfig, LintConfig, PretrainConfig,
                                   ServeConfig, TrainConfig, load_config)
    from specialize.data.convert import convert  # noqa: F401
    from specialize.data.lint import lint  # noqa: F401
    from specialize.demo import run_demo  # noqa: F401
    from specialize.errors import UserError  # noqa: F401
    from specialize.evaluate.compare import compare  # noqa: F401
    from specialize.evaluate.run import run_eval as evaluate  # noqa: F401
    from specialize.export import export  # noqa: F401
    from specialize.finetune import finetune  # noqa: F401
    from specialize.generate import Generator, generate_answers  # noqa: F401
    from specialize.pretrain import pretrain  # noqa: F401
    from specialize.rundir import RunDir  # noqa: F401
