"""Lint for preference data (prompt/chosen/rejected, OpenAI's preference format, KTO's rows).

It reads the rows as `finetune --objective dpo|orpo|kto` reads them (`data.preference`), runs the
same checks (`check_preferences`: an empty side, chosen equal to rejected) and tokenises them the
same way (`encode_preferences`), so every row finetune would drop is named here first:

| code                 | finds                                                                        |
| -------------------- | ---------------------------------------------------------------------------- |
| `empty_side`         | a chosen, rejected or KTO completion that is empty                           |
| `identical`          | chosen equal to rejected: nothing to prefer                                  |
| `does_not_fit`       | a row finetune would drop: a side longer than max_seq_tokens, an answer with no trained token, or two sides that do not share the prompt's tokens |
"""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

from specialize.data.io import read_source
from specialize.data.marking import marked, trained_pieces
from specialize.data.preference import (
    check_preferences,
    detect_shape,
    encode_preferences,
    load_preferences,
)
from specialize.data.templates import resolve_template
from specialize.errors import UserError

SHOWN_SOURCES = 3


def is_preference_data(sources: list[str]) -> bool:
    """True when the first row of the first source has a preference shape's fields (as `load_preferences` reads)."""
    for records in read_source(sources[0]).values():
        if records:
            try:
                detect_shape(records[0].data, records[0].path, records[0].line)
            except UserError:
                return False
            return True
    return False


def lint_preferences(cfg, tokenizer, max_seq_tokens: int | None, unit: str, console: Console, plain: bool) -> int:
    """Print what the rows train and what is wrong with them; 1 on errors, else 0."""
    prefs = load_preferences(cfg.data, cfg.system_prompt)
    eval_prefs = load_preferences(cfg.eval_data, cfg.system_prompt) if cfg.eval_data else []
    multi_turn = any(len(p.prompt) > 1 for p in prefs)  # as finetune --objective picks the template
    template = resolve_template(cfg.template, tokenizer, {"messages"} if multi_turn else {"qa"})
    pairs = sum(p.is_pair for p in prefs)
    limit = f"max {max_seq_tokens} tokens" if max_seq_tokens else "no --base: lengths are UTF-8 bytes, not checked"
    console.print(f"{len(prefs)} preference rows ({pairs} pairs, {len(prefs) - pairs} labelled answers), "
                  f"{len(eval_prefs)} eval; template '{template.name}'; {limit}")
    errors: list[tuple[str, str, list[str]]] = []  # (code, message, sources)
    for rows in (prefs, eval_prefs):
        by_code: dict[str, list] = {}
        for finding in check_preferences(rows):
            by_code.setdefault(finding.code, []).append(finding)
        for code, found in by_code.items():
            errors.append((code, f"{len(found)} row(s): {found[0].message}" if len(found) > 1 else found[0].message,
                           [f.source for f in found]))
        items, report = encode_preferences(rows, tokenizer, template, max_seq_tokens or 10**9, required=False)
        for reason, n in report.dropped.items():
            errors.append(("does_not_fit", f"{n} row(s) finetune drops: {reason}", [report.first_dropped[reason]]))
        if rows is prefs:
            how = "in ⟦ ⟧" if plain else "bold green, masked dim"
            for item in items[: cfg.show]:
                sides = [("chosen", item.chosen), ("rejected", item.rejected)] if item.rejected is not None else \
                    [(f"completion, {'desirable' if item.desirable else 'undesirable'}", item.chosen)]
                for side, encoded in sides:
                    console.print(Text(f"\nexample {item.source} {side} (trained {unit} {how}):", style="bold"))
                    console.print(marked(trained_pieces(encoded, tokenizer), plain))
    console.print()
    for code, message, sources in errors:
        console.print(Text.assemble((f"error {code}", "bold red"), f": {message}"))
        more = f" (+{len(sources) - SHOWN_SOURCES} more)" if len(sources) > SHOWN_SOURCES else ""
        console.print(f"  {', '.join(sources[:SHOWN_SOURCES])}{more}")
    rows = f"{len(prefs) + len(eval_prefs)} preference rows"
    if errors:
        console.print(Text(f"FAILED: {len(errors)} error(s) in {rows}", "bold red"))
        return 1
    console.print(Text(f"OK: {rows}, no problems found", "green"))
    return 0
