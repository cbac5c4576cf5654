"""`specialize lint`: the pre-flight check — what the model will learn from the data, and what is wrong with it.

    specialize lint --data faq.jsonl --eval-data test.jsonl --base runs/base --max-seq-tokens 512

Every check runs on the token ids and labels that `tokenize.encode_chat` produces, the ones
finetune trains on, so lint cannot disagree with training.

| code                     | severity | finds                                                                  |
| ------------------------ | -------- | ---------------------------------------------------------------------- |
| `no_trained_tokens`      | error    | labels all -100: nothing to learn                                      |
| `eos_not_trained`        | error    | a final answer not ending in a trained EOS or end-of-turn token: the model never learns to stop |
| `empty_answer`           | error    | only whitespace/punctuation in an answer, in the data or as templated  |
| `template_roundtrip`     | error    | prompt tokens in training ≠ at inference, or no turn-by-turn rendering |
| `template_error`         | error    | the template refuses the conversation (Gemma 2 on a system message)    |
| `leakage`                | error    | an eval prompt that is (nearly) a training prompt                      |
| `too_long`               | error*   | longer than `max_seq_tokens`                                           |
| `duplicate`              | error*   | the same conversation again, after folding case and whitespace         |
| `near_duplicate`         | error*   | word 3-shingle Jaccard ≥ threshold with an earlier row                 |
| `special_token_text`     | warning  | text holding a special token's string (`<|im_end|>`): trained and read as text |
| tool codes               | error    | tools, calls and tool results that do not fit together (see `lint_tools`) |

Preference data (prompt/chosen/rejected, OpenAI's, KTO's) is recognised by its fields and checked
by `lint_preferences` instead.

*Errors for `lint`, a gate run on purpose; warnings with `for_training=True` (what finetune
passes), because finetune drops and reports over-long examples itself, and duplicates only
re-weight the data — neither should need `--allow-data-errors`, which also lets real errors by.
"""
from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

from jinja2 import TemplateError
from rich.console import Console
from rich.text import Text

from specialize.config import LintConfig
from specialize.data.formats import Example, load_examples, message_text
from specialize.data.lint_preferences import is_preference_data, lint_preferences
from specialize.data.lint_tools import MESSAGES as TOOL_MESSAGES
from specialize.data.lint_tools import TOOL_CODES, tool_problems
from specialize.data.marking import (
    byte_tokenizer,
    length_report,
    marked,
    runs,
    trained_pieces,
)
from specialize.data.similarity import duplicates, matches, normalise
from specialize.data.special import special_strings, string_fields
from specialize.data.templates import (
    Template,
    TemplateRaised,
    end_of_turn_tokens,
    resolve_template,
)
from specialize.data.tokenize import Encoded, encode_chat, encode_rendered, encode_text
from specialize.defaults import model_context
from specialize.errors import UserError
from specialize.model import load_tokenizer
from specialize.tools import template_messages

CODES = ("no_trained_tokens", "eos_not_trained", "empty_answer", "template_roundtrip", "template_error",
         *TOOL_CODES, "leakage", "too_long",
         "duplicate", "near_duplicate", "special_token_text")
LINT_ONLY_ERRORS = {"too_long", "duplicate", "near_duplicate"}
WARNINGS = {"special_token_text"}
SHOWN_SOURCES = 3
BATCH = 512  # conversations per batched tokenizer call


@dataclass
class Finding:
    """One kind of defect, with every row that has it (`file:line`, or `file:line = file:line` for pairs)."""

    severity: str  # "error" | "warning"
    code: str
    message: str
    sources: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.sources)


@dataclass
class Analysis:
    """Findings plus what lint prints about the training data."""

    findings: list[Finding]
    encoded: list[Encoded]  # training examples that could be encoded (raw text: its first window)
    lengths: list[int]  # tokens per training example
    trained_tokens: int  # tokens with a label, over all training examples


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _blank(text: str) -> bool:
    """Only whitespace and punctuation ("", " ", "...", "?!"): no answer a model can learn."""
    return all(ch.isspace() or unicodedata.category(ch).startswith("P") for ch in text)


def _ends_with_eos(ids: list[int], tokenizer) -> bool:
    """True when the last token that is not whitespace is EOS or an end-of-turn token (chatml-style
    turns end in EOS + newline, Gemma's in `<end_of_turn>` + newline)."""
    ends = set(tokenizer.convert_tokens_to_ids(end_of_turn_tokens(tokenizer))) | {tokenizer.eos_token_id}
    for token in reversed(ids):
        if token in ends:
            return True
        if tokenizer.decode([token]).strip():
            return False
    return False


def _text_fields(example: Example) -> Iterator[tuple[str, str]]:
    """(where, text) for every string of the row a template renders, dict keys included; then the messages as
    the template reads them (`tools.template_messages`: arguments decoded from JSON, so `\\u003c|im_end|\\u003e`
    is `<|im_end|>`; content parts joined), unless a call is too malformed to read (tool_problems reports it)."""
    if example.text is not None:
        yield from string_fields(example.text, "text")
        return
    yield from string_fields({"messages": example.messages, "tools": example.tools or []})
    try:
        ready = template_messages(example.messages)
    except (KeyError, TypeError, AttributeError, ValueError):
        return
    yield from string_fields({"messages": ready})


def _special_token_text(example: Example, special: re.Pattern) -> tuple[str, str] | None:
    """(field, token): the first special token's string in the row's text, messages or tools, or None."""
    return next(((where, found.group()) for where, text in _text_fields(example)
                 if (found := special.search(text))), None)


@dataclass
class _Found:
    """Sources per finding code, plus the detail that goes into each message."""

    sources: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    detail: dict[str, str] = field(default_factory=dict)  # code -> what the first row shows
    longest: int = 0  # tokens of the longest too-long example
    special: set[str] = field(default_factory=set)  # special-token strings seen in the data

    def add(self, code: str, source: str, detail: str | None = None) -> None:
        self.sources[code].append(source)
        if detail is not None:
            self.detail.setdefault(code, detail)


def _roundtrip_detail(training: list[int], inference: list[int], tokenizer, source: str) -> str | None:
    """Where the prompt's training tokens first differ from its inference tokens, or None if they agree."""
    if training[: len(inference)] == inference:
        return None
    k = next((i for i, (a, b) in enumerate(zip(training, inference)) if a != b), min(len(training), len(inference)))
    show = (lambda ids: repr(tokenizer.decode(ids[k: k + 1])) if k < len(ids) else "nothing")
    return f"first at {source} token {k}: training has {show(training)}, inference has {show(inference)}"


@dataclass
class _Conversation:
    """One conversation encoded as finetune encodes it, waiting for the checks that run in batches."""

    example: Example
    item: Encoded | None = None
    runs: list[tuple[int, int]] = field(default_factory=list)
    prompt: str = ""  # the prompt rendered as at inference
    failure: str = ""  # why the template cannot render it turn by turn
    failure_code: str = "template_roundtrip"


def _encode_conversation(example: Example, tokenizer, template: Template, max_seq_tokens: int | None,
                         found: _Found) -> _Conversation:
    """Encode one conversation with `encode_chat` and run the checks that need only its ids and labels."""
    try:
        item = encode_chat(example, tokenizer, template)
        prompt = template.render(tokenizer, example.prompt_messages, add_generation_prompt=True, tools=example.tools)
    except (TemplateRaised, TemplateError) as e:  # the template refuses this conversation
        return _Conversation(example, failure=f"{example.source}: {e}", failure_code="template_error")
    except UserError as e:  # a template that cannot render this conversation turn by turn
        return _Conversation(example, failure=f"{example.source}: {e}")
    if max_seq_tokens is not None and len(item.input_ids) > max_seq_tokens:
        found.add("too_long", example.source)
        found.longest = max(found.longest, len(item.input_ids))
    trained = runs(item.labels)
    if not trained:
        found.add("no_trained_tokens", example.source)
    # The final answer must end in a trained EOS; earlier turns end as the template renders them.
    elif tokenizer.eos_token_id is None or not _ends_with_eos(item.input_ids[trained[-1][0]:trained[-1][1]],
                                                               tokenizer):
        found.add("eos_not_trained", example.source)
    return _Conversation(example, item, trained, prompt)


def _check_conversations(batch: list[_Conversation], tokenizer, found: _Found) -> None:
    """The checks that tokenise or decode text, a batch at a time: the inference prompts are tokenised
    in one call per batch, which the Rust tokenizer runs in parallel."""
    ok = [c for c in batch if c.item is not None]
    plain = [c for c in ok if not hasattr(c.prompt, "plain")]  # data without special-token strings: one batched call
    batched = iter(tokenizer([c.prompt for c in plain], add_special_tokens=False)["input_ids"] if plain else [])
    inference = iter([encode_rendered(tokenizer, c.prompt) if hasattr(c.prompt, "plain") else next(batched)
                      for c in ok])
    spans = [(c, a, b) for c in ok for a, b in c.runs]
    texts = tokenizer.batch_decode([c.item.input_ids[a:b] for c, a, b in spans], skip_special_tokens=True) \
        if spans else []
    blank = {id(c) for (c, _, _), text in zip(spans, texts) if _blank(text)}
    for c in batch:
        source = c.example.source
        if c.item is None:
            found.add(c.failure_code, source, c.failure)
            continue
        detail = _roundtrip_detail(c.item.input_ids, next(inference), tokenizer, source)
        if detail:
            found.add("template_roundtrip", source, detail)
        answers = [message_text(m) for m in c.example.messages if m["role"] == "assistant"]
        if id(c) in blank or any(_blank(answer) for answer in answers):
            found.add("empty_answer", source)


def _similarity_text(example: Example, prompt_only: bool) -> str:
    """The words two rows are compared on. System prompts are left out: one shared by every row
    would make all rows look alike."""
    if example.text is not None:
        return example.text
    messages = example.prompt_messages if prompt_only else example.messages
    return "\n".join(message_text(m) for m in messages if m["role"] != "system")


def _pair(row: Example, earlier: Example, similarity: float | None) -> str:
    return f"{row.source} = {earlier.source}" if similarity is None else \
        f"{row.source} ≈ {earlier.source} ({similarity:.2f})"


def _check_duplicates(examples: list[Example], threshold: float, found: _Found) -> None:
    """Exact duplicates of the whole conversation (roles included), then near duplicates of its words."""
    keys = [example.text if example.text is not None else  # \0: a separator that normalise leaves alone
            "\0".join(f"{m['role']}\0{normalise(message_text(m))}" for m in example.messages) for example in examples]
    exact, near = duplicates(keys, [_similarity_text(e, prompt_only=False) for e in examples], threshold)
    for i, j in exact:
        found.add("duplicate", _pair(examples[i], examples[j], None))
    for i, j, similarity in near:
        found.add("near_duplicate", _pair(examples[i], examples[j], similarity))


def _check_leakage(train: list[Example], eval_examples: list[Example], threshold: float, found: _Found) -> None:
    """Eval rows whose prompt is a training prompt, exactly (normalised) or nearly."""
    for i, j, similarity in matches([_similarity_text(e, prompt_only=True) for e in eval_examples],
                                    [_similarity_text(e, prompt_only=True) for e in train], threshold):
        found.add("leakage", _pair(eval_examples[i], train[j], similarity))


def _message(code: str, n: int, found: _Found, max_seq_tokens: int | None, threshold: float) -> str:
    rows = _plural(n, "example")
    detail = f": {found.detail[code]}" if code in found.detail else ""
    if code in TOOL_MESSAGES:
        return f"{rows} {TOOL_MESSAGES[code]}{detail}"
    return {
        "no_trained_tokens": f"{rows} with no trained token: the template leaves nothing to learn",
        "eos_not_trained": f"{rows} where an answer does not end in a trained EOS: the model won't learn to stop",
        "empty_answer": f"{rows} with an empty answer after templating (only whitespace or punctuation)",
        "template_roundtrip": f"{rows} tokenised differently in training than at inference{detail}",
        "template_error": f"{rows} that the template cannot render{detail}",
        "leakage": f"{_plural(n, 'eval example')} whose prompt is (nearly) a training prompt: eval measures recall",
        "too_long": f"{rows} longer than --max-seq-tokens {max_seq_tokens} (longest {found.longest} tokens); "
                    "finetune drops them",
        "duplicate": f"{rows} repeating an earlier one (same text after folding case and whitespace)",
        "near_duplicate": f"{rows} nearly repeating an earlier one (word 3-shingle Jaccard ≥ {threshold:g})",
        "special_token_text": f"{rows} holding special-token strings ({', '.join(sorted(found.special))}), "
                              f"trained and read as plain text, never as control tokens{detail}",
    }[code]


def analyse(train: list[Example], eval_examples: list[Example], tokenizer, template: Template,
            max_seq_tokens: int | None, *, for_training: bool = False,
            near_duplicate_threshold: float = 0.9, train_on_prompt: bool = False) -> Analysis:
    """Run every check; see the module docstring for codes and severities.

    Args:
        max_seq_tokens: longest sequence; None skips `too_long` (token counts not meaningful).
        for_training: finetune's view: too_long, duplicate and near_duplicate become warnings.
        train_on_prompt: the shown examples and the trained-token count include prompt tokens, as
            finetune would train them; the checks still look at the answers.
    """
    found = _Found()
    _, special = special_strings(tokenizer)
    encoded: list[Encoded] = []
    lengths: list[int] = []
    trained_tokens = 0
    pending: list[_Conversation] = []
    for in_train, examples in ((True, train), (False, eval_examples)):
        for example in examples:
            if special is not None and (hit := _special_token_text(example, special)):
                where, token = hit
                found.special |= {s for _, text in _text_fields(example) for s in special.findall(text)}
                found.add("special_token_text", example.source, f"first at {example.source} {where}: {token}")
            for code, detail in dict(reversed(tool_problems(example))).items():  # one per code: the first
                found.add(code, example.source, f"first at {example.source} {detail}")
            if example.text is not None:  # raw text: windows, every token trained; nothing else to check
                windows = encode_text(example, tokenizer, max_seq_tokens or 10**9)
            else:
                pending.append(_encode_conversation(example, tokenizer, template, max_seq_tokens, found))
                windows = [pending[-1].item] if pending[-1].item else []
                if len(pending) == BATCH:
                    _check_conversations(pending, tokenizer, found)
                    pending = []
            if in_train and windows and train_on_prompt and example.text is None:
                windows = [encode_chat(example, tokenizer, template, train_on_prompt=True)]
            if in_train and windows:
                encoded.append(windows[0])
                lengths.append(sum(len(w.input_ids) for w in windows))
                trained_tokens += sum(w.target_tokens for w in windows)
    _check_conversations(pending, tokenizer, found)
    for examples in (train, eval_examples):
        _check_duplicates(examples, near_duplicate_threshold, found)
    if eval_examples:
        _check_leakage(train, eval_examples, near_duplicate_threshold, found)

    findings = []
    for code in CODES:
        if found.sources[code]:
            demoted = code in WARNINGS or (for_training and code in LINT_ONLY_ERRORS)
            message = _message(code, len(found.sources[code]), found, max_seq_tokens, near_duplicate_threshold)
            findings.append(Finding("warning" if demoted else "error", code, message, found.sources[code]))
    findings.sort(key=lambda f: f.severity != "error")  # stable: errors first, each in CODES order
    return Analysis(findings, encoded, lengths, trained_tokens)


def check_examples(train: list[Example], eval_examples: list[Example], tokenizer, template: Template,
                   max_seq_tokens: int | None, *, for_training: bool = False,
                   near_duplicate_threshold: float = 0.9) -> list[Finding]:
    """Everything lint finds in the data, errors first. Finetune passes `for_training=True`."""
    return analyse(train, eval_examples, tokenizer, template, max_seq_tokens, for_training=for_training,
                   near_duplicate_threshold=near_duplicate_threshold).findings


def lint(cfg: LintConfig) -> int:
    """Print what the model will learn from the data and what is wrong with it; 1 on errors, else 0."""
    if not cfg.data:
        raise UserError("no data given (use --data FILE)")
    preference = is_preference_data(cfg.data)
    if not preference:
        train = load_examples(cfg.data, cfg.system_prompt)
        eval_examples = load_examples(cfg.eval_data, cfg.system_prompt) if cfg.eval_data else []
    console = Console(highlight=False, emoji=False, markup=False, soft_wrap=True)
    plain = not console.is_terminal or console.no_color
    if cfg.base:
        # unset: the limit finetune would use (the model's context)
        max_seq_tokens = cfg.max_seq_tokens or model_context(cfg.base, cfg.trust_remote_code) or 512
        tokenizer, unit = load_tokenizer(cfg.base, cfg.trust_remote_code), "tokens"
    elif cfg.template == "tokenizer":
        raise UserError("--template tokenizer needs --base MODEL (the tokenizer whose chat template to use)")
    else:
        tokenizer, max_seq_tokens, unit = byte_tokenizer(), None, "bytes"
    if preference:
        return lint_preferences(cfg, tokenizer, max_seq_tokens, unit, console, plain)
    template = resolve_template(cfg.template, tokenizer, {e.shape for e in train})  # exactly as finetune does
    analysis = analyse(train, eval_examples, tokenizer, template, max_seq_tokens,
                       near_duplicate_threshold=cfg.near_duplicate_threshold, train_on_prompt=cfg.train_on_prompt)

    tokens = f"tokenizer {cfg.base}, max {max_seq_tokens} tokens" if cfg.base else \
        "no --base: lengths are UTF-8 bytes, not tokens, and too_long is not checked (pass --base MODEL)"
    console.print(f"{_plural(len(train), 'training example')}, {len(eval_examples)} eval; "
                  f"template '{template.name}'; {tokens}")
    for item in analysis.encoded[: cfg.show]:
        how = "in ⟦ ⟧" if plain else "bold green, masked dim"
        console.print(Text(f"\nexample {item.source} (trained {unit} {how}):", style="bold"))
        console.print(marked(trained_pieces(item, tokenizer), plain))
    if analysis.lengths:
        console.print()
        for line in length_report(analysis.lengths, unit):
            console.print(line)
        trained, total = analysis.trained_tokens, sum(analysis.lengths)
        console.print(f"trained {unit}: {trained} of {total} ({trained / total:.0%}) · masked: {total - trained}")

    console.print()
    for finding in analysis.findings:
        style = "bold red" if finding.severity == "error" else "yellow"
        console.print(Text.assemble((f"{finding.severity} {finding.code}", style), f": {finding.message}"))
        more = f" (+{finding.count - SHOWN_SOURCES} more)" if finding.count > SHOWN_SOURCES else ""
        console.print(f"  {', '.join(finding.sources[:SHOWN_SOURCES])}{more}")
    errors = sum(f.severity == "error" for f in analysis.findings)
    warnings, rows = len(analysis.findings) - errors, _plural(len(train) + len(eval_examples), "example")
    if errors:
        console.print(Text(f"FAILED: {_plural(errors, 'error')}, {_plural(warnings, 'warning')} in {rows}", "bold red"))
    else:
        console.print(Text(f"OK: {rows}, {_plural(warnings, 'warning') if warnings else 'no problems found'}", "green"))
    return 1 if errors else 0
