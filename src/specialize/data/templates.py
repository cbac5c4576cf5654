"""Prompt templates, all expressed as Jinja chat templates.

Every template — ours or the tokenizer's own — is a Jinja chat template rendered by
`tokenizer.apply_chat_template`. The template used for training is saved as the run
tokenizer's `chat_template`, so plain transformers, vLLM or TGI render exactly the training
prompt with `apply_chat_template(messages, add_generation_prompt=True)` without our code.

Ours, for models that have no chat template:
- `qa`:     `### Question:\\n{question}\\n\\n### Answer:\\n{answer}<eos>`
- `alpaca`: the Stanford Alpaca preamble, `### Instruction:` / `### Response:`
- `chatml`: `<|im_start|>{role}\\n{content}<eos>\\n`, generation prompt `<|im_start|>assistant\\n`
"""

from __future__ import annotations

from dataclasses import dataclass

from specialize.errors import UserError

# A system message, when present, is put first as plain text.
QA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '### Question:\\n' + message['content'] + '\\n\\n### Answer:\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ message['content'] + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
ALPACA_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}{{ messages[0]['content'] + '\\n\\n' }}"
    "{%- else -%}{{ '" + ALPACA_PREAMBLE + "\\n\\n' }}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ message['content'] + eos_token + '\\n\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

OURS = {"qa": QA_TEMPLATE, "alpaca": ALPACA_TEMPLATE, "chatml": CHATML_TEMPLATE}
TEMPLATE_NAMES = ("auto", "qa", "alpaca", "chatml", "tokenizer")


@dataclass(frozen=True)
class Template:
    """A named Jinja chat template; `render` is the only way prompts are built."""

    name: str
    jinja: str

    def render(self, tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, chat_template=self.jinja, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)


def _adds_bos(tokenizer) -> bool:
    """True when the tokenizer prepends BOS by itself (Llama-style), so our templates must render it."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def ours(name: str, tokenizer) -> Template:
    """One of our templates, with BOS rendered where the tokenizer would normally add it."""
    jinja = OURS[name]
    if _adds_bos(tokenizer):
        jinja = "{{ bos_token }}" + jinja
    return Template(name, jinja)


def resolve_template(name: str, tokenizer, shapes: set[str] | None = None) -> Template:
    """Pick the template for a run.

    `auto` uses the tokenizer's own chat template when it has one (instruct models, and bases
    that are specialize runs), else `alpaca` for Alpaca data, `chatml` for conversations with
    several turns or a system message, and `qa` for everything else.
    """
    if name not in TEMPLATE_NAMES:
        raise UserError(f"unknown template '{name}' (allowed: {', '.join(TEMPLATE_NAMES)})")
    own = getattr(tokenizer, "chat_template", None)
    if name == "tokenizer" or (name == "auto" and own):
        if not own:
            raise UserError("--template tokenizer: this tokenizer has no chat template (use qa, alpaca or chatml)")
        return Template("tokenizer", own)
    if name == "auto":
        shapes = shapes or set()
        if "alpaca" in shapes:
            name = "alpaca"
        elif shapes & {"messages", "conversations"}:
            name = "chatml"
        else:
            name = "qa"
    return ours(name, tokenizer)


def install_template(tokenizer, template: Template, system_prompt: str | None = None) -> None:
    """Make the template the tokenizer's chat template, so it is saved with the model.

    A run trained with a system prompt gets it as the template's default system message: any
    engine that renders the saved template (generate, chat, serve, vLLM) then prompts exactly as
    in training, unless the caller sends a system message of its own.
    """
    tokenizer.chat_template = with_default_system(template.jinja, system_prompt)
    tokenizer.init_kwargs["specialize_template"] = template.name


_DEFAULT_SYSTEM = "{# specialize: default system message #}"
_DEFAULT_SYSTEM_END = "{% endif %}{{ '' }}"  # the empty expression keeps trim_blocks off the template's first newline


def _jinja_string(text: str) -> str:
    """`text` as a Jinja string literal (Jinja decodes literals with Python's unicode-escape)."""
    escaped = "".join("\\" + ch if ch in '\\"' else ch if " " <= ch <= "~" else f"\\U{ord(ch):08x}" for ch in text)
    return f'"{escaped}"'


def with_default_system(jinja: str, system_prompt: str | None) -> str:
    """The template with `system_prompt` put first in conversations that have no system message.

    A default added earlier (a run fine-tuned again) is replaced, not stacked.
    """
    if jinja.startswith(_DEFAULT_SYSTEM) and _DEFAULT_SYSTEM_END in jinja:
        jinja = jinja.split(_DEFAULT_SYSTEM_END, 1)[1]
    if not system_prompt:
        return jinja
    return (_DEFAULT_SYSTEM + "{%- if messages and messages[0]['role'] != 'system' %}"
            "{% set messages = [{'role': 'system', 'content': " + _jinja_string(system_prompt) + "}] + messages %}"
            + _DEFAULT_SYSTEM_END + jinja)


def segments(template: Template, tokenizer, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, trained) pieces: assistant turns are trained.

    Each assistant turn is found as the difference between the conversation rendered up to and
    including that turn, and rendered up to the turn before it with the generation prompt —
    exactly the prompt a model sees at inference. A template for which the first is not an
    extension of the second cannot be trained turn by turn, and is reported.

    An assistant turn with `"weight": 0` is split the same way but not trained: it stays in the
    sequence as context. The `weight` key is taken off before rendering, so no template sees it.
    """
    weights = [message.get("weight", 1) for message in messages]
    messages = [{k: v for k, v in message.items() if k != "weight"} for message in messages]
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = template.render(tokenizer, messages[:i], add_generation_prompt=True)
        full = template.render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise UserError(f"template '{template.name}' does not render turn {i} as an extension of the "
                            "previous turns; use --template qa/chatml")
        answer = full[len(prompt):]
        eos = tokenizer.eos_token
        last_turn = i == max(j for j, m in enumerate(messages) if m["role"] == "assistant")
        if eos and eos not in answer and last_turn:
            # A template whose turns don't end in EOS: append it after the final answer only, so the
            # model learns to stop, and earlier turns stay exactly as inference renders them.
            answer += eos
        pieces.append((prompt[len(done):], False))
        pieces.append((answer, weights[i] != 0))
        done = full
    return [(text, trained) for text, trained in pieces if text]
