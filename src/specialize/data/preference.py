"""Preference data: pairs of a better and a worse answer, or answers labelled good or bad.

Shapes (detected per file from the first row's keys, then required of every row):

| shape     | fields                                                     | becomes                        |
| --------- | ---------------------------------------------------------- | ------------------------------ |
| `pairs`   | prompt, chosen, rejected (strings, or TRL conversations)   | a pair                         |
| `openai`  | input.messages, preferred_output, non_preferred_output     | a pair (OpenAI's DPO format)   |
| `kto`     | prompt, completion, label (true: desirable)                | one labelled answer            |

TRL's conversational rows hold message lists: `prompt` the conversation so far, `chosen` and
`rejected` the assistant turn(s) that follow; without `prompt`, `chosen` and `rejected` are whole
conversations whose last assistant turn differs, and what comes before it is the prompt.

Both sides of a pair are rendered with the run's template and tokenised as SFT tokenises a
conversation (`tokenize.encode_chat`), so they share the exact prompt tokens and only answer
tokens are labelled; assistant turns inside the prompt are context (weight 0), never trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from specialize.data import formats
from specialize.data.formats import ROLES, Example, read_shaped
from specialize.data.io import Record
from specialize.data.templates import Template
from specialize.data.tokenize import IGNORE, Encoded, EncodeReport, encode_chat
from specialize.errors import UserError

SHAPES: dict[str, tuple[str, ...]] = {
    "openai": ("input", "preferred_output", "non_preferred_output"),
    "pairs": ("chosen", "rejected"),
    "kto": ("prompt", "completion", "label"),
}


@dataclass
class Preference:
    """One row: a prompt (messages) and either two answers (`rejected` set) or one labelled answer.

    Answers are message lists (normally one assistant message) that follow the prompt.
    """

    prompt: list[dict[str, Any]]
    chosen: list[dict[str, Any]]  # the preferred answer, or KTO's completion
    rejected: list[dict[str, Any]] | None = None
    desirable: bool = True  # KTO's label; pairs: True
    source: str = ""

    @property
    def is_pair(self) -> bool:
        return self.rejected is not None


def detect_shape(row: dict[str, Any], path: str, line: int | None) -> str:
    """The preference shape of a row (pairs, OpenAI's, KTO's), as SFT data's shape is detected."""
    return formats.detect_shape(row, path, line, SHAPES, "not preference data:")


def _fail(record: Record, name: str, message: str) -> UserError:
    return UserError(message, path=record.path, line=record.line, field=name)


def _messages(value: Any, record: Record, name: str, *, answer: bool) -> list[dict[str, Any]]:
    """A string (one user or assistant message), or a list of {role, content} messages."""
    if isinstance(value, str):
        return [{"role": "assistant" if answer else "user", "content": value}]
    if not isinstance(value, list) or not value:
        got = "null" if value is None else type(value).__name__
        raise _fail(record, name, f"expected text or a non-empty list of messages, got {got}")
    messages = []
    for i, turn in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(turn, dict):
            raise _fail(record, where, "expected an object with role and content")
        if turn.get("role") not in ROLES:
            raise _fail(record, f"{where}.role", f"unknown role {turn.get('role')!r} (allowed: {', '.join(ROLES)})")
        if not isinstance(turn.get("content"), str):
            raise _fail(record, f"{where}.content", f"expected text, got {type(turn.get('content')).__name__}")
        messages.append({"role": turn["role"], "content": turn["content"]})
    return messages


def _split_conversation(messages: list[dict[str, Any]], record: Record, name: str):
    """(everything before the last assistant turn, that turn): TRL's implicit prompt."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or last != len(messages) - 1:
        raise _fail(record, name, "a conversation must end with the assistant turn to compare")
    return messages[:last], messages[last:]


def _answer(messages: list[dict[str, Any]], record: Record, name: str) -> list[dict[str, Any]]:
    if messages[-1]["role"] != "assistant":
        raise _fail(record, name, "the answer must end with an assistant message")
    return messages


def to_preference(record: Record, shape: str, system_prompt: str | None = None) -> Preference:
    """Normalise one record of a known shape; raise `UserError` naming the field at fault."""
    row, source = record.data, f"{record.path}:{record.line}" if record.line else record.path
    if shape == "openai":
        given = row["input"]
        if not isinstance(given, dict) or "messages" not in given:
            raise _fail(record, "input", "expected an object with 'messages'")
        prompt = _messages(given["messages"], record, "input.messages", answer=False)
        chosen = _answer(_messages(row["preferred_output"], record, "preferred_output", answer=True), record,
                         "preferred_output")
        rejected = _answer(_messages(row["non_preferred_output"], record, "non_preferred_output", answer=True),
                           record, "non_preferred_output")
        pref = Preference(prompt, chosen, rejected, source=source)
    elif shape == "pairs":
        chosen = _messages(row["chosen"], record, "chosen", answer=True)
        rejected = _messages(row["rejected"], record, "rejected", answer=True)
        if "prompt" in row and row["prompt"] is not None:
            prompt = _messages(row["prompt"], record, "prompt", answer=False)
        elif isinstance(row["chosen"], list) and isinstance(row["rejected"], list):
            prompt, chosen = _split_conversation(chosen, record, "chosen")
            rejected_prompt, rejected = _split_conversation(rejected, record, "rejected")
            if rejected_prompt != prompt:
                raise _fail(record, "rejected", "chosen and rejected must share every turn before the last "
                                                "assistant turn (that is the prompt)")
        else:
            raise _fail(record, "prompt", "missing (chosen/rejected as text need a prompt)")
        pref = Preference(prompt, _answer(chosen, record, "chosen"), _answer(rejected, record, "rejected"),
                          source=source)
    else:
        label = row["label"]
        if isinstance(label, str) and label.strip().lower() in ("true", "false"):  # CSV
            label = label.strip().lower() == "true"
        if not isinstance(label, bool):
            raise _fail(record, "label", f"expected true or false, got {label!r}")
        prompt = _messages(row["prompt"], record, "prompt", answer=False)
        completion = _answer(_messages(row["completion"], record, "completion", answer=True), record, "completion")
        pref = Preference(prompt, completion, desirable=label, source=source)
    if not pref.prompt or not any(m["role"] == "user" for m in pref.prompt):
        raise _fail(record, "prompt" if shape != "openai" else "input.messages", "the prompt has no user message")
    if system_prompt and pref.prompt[0]["role"] != "system":
        pref.prompt = [{"role": "system", "content": system_prompt}] + pref.prompt
    return pref


def load_preferences(sources: list[str], system_prompt: str | None = None) -> list[Preference]:
    """Read every source (JSONL, JSON, CSV, Parquet) and normalise its rows; shape per file."""
    return read_shaped(sources, detect_shape, lambda record, shape: to_preference(record, shape, system_prompt))


def unpair(prefs: list[Preference]) -> list[Preference]:
    """Pairs as KTO rows: the chosen answer desirable, the rejected one not (as TRL's `unpair_preference_dataset`)."""
    out = []
    for pref in prefs:
        if not pref.is_pair:
            out.append(pref)
            continue
        out.append(Preference(pref.prompt, pref.chosen, desirable=True, source=pref.source))
        out.append(Preference(pref.prompt, pref.rejected, desirable=False, source=pref.source))
    return out


# ---------------------------------------------------------------------------------------------
# Checks (lint-like): what would make a row useless or harmful to train on.


@dataclass
class Finding:
    code: str  # empty_side, identical
    message: str
    source: str


def _text(messages: list[dict[str, Any]] | None) -> str:
    return "".join(m["content"] for m in messages or [])


def check_preferences(prefs: list[Preference]) -> list[Finding]:
    """Errors that make a row teach nothing (or the wrong thing): an empty answer, chosen equal to rejected."""
    findings = []
    for pref in prefs:
        sides = [("chosen" if pref.is_pair else "completion", pref.chosen)]
        if pref.is_pair:
            sides.append(("rejected", pref.rejected))
        for name, messages in sides:
            if not _text(messages).strip():
                findings.append(Finding("empty_side", f"{pref.source}: {name} is empty", pref.source))
        if pref.is_pair and _text(pref.chosen).strip() and pref.chosen == pref.rejected:
            findings.append(Finding("identical", f"{pref.source}: chosen equals rejected (nothing to prefer)",
                                    pref.source))
    return findings


# ---------------------------------------------------------------------------------------------
# Tokenising.


@dataclass
class PreferenceItem:
    """One tokenised row: `chosen` (and `rejected` for a pair) share their prompt tokens.

    KTO rows also carry `mismatched`: their prompt with another row's completion, for the KL
    estimate (see objectives.preference). `reference` holds the reference model's summed log-probs
    of (chosen, rejected) or (completion, mismatched) when they are computed ahead of training.
    """

    chosen: Encoded
    rejected: Encoded | None = None
    desirable: bool = True
    mismatched: Encoded | None = None
    reference: tuple[float, float] | None = None
    source: str = ""


def encode_answer(prompt: list[dict[str, Any]], answer: list[dict[str, Any]], tokenizer, template: Template,
                  source: str) -> Encoded:
    """The prompt and one answer as SFT tokenises them; only the answer and its end of turn are labelled
    (assistant turns of the prompt are context, weight 0). GRPO encodes its sampled answers so too."""
    context = [dict(m, weight=0) if m["role"] == "assistant" else m for m in prompt]
    return encode_chat(Example(messages=context + answer, shape="preference", source=source), tokenizer, template)


def prompt_length(item: Encoded) -> int:
    """Tokens before the first labelled one: the prompt."""
    return next((i for i, label in enumerate(item.labels) if label != IGNORE), len(item.labels))


def encode_preferences(prefs: list[Preference], tokenizer, template: Template, max_seq_tokens: int,
                       required: bool = True) -> tuple[list[PreferenceItem], EncodeReport]:
    """Tokenise every row; a pair with a side longer than `max_seq_tokens` is dropped and counted, never cut."""
    report, items = EncodeReport(unit="row"), []
    for index, pref in enumerate(prefs):
        chosen = encode_answer(pref.prompt, pref.chosen, tokenizer, template, pref.source)
        rejected = encode_answer(pref.prompt, pref.rejected, tokenizer, template, pref.source) if pref.is_pair else None
        sides = [chosen] + ([rejected] if rejected is not None else [])
        if any(len(side.input_ids) > max_seq_tokens for side in sides):
            report.drop(f"longer than --max-seq-tokens {max_seq_tokens}", pref.source)
            continue
        if any(side.target_tokens == 0 for side in sides):
            report.drop("an answer with no trained token after templating", pref.source)
            continue
        if rejected is not None:
            n = prompt_length(chosen)
            if prompt_length(rejected) != n or rejected.input_ids[:n] != chosen.input_ids[:n]:
                # Only the answers may differ, or the log-ratio compares two different prompts.
                report.drop("chosen and rejected do not tokenise to the same prompt tokens", pref.source)
                continue
        mismatched = None
        other = _next_other_prompt(prefs, index) if not pref.is_pair else None
        if other is not None:
            # KTO's KL estimate: this prompt with a completion written for another prompt (the next
            # row with a different prompt: unpaired pairs put a prompt's two answers side by side).
            mismatched = encode_answer(pref.prompt, other.chosen, tokenizer, template, pref.source)
            if len(mismatched.input_ids) > max_seq_tokens or mismatched.target_tokens == 0:
                mismatched = None
        items.append(PreferenceItem(chosen, rejected, pref.desirable, mismatched, source=pref.source))
        report.kept += 1
    if not items and required:
        raise UserError(f"nothing left to train on: {'; '.join(report.lines()) or 'no rows'}")
    return items, report


def _next_other_prompt(prefs: list, index: int):
    """The first row after `index` (wrapping around) whose prompt differs from row `index`'s."""
    prompt = prefs[index].prompt
    for step in range(1, len(prefs)):
        other = prefs[(index + step) % len(prefs)]
        if other.prompt != prompt:
            return other
    return None
