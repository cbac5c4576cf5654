"""Prompt templates, all expressed as Jinja chat templates.

Every template — ours or the tokenizer's own — is a Jinja chat template rendered by
`tokenizer.apply_chat_template`. The template used for training is saved as the run
tokenizer's `chat_template`, so plain transformers, vLLM or TGI render exactly the training
prompt with `apply_chat_template(messages, add_generation_prompt=True)` without our code.

Ours, for models that have no chat template:
- `qa`:     `### Question:\\n{question}\\n\\n### Answer:\\n{answer}<eos>`
- `alpaca`: the Stanford Alpaca preamble, `### Instruction:` / `### Response:`
- `chatml`: `<|im_start|>{role}\\n{content}<eos>\\n`, generation prompt `<|im_start|>assistant\\n`;
  with tools, the format of `specialize.tools` (tools in the system turn, `<tool_call>` blocks,
  `<tool_response>` results), so `apply_chat_template(messages, tools=...)` on a saved run renders
  tool conversations exactly as training did. `qa` and `alpaca` do not render tools.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from jinja2 import Environment, TemplateError, nodes

from specialize import tools as tool_format
from specialize.data.special import Defused, Rendered, defuse
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

# With tools: the system turn lists them (after the system text), an assistant turn writes its calls after its
# text, and consecutive tool results share one user turn: the format of `specialize.tools` (Qwen2.5's).
CHATML_TEMPLATE = (
    "{%- if tools -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}{%- set head = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set messages = messages[1:] -%}{%- else -%}{%- set head = '' -%}{%- endif -%}"
    "{{- '<|im_start|>system\\n' + head }}" + tool_format.JINJA_TOOLS_BLOCK + "{{- eos_token + '\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user\\n' }}"
    "{%- else -%}{{- '\\n' }}{%- endif -%}" + tool_format.JINJA_RESULT +
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- eos_token + '\\n' }}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' and message.tool_calls -%}"
    "{{- '<|im_start|>assistant\\n' }}{%- if message['content'] -%}{{- message['content'] + '\\n' }}{%- endif -%}"
    + tool_format.JINJA_CALLS + "{{- eos_token + '\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endif -%}"
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
    origin: str = ""  # where a tokenizer's own template came from (its folder or hub id), for messages

    @property
    def label(self) -> str:
        """How messages name the template: `'tokenizer' (the chat template of models/gemma-2)`."""
        return f"'{self.name}'" + (f" (the chat template of {self.origin})" if self.origin else "")

    @property
    def renders_tools(self) -> bool:
        """Whether the template renders tools and tool calls (ours: chatml; a tokenizer's: when its Jinja reads them)."""
        return "tool_calls" in self.jinja or "tools" in self.jinja

    def render(self, tokenizer, messages: list[dict], add_generation_prompt: bool,
               tools: list[dict] | None = None) -> str:
        """The conversation as text. Messages are OpenAI's (`tools.template_messages` makes them what templates
        read); `tools` are passed to the template as `apply_chat_template(..., tools=...)` does.

        When the messages or tools hold the string of a special token, the text is a `Rendered`, which
        knows which of its special-token strings the template wrote (see `defuse`)."""
        messages, tools = self.prepare(messages, tools)
        if (defused := defuse(tokenizer, (messages, tools), avoid=self.jinja)) is not None:
            plain = self.render_prepared(tokenizer, *defused.data, add_generation_prompt)
            return Rendered(restore(defused, plain), plain)
        return self.render_prepared(tokenizer, messages, tools, add_generation_prompt)

    def prepare(self, messages: list[dict], tools: list[dict] | None) -> tuple[list[dict], list[dict] | None]:
        """The messages and tools exactly as the template reads them: `tools.template_messages` (arguments
        decoded from JSON, content parts joined), tools in OpenAI's shape, and the default system message
        of a run trained with --system-prompt (`with_default_system`) in front, as its Jinja would put it.

        Data is defused after this, never before: a JSON escape (`\\u003c|im_end|\\u003e`) or a string
        split across content parts becomes a special-token string only here."""
        messages = tool_format.template_messages(messages)
        if messages and messages[0].get("role") != "system" and (default := default_system(self.jinja)):
            messages = [{"role": "system", "content": default}, *messages]
        return messages, tool_format.normalize_tools(tools) if tools else None

    def render_prepared(self, tokenizer, messages: list[dict], tools: list[dict] | None,
                        add_generation_prompt: bool) -> str:
        """`apply_chat_template` on messages and tools that `prepare` readied (and perhaps `defuse`d)."""
        uses_tools = bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
        if uses_tools and not self.renders_tools:
            raise TemplateRaised(f"template {self.label} cannot render tools or tool calls; use --template chatml, "
                            "or a model whose chat template supports tools")
        return tokenizer.apply_chat_template(messages, chat_template=self.jinja, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, tools=tools or None)


class TemplateRaised(UserError):
    """The template itself refused the conversation (`raise_exception` in its Jinja): e.g. Gemma 2 on a
    system message, Mistral on roles that do not alternate."""


def restore(defused: Defused, plain: str) -> str:
    """The rendered text of defused data (`special.defuse`), its special-token strings back as text."""
    text = defused.restore(plain)
    if text is None:
        raise TemplateRaised("the template cut or rewrote a message's text that holds a special token's string, "
                             "so that text cannot be told apart from the template's own control tokens")
    return text


END_OF_TURN_KEY = "specialize_end_of_turn"  # tokenizer_config.json key: the model's end-of-turn tokens


def end_of_turn_tokens(tokenizer) -> list[str]:
    """The tokens that end an assistant turn: the tokenizer's EOS, then the end-of-turn tokens of the
    model's generation_config.json (`<end_of_turn>` for Gemma, `<|eot_id|>` for Llama 3), which
    `model.load_tokenizer` records on the tokenizer."""
    tokens = [tokenizer.eos_token] if tokenizer.eos_token else []
    return tokens + [t for t in tokenizer.init_kwargs.get(END_OF_TURN_KEY) or [] if t not in tokens]


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
        return Template("tokenizer", own, str(getattr(tokenizer, "name_or_path", "") or ""))
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


@lru_cache(maxsize=64)
def default_system(jinja: str) -> str | None:
    """The default system message `with_default_system` put into the template, or None."""
    if not (jinja.startswith(_DEFAULT_SYSTEM) and _DEFAULT_SYSTEM_END in jinja):
        return None
    head = Environment().parse(jinja.split(_DEFAULT_SYSTEM_END, 1)[0] + "{% endif %}")
    return next((pair.value.value for pair in head.find_all(nodes.Pair)
                 if isinstance(pair.key, nodes.Const) and pair.key.value == "content"
                 and isinstance(pair.value, nodes.Const)), None)


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


def segments(template: Template, tokenizer, messages: list[dict], tools: list[dict] | None = None,
             ) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, trained) pieces: assistant turns are trained.

    Each assistant turn is found as the difference between the conversation rendered up to and
    including that turn, and rendered up to the turn before it with the generation prompt —
    exactly the prompt a model sees at inference. A template for which the first is not an
    extension of the second cannot be trained turn by turn, and is reported.

    An assistant turn with `"weight": 0` is split the same way but not trained: it stays in the
    sequence as context. The `weight` key is taken off before rendering, so no template sees it.

    With `tools`, every rendering lists them (the tools block is prompt); an assistant turn's tool
    calls are part of its answer, and `tool` results are prompt, like user turns.

    The messages are readied as `Template.render` readies them (`Template.prepare`: the run's default system
    message included), so every prompt here is the inference prompt. Data holding special-token strings is
    split as its defused copy (see `defuse`): the pieces are then `Rendered`, and where a turn ends is found
    from the template's own end-of-turn tokens only.
    """
    messages, tools = template.prepare(messages, tools)
    weights = [message.get("weight", 1) for message in messages]
    messages = [{k: v for k, v in message.items() if k != "weight"} for message in messages]
    if (defused := defuse(tokenizer, (messages, tools), avoid=template.jinja)) is not None:
        return [(Rendered(restore(defused, text), text), trained)
                for text, trained in _segments(template, tokenizer, *defused.data, weights)]
    return _segments(template, tokenizer, messages, tools, weights)


def _segments(template: Template, tokenizer, messages: list[dict], tools: list[dict] | None,
              weights: list[int]) -> list[tuple[str, bool]]:
    """`segments` of prepared (and perhaps defused) messages."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    ends = end_of_turn_tokens(tokenizer)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            prompt = template.render_prepared(tokenizer, messages[:i], tools, add_generation_prompt=True)
            full = template.render_prepared(tokenizer, messages[: i + 1], tools, add_generation_prompt=False)
        except TemplateError as e:
            raise TemplateRaised(f"template {template.label} cannot render this conversation: {e}") from None
        last_turn = i == max(j for j, m in enumerate(messages) if m["role"] == "assistant")
        if prompt.startswith(done) and full.startswith(prompt):
            answer = full[len(prompt):]
        elif not done and last_turn and (answer := _rendered_answer(prompt, full, messages[i - 1] if i else None,
                                                                     message["content"] or "")):
            # The only assistant turn, rendered differently once it is answered: Mistral's template
            # puts the system text into the user turn only while that turn is the last message.
            # Training sees the inference prompt followed by the turn as the template ends it.
            pass
        elif (rewritten := _history_pieces(template, tokenizer, messages, tools, weights)) is not None:
            return rewritten
        else:
            raise UserError(f"template '{template.name}' does not render turn {i} as an extension of the "
                            "previous turns; use --template qa/chatml")
        eos = tokenizer.eos_token
        if eos and last_turn and not any(end in answer for end in ends):
            # A template whose turns end in no end-of-turn token: append EOS after the final answer
            # only, so the model learns to stop, and earlier turns stay exactly as inference renders them.
            answer += eos
        pieces.append((prompt[len(done):], False))
        pieces.append((answer, weights[i] != 0))
        done = full
    return [(text, trained) for text, trained in pieces if text]


def _history_pieces(template: Template, tokenizer, messages: list[dict], tools: list[dict] | None,
                    weights: list[int]) -> list[tuple[str, bool]] | None:
    """The pieces of a conversation whose template rewrites earlier assistant turns once a later turn
    follows (Qwen3 drops their think block), or None when the template is not of that kind.

    The whole conversation is rendered once. Every assistant turn's inference prompt must be a prefix
    of it, so each turn is still trained right after exactly the prompt inference renders for it; an
    earlier turn is trained as the conversation's history shows it (up to its end-of-turn token and
    the white space after it), the last one as inference renders it.
    """
    turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    try:
        final = template.render_prepared(tokenizer, messages, tools, add_generation_prompt=False)
        prompts = [template.render_prepared(tokenizer, messages[:i], tools, add_generation_prompt=True) for i in turns]
    except TemplateError:
        return None
    starts = [len(prompt) for prompt in prompts]
    if not all(final.startswith(prompt) for prompt in prompts) or starts != sorted(set(starts)):
        return None
    ends = [end for end in end_of_turn_tokens(tokenizer) if end]
    pieces: list[tuple[str, bool]] = []
    done = 0
    for k, (i, start) in enumerate(zip(turns, starts)):
        if k + 1 < len(turns):
            found = [(at, len(end)) for end in ends if (at := final.find(end, start, starts[k + 1])) >= 0]
            if not found:
                return None
            at, length = min(found)
            stop = at + length
            while stop < starts[k + 1] and final[stop].isspace():
                stop += 1
        else:
            stop = len(final)
        answer = final[start:stop]
        if k + 1 == len(turns) and tokenizer.eos_token and not any(end in answer for end in ends):
            answer += tokenizer.eos_token  # as segments does: the final answer ends in a trained EOS
        pieces += [(final[done:start], False), (answer, weights[i] != 0)]
        done = stop
    return [(text, trained) for text, trained in pieces if text]


def _rendered_answer(prompt: str, full: str, question: dict | None, content: str) -> str | None:
    """The last assistant turn as `full` renders it (its content and end of turn), when `full` and the
    inference `prompt` lead into it the same way after the question; else None.

    Both must end in the same text after the user's question (Mistral: `[/INST]`): a template whose
    generation prompt never appears in training (`A: ` at inference, `Answer: ` in training) stays an
    error, and so does one that rewrites the answer's content.
    """
    content = content.strip()
    start = full.rfind(content) if content else -1
    if start < 0 or question is None or question["role"] != "user" or not question["content"].strip():
        return None
    asked = question["content"].strip()
    before, at_inference = full[:start], prompt
    if asked not in before or asked not in at_inference:
        return None
    if before[before.rfind(asked) + len(asked):] != at_inference[at_inference.rfind(asked) + len(asked):]:
        return None
    return full[start:]
