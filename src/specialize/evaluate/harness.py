"""Standard benchmarks on a run with lm-evaluation-harness (`pip install lm-eval`, optional).

A run's `model/` is a plain HF folder with its template saved as the tokenizer's chat template,
so the harness's `hf` model evaluates it like any hub model, with no specialize code involved:

    lm_eval --model hf --model_args pretrained=runs/x/model --tasks arc_easy,hellaswag --batch_size 8
    lm_eval --model hf --model_args pretrained=runs/x/model --include_path tests/assets/harness \
        --tasks specialize_qa8 --apply_chat_template      # a local task, see its YAML

`--apply_chat_template` renders each task prompt with the run's saved template (the prompt the
run was trained on); leave it out for log-likelihood benchmarks written for base models. A LoRA
run is its base plus the adapter: `pretrained=BASE,peft=runs/x/model,tokenizer=runs/x/model`
(`lm_eval_model_args` builds that). Local tasks (`dataset_path: json` + `data_files`, metric
`exact_match`) run offline with HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from specialize.errors import UserError
from specialize.model import is_adapter, model_dir

OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def lm_eval_model_args(run: str | Path) -> str:
    """`--model_args` for the harness's `hf` model: a full run's folder, or base + adapter for LoRA."""
    folder = model_dir(run)
    if not is_adapter(run):
        return f"pretrained={folder}"
    config = json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8"))
    base = config["base_model_name_or_path"]
    if is_adapter(base):  # a LoRA trained on a LoRA run: lm-eval loads one adapter over a plain model
        raise UserError(f"this LoRA was trained on another LoRA run ({base}); lm-eval cannot stack adapters: "
                        f"run `specialize export --model {run} --out DIR` and evaluate DIR")
    # the tokenizer comes from the run: the base's would not carry the run's chat template
    return f"pretrained={base},peft={folder},tokenizer={folder}"


def lm_eval_command(run: str | Path, tasks: list[str], *, include_path: str | Path | None = None,
                    apply_chat_template: bool = True, batch_size: int | str = 8, limit: int | None = None,
                    output_path: str | Path | None = None, device: str | None = None) -> list[str]:
    """The argv that evaluates a run with lm-evaluation-harness (run it with subprocess)."""
    argv = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", lm_eval_model_args(run),
            "--tasks", ",".join(tasks), "--batch_size", str(batch_size)]
    if include_path is not None:
        argv += ["--include_path", str(include_path)]
    if apply_chat_template:
        argv.append("--apply_chat_template")
    if limit is not None:
        argv += ["--limit", str(limit)]
    if output_path is not None:
        argv += ["--output_path", str(output_path)]
    if device is not None:
        argv += ["--device", device]
    return argv


def read_results(output_path: str | Path) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from the newest results_*.json the harness wrote under output_path.

    The harness names metrics "metric,filter"; the default filter ("none") is dropped from the name.
    """
    files = sorted(Path(output_path).rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no results_*.json under {output_path}")
    results = json.loads(files[-1].read_text(encoding="utf-8"))["results"]
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "," in key:
                name, _, filter_name = key.partition(",")
                out.setdefault(task, {})[name if filter_name == "none" else key] = value
    return out
