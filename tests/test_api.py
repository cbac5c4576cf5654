"""The Python API: `from specialize import ...` gives the typed functions and configs the CLI calls,
and the README's Python example runs as written."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import specialize

README = Path(__file__).parents[1] / "README.md"


def test_api_names_are_the_functions_whatever_was_imported_first():
    importlib.import_module("specialize.finetune")  # binds the same-named submodule, as any import does
    importlib.import_module("specialize.evaluate.metrics")
    from specialize import FinetuneConfig, RunDir, compare, evaluate, export, finetune, pretrain

    from specialize.evaluate.compare import compare as compare_function
    from specialize.evaluate.run import run_eval
    from specialize.finetune import finetune as finetune_function

    assert finetune is finetune_function and specialize.finetune is finetune_function
    assert evaluate is run_eval and specialize.evaluate is run_eval and compare is compare_function
    assert callable(pretrain) and callable(export) and FinetuneConfig.__name__ == "FinetuneConfig"
    assert RunDir.__module__ == "specialize.rundir"
    assert set(specialize.__all__) <= set(dir(specialize))


def test_importing_the_package_stays_light():
    code = "import sys, specialize, specialize.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_readme_python_example_runs(tmp_path, tiny_llama, monkeypatch):
    """The README's ```python block, with its base and paths pointed at this test's tiny model."""
    block = re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert block, "README has no ```python example"
    code = block.group(1)
    assert "from specialize import" in code
    monkeypatch.chdir(tmp_path)
    qa = Path(__file__).parent / "assets" / "qa8.jsonl"
    (tmp_path / "faq.jsonl").write_text(qa.read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "test.jsonl").write_text(qa.read_text(encoding="utf-8"), encoding="utf-8")
    namespace: dict = {}
    exec(compile(code.replace('"HuggingFaceTB/SmolLM2-135M"', repr(str(tiny_llama))), "README.md", "exec"),
         namespace)
    run, metrics = namespace["run"], namespace["metrics"]
    assert (Path(run) / "model" / "adapter_config.json").is_file()
    assert 0.0 <= metrics["f1"] <= 1.0 and metrics["n"] == 8
