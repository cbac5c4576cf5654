"""The Data tab's work: preview a file's rows, lint it, convert documents to Q&A.

Lint is `specialize lint`'s own analysis (`data.lint.analyse` on the ids and labels finetune
trains on, `data.marking.trained_pieces` for what is trained), returned as JSON for the page
instead of printed; convert is `data.convert.convert`. Both run in the studio's process (they
load at most a tokenizer); paths are resolved by the workspace first, and shown relative to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from specialize.config import ConvertConfig, LintConfig
from specialize.data.formats import load_examples
from specialize.data.io import read_file
from specialize.data.lint import analyse
from specialize.data.marking import byte_tokenizer, length_report, trained_pieces
from specialize.data.templates import resolve_template
from specialize.defaults import model_context
from specialize.errors import UserError
from specialize.model import load_tokenizer
from specialize.studio.workspace import Workspace

PREVIEW_ROWS = 50
SHOWN_EXAMPLES = 20  # examples rendered with trained tokens marked
SHOWN_SOURCES = 50  # rows listed per finding (the count is always whole)


def _strip(text: str, workspace: Workspace) -> str:
    """Absolute workspace paths in messages and sources, shown relative to the workspace."""
    return text.replace(str(workspace.root) + "/", "")


def preview(workspace: Workspace, name: str, limit: int = PREVIEW_ROWS) -> dict[str, Any]:
    """The first `limit` raw rows of a data file, and how many it has."""
    path = workspace.resolve(name, must_exist=True)
    if not path.is_file():
        raise UserError(f"{name} is not a file")
    records = read_file(path)
    return {"path": name, "total": len(records),
            "rows": [{"line": r.line, "data": r.data} for r in records[:limit]]}


def lint_json(workspace: Workspace, cfg: LintConfig) -> dict[str, Any]:
    """`specialize lint` as JSON: the findings with their rows, and examples with trained text marked.

    `cfg.data`, `cfg.eval_data` and `cfg.base` are workspace-relative (a base may also be a hub
    id already in the local cache).
    """
    if not cfg.data:
        raise UserError("pick a data file to lint")
    data = [str(workspace.resolve(d, must_exist=True)) for d in cfg.data]
    eval_data = [str(workspace.resolve(d, must_exist=True)) for d in cfg.eval_data]
    train = load_examples(data, cfg.system_prompt)
    eval_examples = load_examples(eval_data, cfg.system_prompt) if eval_data else []
    if cfg.base:
        base = workspace.resolve(cfg.base)
        ref = str(base) if base.exists() else cfg.base  # not in the workspace: a hub id (cache only)
        max_seq_tokens = cfg.max_seq_tokens or model_context(ref, cfg.trust_remote_code) or 512
        tokenizer, unit = load_tokenizer(ref, cfg.trust_remote_code), "tokens"
    elif cfg.template == "tokenizer":
        raise UserError("template 'tokenizer' needs a base model (the tokenizer whose chat template to use)")
    else:
        tokenizer, max_seq_tokens, unit = byte_tokenizer(), None, "bytes"
    template = resolve_template(cfg.template, tokenizer, {e.shape for e in train})
    analysis = analyse(train, eval_examples, tokenizer, template, max_seq_tokens,
                       near_duplicate_threshold=cfg.near_duplicate_threshold, train_on_prompt=cfg.train_on_prompt)

    by_source = {e.source: e for e in [*train, *eval_examples]}
    findings, rows = [], {}
    for finding in analysis.findings:
        sources = finding.sources[:SHOWN_SOURCES]
        for pair in sources:  # "a.jsonl:3 = a.jsonl:1 (0.93)": both rows are shown
            for source in pair.replace("≈", "=").split(" = "):
                source = source.split(" (")[0].strip()
                if source in by_source:
                    example = by_source[source]
                    rows[_strip(source, workspace)] = example.messages if example.text is None else example.text
        findings.append({"severity": finding.severity, "code": finding.code,
                         "message": _strip(finding.message, workspace), "count": finding.count,
                         "sources": [_strip(s, workspace) for s in sources]})
    trained, total = analysis.trained_tokens, sum(analysis.lengths)
    errors = sum(f["severity"] == "error" for f in findings)
    return {
        "template": template.name, "unit": unit, "max_seq_tokens": max_seq_tokens,
        "train": len(train), "eval": len(eval_examples),
        "examples": [{"source": _strip(item.source, workspace), "pieces": trained_pieces(item, tokenizer)}
                     for item in analysis.encoded[:SHOWN_EXAMPLES]],
        "lengths": length_report(analysis.lengths, unit) if analysis.lengths else [],
        "trained": trained, "total": total, "findings": findings, "rows": rows,
        "ok": errors == 0, "errors": errors, "warnings": len(findings) - errors,
    }


CACHE_SUFFIX = ".generator-cache.jsonl"  # as data.convert.default_cache_path names it


def _writable(workspace: Workspace, field: str, name: str, suffix: str, *, hidden_name: bool = False) -> Path:
    """A file convert may write: the kind it writes (so `to: train.py` cannot overwrite a script),
    and not in a hidden folder (`.git`, the studio's own `.studio`). The cache's own default name
    is hidden (`.data.generator-cache.jsonl`), so `hidden_name` allows a dot on the file name."""
    path = workspace.resolve(name)
    if not path.name.lower().endswith(suffix):
        raise UserError(f"{field}: convert writes {suffix} files, not {name}")
    parts = Path(workspace.relative(path)).parts
    if any(p.startswith(".") for p in (parts[:-1] if hidden_name else parts)):
        raise UserError(f"{field}: convert does not write into hidden files or folders: {name}")
    return path


def convert_json(workspace: Workspace, cfg: ConvertConfig) -> dict[str, Any]:
    """`specialize convert` with rules only (no generator: the studio reaches no network)."""
    if not cfg.inputs:
        raise UserError("pick files or folders to convert")
    if cfg.generator:
        raise UserError("the studio converts with rules only; run `specialize convert --generator URL` for an LLM")
    inputs = [str(workspace.resolve(i, must_exist=True)) for i in cfg.inputs]
    to = _writable(workspace, "to", str(cfg.to), ".jsonl")
    from specialize.data.convert import convert

    cache = _writable(workspace, "cache", str(cfg.cache), CACHE_SUFFIX, hidden_name=True) if cfg.cache else None
    summary = convert(cfg.model_copy(update={"inputs": inputs, "to": to, "cache": cache}), progress=False)
    return {"to": workspace.relative(to), "summary": _strip(str(summary), workspace)}
