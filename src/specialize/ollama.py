"""Ollama and llama.cpp: the Modelfile `export` writes next to the weights, and the GGUF conversion.

    ollama create faq -f exports/faq/Modelfile && ollama run faq

Ollama does not run Jinja: a model's chat template must be given as a Go `text/template`. A
template that renders differently from the one the model was trained with is the most reported
problem with fine-tuned models in Ollama and llama.cpp (the model never stops, or answers
gibberish), so the Modelfile's TEMPLATE is a translation of the run's chat template, checked here
on probe conversations against the Jinja template itself:

- specialize's own templates (`qa`, `alpaca`, `chatml`) are translated exactly;
- tokenizer templates of the common families are recognised by their markers and checked: Llama 3
  (`<|start_header_id|>`), ChatML as Qwen 2.5/3 and SmolLM2 use it (`<|im_start|>`), Gemma 2/3
  (`<start_of_turn>`), Mistral (`[INST]`, system text in the last user turn), Phi-3 (`<|end|>`) and
  OLMo 2 / Tulu (`<|user|>`);
- anything else gets a Modelfile without TEMPLATE and a line that says why.

What Ollama renders is then the training prompt, with three limits a Go template cannot lift: the
leading BOS is left to the tokenizer (llama.cpp adds it where the HF tokenizer does), contents are
not `trim`med (Llama 3 and Gemma trim them), and tool calls are not translated.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from jinja2 import TemplateError

from specialize.data.templates import (
    _DEFAULT_SYSTEM,
    _DEFAULT_SYSTEM_END,
    ALPACA_PREAMBLE,
    OURS,
    end_of_turn_tokens,
)
from specialize.errors import UserError

CONVERTER = "convert_hf_to_gguf.py"  # llama.cpp's HF -> GGUF converter (the `gguf` package has only the writer)
OUTTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}  # torch dtype -> --outtype
# Probe conversations: contents that no template changes (nothing to trim) and that are easy to find.
S, U, A, V = "SYSTEM-0", "USER-1", "ASSISTANT-2", "USER-3"
SHORT = [{"role": "user", "content": U}]
LONG = [{"role": "system", "content": S}, {"role": "user", "content": U},
        {"role": "assistant", "content": A}, {"role": "user", "content": V}]
UNSYSTEMED = LONG[1:]


@dataclass
class Translation:
    """The run's chat template as Ollama needs it; `template` is None when it cannot be translated."""

    layout: str  # which layout was recognised ("qa", "llama3", ...), or "" when none
    template: str | None
    system: str | None  # the run's default system message (its --system-prompt), for SYSTEM
    stops: list[str] = field(default_factory=list)
    why: str = ""  # why there is no template
    notes: list[str] = field(default_factory=list)  # what a user of the template should know


def default_system(jinja: str) -> tuple[str | None, str]:
    """The default system message that `templates.with_default_system` put in front of `jinja`, and
    the template without it."""
    if not (jinja.startswith(_DEFAULT_SYSTEM) and _DEFAULT_SYSTEM_END in jinja):
        return None, jinja
    head, body = jinja.split(_DEFAULT_SYSTEM_END, 1)
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Rendering the head alone is how its string literal is decoded exactly as the template does.
    text = ImmutableSandboxedEnvironment().from_string(head + _DEFAULT_SYSTEM_END + "{{ messages[0]['content'] }}")
    return text.render(messages=[{"role": "user", "content": ""}]), body


def _text(text: str) -> str:
    """`text` as literal text of a Go template: as a quoted string action when it contains `{{`."""
    if "{{" not in text:
        return text
    # A JSON string is a valid Go string literal, as long as characters beyond the BMP are not
    # escaped as surrogate pairs (Go rejects "\ud83d"): keep them as they are.
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


def _ours(eos: str) -> dict[str, tuple[str, str, str]]:
    """Our templates in Go, with what they render for SHORT and LONG (the probes check those too)."""
    preamble, e = ALPACA_PREAMBLE, _text(eos)
    qa = ('{{ range .Messages }}{{ if eq .Role "system" }}{{ .Content }}\n\n'
          '{{ else if eq .Role "user" }}### Question:\n{{ .Content }}\n\n### Answer:\n'
          '{{ else if eq .Role "assistant" }}{{ .Content }}' + e + '{{ end }}{{ end }}')
    alpaca = ('{{ range $i, $m := .Messages }}{{ if eq $i 0 }}{{ if eq .Role "system" }}{{ .Content }}\n\n'
              '{{ else }}' + _text(preamble) + '\n\n{{ end }}{{ end }}'
              '{{ if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n### Response:\n'
              '{{ else if eq .Role "assistant" }}{{ .Content }}' + e + '\n\n{{ end }}{{ end }}')
    chatml = ('{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}' + e + '\n{{ end }}'
              '<|im_start|>assistant\n')
    q = lambda u: f"### Question:\n{u}\n\n### Answer:\n"
    i = lambda u: f"### Instruction:\n{u}\n\n### Response:\n"
    c = lambda role, text: f"<|im_start|>{role}\n{text}{eos}\n"
    return {"qa": (qa, q(U), f"{S}\n\n{q(U)}{A}{eos}{q(V)}"),
            "alpaca": (alpaca, f"{preamble}\n\n{i(U)}", f"{S}\n\n{i(U)}{A}{eos}\n\n{i(V)}"),
            "chatml": (chatml, c("user", U) + "<|im_start|>assistant\n",
                       c("system", S) + c("user", U) + c("assistant", A) + c("user", V) + "<|im_start|>assistant\n")}


def _llama3(short: str, long: str) -> tuple[str, str, str] | str:
    """Llama 3: a system turn that 3.1+ always renders, with its own preamble (knowledge and today's
    date), taken from the rendering: a Go template has no clock, so the date is the export's."""
    head, turn = "<|start_header_id|>system<|end_header_id|>\n\n", "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>"
    start = long.find(head)
    if start < 0 or long.find(S + "<|eot_id|>", start) < 0:
        return "its system turn is not `<|start_header_id|>system<|end_header_id|>` followed by the system text"
    preamble = long[start + len(head): long.find(S + "<|eot_id|>", start)]
    always = head in short  # Llama 3.1/3.2 render the system turn (with the preamble) with no system message
    gen = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    block = lambda role, text: turn.format(role, text)
    go = ('{{ range $i, $m := .Messages }}{{ if and (eq $i 0) (eq .Role "system") }}'
          + head + _text(preamble) + '{{ .Content }}<|eot_id|>{{ else }}'
          + ('{{ if eq $i 0 }}' + head + _text(preamble) + '<|eot_id|>{{ end }}' if always else '')
          + '<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}{{ end }}' + gen)
    system_turn = head + preamble + "<|eot_id|>" if always else ""
    return (go, system_turn + block("user", U) + gen,
            head + preamble + S + "<|eot_id|>" + block("user", U) + block("assistant", A) + block("user", V) + gen)


def _chatml(short: str) -> tuple[str, str, str]:
    """ChatML with `<|im_end|>` (Qwen 2.5/3, SmolLM2): a conversation without a system message gets the
    template's own default one (Qwen 2.5: "You are Qwen…"), taken from the rendering."""
    turn = lambda role, text: f"<|im_start|>{role}\n{text}<|im_end|>\n"
    prefix = short.split("<|im_start|>user\n", 1)[0]
    builtin = prefix[len("<|im_start|>system\n"): -len("<|im_end|>\n")] if prefix.startswith("<|im_start|>system\n") \
        and prefix.endswith("<|im_end|>\n") else None
    go = ('{{ range $i, $m := .Messages }}'
          + ('{{ if and (eq $i 0) (ne .Role "system") }}' + _text(turn("system", builtin)) + '{{ end }}' if builtin else '')
          + '<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n')
    default = turn("system", builtin) if builtin else ""
    gen = "<|im_start|>assistant\n"
    return (go, default + turn("user", U) + gen,
            turn("system", S) + turn("user", U) + turn("assistant", A) + turn("user", V) + gen)


def _families(eos: str) -> dict[str, tuple[str, str, str]]:
    """Layouts that need nothing from the rendering: Go template, SHORT and LONG renderings."""
    e = _text(eos)
    g = lambda role, text: f"<start_of_turn>{role}\n{text}<end_of_turn>\n"
    gemma = ('{{ range $i, $m := .Messages }}{{ if eq .Role "user" }}<start_of_turn>user\n'
             '{{ if and (eq $i 1) (eq (index $.Messages 0).Role "system") }}{{ (index $.Messages 0).Content }}\n\n{{ end }}'
             '{{ .Content }}<end_of_turn>\n{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}'
             '<end_of_turn>\n{{ end }}{{ end }}<start_of_turn>model\n')
    mistral = ('{{ range $i, $m := .Messages }}{{ if eq .Role "user" }}[INST]'
               '{{ if and (eq (len (slice $.Messages $i)) 1) (eq (index $.Messages 0).Role "system") }}'
               '{{ (index $.Messages 0).Content }}\n\n{{ end }}{{ .Content }}[/INST]'
               '{{ else if eq .Role "assistant" }}{{ .Content }}' + e + '{{ end }}{{ end }}')
    p = lambda role, text: f"<|{role}|>\n{text}<|end|>\n"
    phi3 = ('{{ range .Messages }}{{ if eq .Role "system" }}{{ if .Content }}<|system|>\n{{ .Content }}<|end|>\n{{ end }}'
            '{{ else if eq .Role "user" }}<|user|>\n{{ .Content }}<|end|>\n'
            '{{ else if eq .Role "assistant" }}<|assistant|>\n{{ .Content }}<|end|>\n{{ end }}{{ end }}<|assistant|>\n')
    t = lambda role, text: f"<|{role}|>\n{text}\n"
    tulu = ('{{ range .Messages }}{{ if eq .Role "system" }}<|system|>\n{{ .Content }}\n'
            '{{ else if eq .Role "user" }}<|user|>\n{{ .Content }}\n'
            '{{ else if eq .Role "assistant" }}<|assistant|>\n{{ .Content }}' + e + '\n{{ end }}{{ end }}<|assistant|>\n')
    return {"gemma": (gemma, g("user", U) + "<start_of_turn>model\n",
                      g("user", f"{S}\n\n{U}") + g("model", A) + g("user", V) + "<start_of_turn>model\n"),
            "mistral": (mistral, f"[INST]{U}[/INST]", f"[INST]{U}[/INST]{A}{eos}[INST]{S}\n\n{V}[/INST]"),
            "phi3": (phi3, p("user", U) + "<|assistant|>\n",
                     p("system", S) + p("user", U) + p("assistant", A) + p("user", V) + "<|assistant|>\n"),
            "tulu": (tulu, t("user", U) + "<|assistant|>\n",
                     t("system", S) + t("user", U) + f"<|assistant|>\n{A}{eos}\n" + t("user", V) + "<|assistant|>\n")}


def _layout(body: str) -> str | None:
    """Which family a tokenizer's own template is, by its markers."""
    markers = [("llama3", ["<|start_header_id|>"]), ("chatml-im_end", ["<|im_start|>", "<|im_end|>"]),
               ("gemma", ["<start_of_turn>"]), ("mistral", ["[INST]"]), ("phi3", ["<|user|>", "<|end|>"]),
               ("tulu", ["<|user|>", "<|assistant|>"])]
    return next((name for name, needles in markers if all(n in body for n in needles)), None)


def _render(tokenizer, jinja: str, messages: list[dict]) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False, add_generation_prompt=True)
    except TemplateError:
        return None  # the template refuses this conversation (Gemma 2 on a system message)


def translate(tokenizer) -> Translation:
    """The tokenizer's chat template (a run's, with its default system message) as an Ollama template.

    Every translation is checked on probe conversations, with and without a system message, against
    the Jinja template: a template that shares a family's markers but renders differently (another
    version of it, or one edited by hand) is reported, never translated approximately.
    """
    jinja = getattr(tokenizer, "chat_template", None) or ""
    system, body = default_system(jinja)
    stops = end_of_turn_tokens(tokenizer)
    eos = tokenizer.eos_token or ""
    bos = tokenizer.bos_token or ""
    plain = body.removeprefix("{{ bos_token }}")
    layout = next((name for name, ours in OURS.items() if plain == ours), None) or _layout(body)
    if not jinja or layout is None:
        why = "it has no chat template" if not jinja else \
            "its chat template is none of the layouts specialize translates (qa, alpaca, chatml; Llama 3, ChatML, " \
            "Gemma, Mistral, Phi-3, OLMo 2)"
        return Translation("", None, system, stops, why + "; write a TEMPLATE in Ollama's Go template syntax by hand")
    short, long, unsystemed = (_render(tokenizer, body, m) for m in (SHORT, LONG, UNSYSTEMED))
    if short is None or unsystemed is None:
        return Translation(layout, None, system, stops, f"its {layout} chat template refuses a plain conversation")
    # The BOS the template renders first: llama.cpp and Ollama add it when tokenizing, exactly where the
    # HF tokenizer adds it by itself; elsewhere it stays in the template as text.
    leading = bool(bos) and "bos_token" in body and short.startswith(bos)
    adds_bos = leading and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]
    strip = (lambda text: text[len(bos):] if text is not None and text.startswith(bos) else text) if leading \
        else (lambda text: text)
    short, long, unsystemed = strip(short), strip(long), strip(unsystemed)
    if layout in OURS:
        go, want_short, want_long = _ours(eos)[layout]
    elif layout == "llama3":
        built = _llama3(short, long or "")
        if isinstance(built, str):
            return Translation(layout, None, system, stops, f"its Llama 3 chat template differs: {built}")
        go, want_short, want_long = built
    elif layout == "chatml-im_end":
        go, want_short, want_long = _chatml(short)
    else:
        go, want_short, want_long = _families(eos)[layout]
    want_unsystemed = want_long.replace(S + "\n\n", "") if layout in ("gemma", "mistral") else None
    checks = [("a user message", short, want_short),
              ("a conversation with a system message", long, want_long if long is not None else None)]
    if want_unsystemed is not None:
        checks.append(("a conversation without a system message", unsystemed, want_unsystemed))
    for what, got, want in checks:
        if got != want:
            return Translation(layout, None, system, stops,
                               f"its chat template looks like {layout} but renders {what} differently from that "
                               f"layout ({got!r}, expected {want!r})")
    notes = ["the BOS is left to the tokenizer, which adds it as in training" if adds_bos else
             "the BOS is text in the template, as in training (the tokenizer adds none)" if leading else ""]
    if leading and not adds_bos:
        go = _text(bos) + go  # the tokenizer adds no BOS of its own, so the template's BOS is text to keep
    if layout == "llama3" and "Today Date:" in go:
        notes.append("the date in its system turn is the export's (a Go template has no clock)")
    return Translation(layout, go, system, stops, notes=[n for n in notes if n])


def _quoted(text: str, what: str) -> str:
    """`text` as a Modelfile value; Ollama's parser ends a triple-quoted value at the first `\"\"\"`."""
    if '"""' in text:
        raise UserError(f"the {what} contains \"\"\", which an Ollama Modelfile cannot quote")
    return f'"""{text}"""'


def modelfile(source: str, translation: Translation, weights: str = ".", name: str = "NAME") -> str:
    """The Modelfile text: FROM `weights` (relative to the Modelfile), TEMPLATE, SYSTEM, PARAMETER stop."""
    note = f"# Chat template: {translation.layout}, as a Go template that renders the training prompt" + \
        "".join(f"; {n}" for n in translation.notes) + "." if translation.template else \
        f"# No TEMPLATE: the chat template could not be translated ({translation.why})."
    lines = [f"# Ollama Modelfile written by `specialize export` from {source}.",
             f"# Create and run the model:  ollama create {name} -f Modelfile  &&  ollama run {name}",
             note.replace("\n", " ").replace("\r", " "), f"FROM {weights}"]
    if translation.template:
        lines.append("TEMPLATE " + _quoted(translation.template, "chat template"))
    if translation.system:
        lines.append("SYSTEM " + _quoted(translation.system, "default system message"))
    lines += [f'PARAMETER stop "{stop}"' for stop in translation.stops]
    return "\n".join(lines) + "\n"


def find_converter() -> list[str] | None:
    """How to run llama.cpp's converter: from $LLAMA_CPP_DIR (a llama.cpp checkout), else from PATH."""
    if home := os.environ.get("LLAMA_CPP_DIR"):
        script = Path(home).expanduser() / CONVERTER
        if not script.is_file():
            raise UserError(f"LLAMA_CPP_DIR={home} has no {CONVERTER}: point it at a llama.cpp checkout")
        return [sys.executable, str(script)]
    found = shutil.which(CONVERTER)
    return [found] if found else None


def gguf_command(converter: list[str], folder: Path, outfile: Path, outtype: str) -> list[str]:
    return [*converter, str(folder), "--outfile", str(outfile), "--outtype", outtype]


def convert_to_gguf(folder: Path, dtype_name: str) -> Path | None:
    """Convert the exported `folder` to `<folder>/<name>.gguf` in the weights' own precision.

    Returns the file, or None after printing the exact command when the converter is not installed.
    """
    outfile = folder / f"{folder.name}.gguf"
    outtype = OUTTYPES.get(dtype_name, "f32")
    converter = find_converter()
    if converter is None:
        command = gguf_command(["python", f"llama.cpp/{CONVERTER}"], folder, outfile, outtype)
        print(f"gguf: llama.cpp's {CONVERTER} was not found (set LLAMA_CPP_DIR to a llama.cpp checkout, or put "
              f"the script on PATH); to convert, run:\n  {shlex.join(command)}\n"
              f"then point FROM in {folder / 'Modelfile'} at {outfile.name}")
        return None
    command = gguf_command(converter, folder, outfile, outtype)
    print(f"gguf: {shlex.join(command)}")
    result = subprocess.run(command, check=False)  # its progress goes to the terminal
    if result.returncode != 0 or not outfile.is_file():
        raise UserError(f"the GGUF conversion failed (exit {result.returncode}, see its output above); the HF "
                        f"export in {folder} is complete, its Modelfile imports that folder; command: "
                        f"{shlex.join(command)}")
    return outfile
