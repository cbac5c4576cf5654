"""The Ollama Modelfile: its TEMPLATE renders the training prompt, SYSTEM and stops are the run's;
GGUF conversion with llama.cpp's converter, or the exact command when it is not installed.

Ollama cannot be installed here, so this file carries what it does with a Modelfile: its parser's
quoting rules (parser/parser.go), its handling of messages (the Modelfile's SYSTEM put first when a
conversation has none; consecutive messages of one role merged; template/template.go), and an
evaluator for the part of Go's text/template the translations use. The evaluator is checked against
Go's own text/template when a Go toolchain is installed (`apt-get install golang-go`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from families import BY_NAME, FAMILIES, save_family

from specialize import ollama
from specialize.data.templates import install_template, ours, resolve_template
from specialize.errors import UserError
from specialize.model import load_tokenizer

# ---- Ollama's Modelfile parser (parser/parser.go ParseFile), rune by rune ------------------------


def _unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s.startswith('"'):
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True


def _next_state(r: str, state: str) -> tuple[str, str]:
    space, newline = r in " \t", r in "\r\n"
    if state == "nil":
        return ("comment", "") if r == "#" else ("nil", "") if space or newline else ("name", r)
    if state == "name":
        if r.isascii() and r.isalpha():
            return "name", r
        assert space, f"invalid command character {r!r}"
        return "value", ""
    if state == "value":
        return ("nil", r) if space or newline else ("value", r)
    if state == "parameter":
        if r.isascii() and (r.isalnum() or r == "_"):
            return "parameter", r
        assert space, f"invalid parameter character {r!r}"
        return "value", ""
    return ("nil", "") if newline else ("comment", "")


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, value) pairs as Ollama reads them; PARAMETER commands are named by the parameter."""
    commands, state, buf, name = [], "nil", "", ""
    for r in text:
        nxt, r = _next_state(r, state)
        if nxt != state:
            if state == "name":
                word = buf.lower()
                assert word in {"from", "template", "system", "parameter", "license", "adapter", "message"}, word
                nxt, name = ("parameter", name) if word == "parameter" else (nxt, "model" if word == "from" else word)
            elif state == "parameter":
                name = buf
            elif state == "value":
                value, ok = _unquote(buf.strip())
                if not ok or r in " \t":
                    buf += r
                    continue
                commands.append((name, value))
            buf, state = "", nxt
        if r and r.isprintable():
            buf += r
    if state == "value":
        value, ok = _unquote(buf.strip())
        assert ok, "unterminated value"
        commands.append((name, value))
    return commands


# ---- Go text/template, the subset the translations use -------------------------------------------

def _lex(source: str) -> list:
    """Text and actions, with `{{-` / `-}}` trimming applied to the neighbouring text."""
    items, pos = [], 0
    while (start := source.find("{{", pos)) >= 0:
        end = source.find("}}", start)
        inner = source[start + 2:end]
        text = source[pos:start]
        if inner.startswith("- "):
            text, inner = text.rstrip(" \t\r\n"), inner[2:]
        items.append(("text", text))
        trim_after = inner.endswith(" -")
        items.append(("action", inner[:-2] if trim_after else inner))
        pos = end + 2
        if trim_after:
            pos = len(source) - len(source[pos:].lstrip(" \t\r\n"))
    items.append(("text", source[pos:]))
    return items


def _parse(items: list, i: int = 0, stop: tuple = ()) -> tuple[list, int, str]:
    """Nodes until an action in `stop` (`end`, `else`...); returns the nodes, position and that action."""
    nodes = []
    while i < len(items):
        kind, value = items[i]
        i += 1
        if kind == "text":
            nodes.append(("text", value))
            continue
        word = value.strip()
        if word == "end" or word == "else" or word.startswith("else if "):
            assert word.split()[0] in stop, f"unexpected {{{{ {word} }}}}"
            return nodes, i, word
        if word.startswith("if "):
            branches, pipe = [], word[3:]
            while True:
                body, i, closing = _parse(items, i, ("end", "else"))
                branches.append((pipe, body))
                if closing == "end":
                    nodes.append(("if", branches, []))
                    break
                if closing == "else":
                    otherwise, i, _ = _parse(items, i, ("end",))
                    nodes.append(("if", branches, otherwise))
                    break
                pipe = closing[len("else if "):]
        elif word.startswith("range "):
            spec = word[6:]
            names, pipe = ([n.strip() for n in spec.split(":=")[0].split(",")], spec.split(":=", 1)[1]) \
                if ":=" in spec else ([], spec)
            body, i, closing = _parse(items, i, ("end", "else"))
            otherwise, i, _ = _parse(items, i, ("end",)) if closing == "else" else ([], i, "")
            nodes.append(("range", names, pipe, body, otherwise))
        else:
            nodes.append(("print", word))
    assert not stop, "missing {{ end }}"
    return nodes, i, ""


def _truth(value) -> bool:
    return value not in (None, False, 0, "") and value != [] and value != {}


# A `)` directly followed by fields is a field chain on a parenthesised pipeline: `(index $.Messages 0).Role`.
TOKEN = re.compile(r'\s*(\)(?:\.\w+)*|\(|"(?:[^"\\]|\\.)*"|-?\d+|\$\w*(?:\.\w+)*|\.\w+(?:\.\w+)*|\.|\w+)')
FUNCTIONS = {"eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b, "not": lambda a: not _truth(a),
             "len": len, "index": lambda x, *i: x[i[0]], "slice": lambda x, i=0, j=None: x[i:j]}


def _expression(source: str) -> tuple:
    tokens = [m.group(1) for m in TOKEN.finditer(source)]
    assert "".join(tokens) == re.sub(r"\s+", "", source), f"cannot read {source!r}"
    node, rest = _pipeline(tokens)
    assert not rest, f"unparsed {rest} in {source!r}"
    return node


def _pipeline(tokens: list[str]) -> tuple[tuple, list[str]]:
    if tokens[0] in FUNCTIONS or tokens[0] in ("and", "or"):
        name, args, tokens = tokens[0], [], tokens[1:]
        while tokens and not tokens[0].startswith(")"):
            arg, tokens = _operand(tokens)
            args.append(arg)
        return ("call", name, args), tokens
    return _operand(tokens)


def _operand(tokens: list[str]) -> tuple[tuple, list[str]]:
    head, tokens = tokens[0], tokens[1:]
    if head == "(":
        inner, tokens = _pipeline(tokens)
        closing, tokens = tokens[0], tokens[1:]
        fields = closing.split(".")[1:]
        return (("field", inner, fields) if fields else inner), tokens
    if head.startswith('"'):
        return ("literal", json.loads(head)), tokens
    if re.fullmatch(r"-?\d+", head):
        return ("literal", int(head)), tokens
    if head.startswith("$"):
        name, *fields = head.split(".")
        return ("field", ("variable", name), fields), tokens
    if head.startswith("."):
        return ("field", ("dot",), [f for f in head.split(".")[1:] if f]), tokens
    raise AssertionError(f"unsupported operand {head!r}")


def _eval(node: tuple, dot, scope: dict):
    kind = node[0]
    if kind == "literal":
        return node[1]
    if kind == "dot":
        return dot
    if kind == "variable":
        return scope[node[1]]
    if kind == "field":
        value = _eval(node[1], dot, scope)
        for name in node[2]:
            value = value.get(name) if isinstance(value, dict) else None  # missingkey=zero, as Ollama parses
        return value
    name, args = node[1], node[2]
    if name in ("and", "or"):  # evaluated lazily, the deciding argument is the result (Go 1.18+)
        for arg in args:
            value = _eval(arg, dot, scope)
            if _truth(value) == (name == "or"):
                return value
        return value
    return FUNCTIONS[name](*[_eval(arg, dot, scope) for arg in args])


def _print(value) -> str:
    return "<no value>" if value is None else ("true" if value else "false") if isinstance(value, bool) else str(value)


def _execute(nodes: list, dot, scope: dict, out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "print":
            out.append(_print(_eval(_expression(node[1]), dot, scope)))
        elif node[0] == "if":
            for pipe, body in node[1]:
                if _truth(_eval(_expression(pipe), dot, scope)):
                    _execute(body, dot, dict(scope), out)
                    break
            else:
                _execute(node[2], dot, dict(scope), out)
        else:
            _, names, pipe, body, otherwise = node
            items = _eval(_expression(pipe), dot, scope) or []
            for i, item in enumerate(items):
                inner = dict(scope)
                if len(names) == 2:
                    inner[names[0]], inner[names[1]] = i, item
                elif names:
                    inner[names[0]] = item
                _execute(body, item, inner, out)
            if not items:
                _execute(otherwise, dot, dict(scope), out)


def render_go(template: str, data: dict) -> str:
    out: list[str] = []
    _execute(_parse(_lex(template))[0], data, {"$": data}, out)
    return "".join(out)


# ---- What Ollama does with a chat request (server/routes.go, template/template.go) ---------------


def ollama_data(system: str | None, messages: list[dict]) -> dict:
    """The template's data for a /api/chat request to a model created from the Modelfile."""
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    collated: list[dict] = []
    for m in messages:  # consecutive messages of one role are merged
        if collated and collated[-1]["Role"] == m["role"]:
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    joined = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return {"System": joined, "Messages": collated, "Tools": None, "Response": "", "Think": False}


def ollama_prompt(modelfile_text: str, messages: list[dict]) -> str:
    commands = {name: value for name, value in parse_modelfile(modelfile_text) if name != "stop"}
    return render_go(commands["template"], ollama_data(commands.get("system"), messages))


# ---- The tests -----------------------------------------------------------------------------------

SYSTEM = 'Answer in one sentence.\nQuote the docs "as written" when you can.'
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"},
     {"role": "user", "content": "Which colour is the sky?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."},
     {"role": "assistant", "content": "Seven."}, {"role": "user", "content": "And another?"}],
]
TEMPLATED = [f.name for f in FAMILIES if f.template]


@pytest.fixture(scope="session")
def family_base(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("ollama-bases")
    return lambda name: save_family(BY_NAME[name], tokenizer_dir, root / name) \
        if not (root / name).exists() else root / name


def run_tokenizer(base: Path, template: str, system: str | None):
    """The tokenizer a run saves: finetune installs the resolved template with the run's system prompt."""
    tokenizer = load_tokenizer(base)
    install_template(tokenizer, ours(template, tokenizer) if template != "auto" else
                     resolve_template("auto", tokenizer, {"qa"}), system)
    return tokenizer


def assert_ollama_renders_the_training_prompt(tokenizer, text: str) -> int:
    """Every conversation the run's template accepts is prompted by Ollama exactly as in training:
    the same text after the BOS the tokenizer adds by itself, and so the same token ids."""
    checked = 0
    for conversation in CONVERSATIONS:
        try:
            training = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - the family's template refuses it (Gemma 2 and a system message)
            assert "System role not supported" in str(e)
            continue
        prompt = ollama_prompt(text, conversation)
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]  # llama.cpp adds BOS where HF does
        assert ids == tokenizer(training, add_special_tokens=False)["input_ids"], (prompt, training)
        assert training.endswith(prompt) and len(training) - len(prompt) in (0, len(tokenizer.bos_token or ""))
        checked += 1
    return checked


@pytest.mark.parametrize("system", [None, SYSTEM])
@pytest.mark.parametrize("template", ["qa", "alpaca", "chatml"])
@pytest.mark.parametrize("family", ["gpt2", "llama3"])  # no BOS of its own; a BOS the tokenizer adds
def test_our_templates_become_go_templates_that_render_the_training_prompt(family, template, system, family_base):
    tokenizer = run_tokenizer(family_base(family), template, system)
    translation = ollama.translate(tokenizer)
    assert (translation.layout, translation.why) == (template, "")
    text = ollama.modelfile("runs/x", translation)
    assert assert_ollama_renders_the_training_prompt(tokenizer, text) == len(CONVERSATIONS)
    commands = parse_modelfile(text)
    assert ("system", SYSTEM) in commands if system else "system" not in dict(commands)
    assert commands[0] == ("model", ".")


@pytest.mark.parametrize("system", [None, SYSTEM])
@pytest.mark.parametrize("name", TEMPLATED)
def test_family_templates_become_go_templates_that_render_the_training_prompt(name, system, family_base):
    system = system if BY_NAME[name].system else None  # Gemma 2 refuses a system message: trained without
    tokenizer = run_tokenizer(family_base(name), "auto", system)
    translation = ollama.translate(tokenizer)
    assert translation.template, translation.why
    text = ollama.modelfile("runs/x", translation)
    assert assert_ollama_renders_the_training_prompt(tokenizer, text) >= (2 if name == "gemma2" else 4)
    assert dict(parse_modelfile(text)).get("system") == system


LAYOUTS = {"llama3": "llama3", "qwen2.5": "chatml-im_end", "qwen3": "chatml-im_end",
           "smollm2": "chatml-im_end", "gemma2": "gemma",
           "gemma3": "gemma", "mistral": "mistral", "phi3": "phi3", "olmo2": "tulu", "pythia": "qa", "gpt2": "qa"}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_stop_parameters_are_every_end_token_eos_first(name, family_base):
    family = BY_NAME[name]
    tokenizer = run_tokenizer(family_base(name), "auto", None)
    translation = ollama.translate(tokenizer)
    assert translation.layout == LAYOUTS[name]
    expected = [family.eos] + [s for s in family.stops if s != family.eos]
    stops = [value for command, value in parse_modelfile(ollama.modelfile("r", translation)) if command == "stop"]
    assert stops == expected
    if name == "llama3":
        assert stops == ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"]


def test_the_bos_stays_in_the_template_where_the_tokenizer_adds_none(family_base):
    olmo = ollama.translate(run_tokenizer(family_base("olmo2"), "auto", None))  # OLMo 2: BOS <|endoftext|>, not added
    llama = ollama.translate(run_tokenizer(family_base("llama3"), "auto", None))
    assert olmo.template.startswith("<|endoftext|>{{ range") and "<|begin_of_text|>" not in llama.template


def test_an_unknown_template_gets_no_template_and_the_reason(family_base, capsys):
    tokenizer = load_tokenizer(family_base("gpt2"))
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    translation = ollama.translate(tokenizer)
    assert translation.template is None and "none of the layouts specialize translates" in translation.why
    text = ollama.modelfile("runs/x", translation)
    assert "template" not in dict(parse_modelfile(text))
    assert "# No TEMPLATE: the chat template could not be translated (its chat template is none of" in text


def test_a_family_variant_that_renders_differently_is_reported_not_approximated(family_base):
    tokenizer = load_tokenizer(family_base("mistral"))  # Mistral 7B v0.1 puts spaces inside [INST] … [/INST]
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                               "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}"
                               "{% endif %}{% endfor %}")
    translation = ollama.translate(tokenizer)
    assert translation.template is None
    assert translation.why.startswith("its chat template looks like mistral but renders a user message differently")
    assert "'[INST] USER-1 [/INST]'" in translation.why


def test_a_system_prompt_ollama_cannot_quote_is_refused(family_base):
    tokenizer = run_tokenizer(family_base("gpt2"), "qa", 'Say """hi""" first.')
    with pytest.raises(UserError, match='default system message contains """'):
        ollama.modelfile("runs/x", ollama.translate(tokenizer))


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

func main() {
	var cases []struct {
		Template string
		Data     map[string]any
	}
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	var out []string
	for _, c := range cases {
		t := template.Must(template.New("").Option("missingkey=zero").Parse(c.Template))
		var b strings.Builder
		if err := t.Execute(&b, c.Data); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="no Go toolchain (apt-get install golang-go)")
def test_the_evaluator_renders_as_gos_text_template(family_base, tmp_path):
    cases = []
    for name in TEMPLATED + ["gpt2"]:
        for template in (["auto"] if name != "gpt2" else ["qa", "alpaca", "chatml"]):
            translation = ollama.translate(run_tokenizer(family_base(name), template, SYSTEM))
            for conversation in CONVERSATIONS:
                cases.append({"Template": translation.template, "Data": ollama_data(SYSTEM, conversation)})
    cases.append({"Template": "{{- if and .A (eq .B 1) -}}\n  x {{ else if or .A .C }}y{{ else }}z{{ end -}}  !"
                              "{{ range $i, $m := .L }}{{ $i }}={{ $m }};{{ else }}none{{ end }}", "Data": {"C": "c", "B": 2}})
    source = tmp_path / "render.go"
    source.write_text(GO_RENDER)
    env = {**os.environ, "GOPATH": str(tmp_path / "gopath"), "GO111MODULE": "off"}
    result = subprocess.run(["go", "run", str(source)], input=json.dumps(cases), capture_output=True, text=True,
                            env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [render_go(c["Template"], c["Data"]) for c in cases]


def write_converter(folder: Path, calls: Path) -> Path:
    """A stand-in for llama.cpp's convert_hf_to_gguf.py: records its argv, writes the --outfile."""
    script = folder / ollama.CONVERTER
    script.write_text(f"#!{sys.executable}\nimport json, sys\n"
                      f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv) + '\\n')\n"
                      "out = sys.argv[sys.argv.index('--outfile') + 1]\nopen(out, 'wb').write(b'GGUF')\n")
    script.chmod(0o755)
    return script


def test_gguf_runs_the_converter_found_on_path(tmp_path, monkeypatch, capsys):
    bin_dir, export_dir, calls = tmp_path / "bin", tmp_path / "faq", tmp_path / "calls.jsonl"
    bin_dir.mkdir()
    export_dir.mkdir()
    script = write_converter(bin_dir, calls)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    assert ollama.convert_to_gguf(export_dir, "bfloat16") == export_dir / "faq.gguf"
    argv = [json.loads(line) for line in calls.read_text().splitlines()]
    assert argv == [[str(script), str(export_dir), "--outfile", str(export_dir / "faq.gguf"), "--outtype", "bf16"]]
    assert (export_dir / "faq.gguf").read_bytes() == b"GGUF"


def test_gguf_runs_the_converter_of_llama_cpp_dir(tmp_path, monkeypatch):
    checkout, export_dir, calls = tmp_path / "llama.cpp", tmp_path / "faq", tmp_path / "calls.jsonl"
    checkout.mkdir()
    export_dir.mkdir()
    script = write_converter(checkout, calls)
    monkeypatch.setenv("LLAMA_CPP_DIR", str(checkout))
    assert ollama.convert_to_gguf(export_dir, "float32") == export_dir / "faq.gguf"
    argv = json.loads(calls.read_text())
    assert argv == [str(script), str(export_dir), "--outfile", str(export_dir / "faq.gguf"), "--outtype", "f32"]
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path))
    with pytest.raises(UserError, match=f"LLAMA_CPP_DIR={tmp_path} has no convert_hf_to_gguf.py"):
        ollama.convert_to_gguf(export_dir, "float32")


def test_gguf_without_the_converter_prints_the_exact_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    assert ollama.convert_to_gguf(tmp_path / "faq", "float16") is None
    out = capsys.readouterr().out
    assert f"python llama.cpp/convert_hf_to_gguf.py {tmp_path / 'faq'} --outfile {tmp_path / 'faq' / 'faq.gguf'} " \
        "--outtype f16" in out
    assert "was not found (set LLAMA_CPP_DIR to a llama.cpp checkout, or put the script on PATH)" in out


def test_a_failing_converter_is_a_user_error(tmp_path, monkeypatch):
    (tmp_path / ollama.CONVERTER).write_text(f"#!{sys.executable}\nimport sys\nsys.exit(3)\n")
    (tmp_path / ollama.CONVERTER).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    with pytest.raises(UserError, match=r"the GGUF conversion failed \(exit 3"):
        ollama.convert_to_gguf(tmp_path, "float32")
