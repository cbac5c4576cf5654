"""Support-chat transcripts → multi-turn `messages` examples.

Two input shapes:
- JSONL in OpenAI's fine-tuning shape, one `{"messages": [{"role", "content"}, …]}` per line:
  each row is validated and its messages passed through as they are;
- CSV with one message per row and a conversation id, speaker and text column (names set by
  `conversation_column`, `speaker_column`, `text_column`). Rows are grouped by conversation in
  file order; a speaker listed in `agent_speakers` (any case) becomes `assistant`, anyone else
  `user`; consecutive messages from the same side are merged into one turn.

Both shapes then follow the same two rules, because a training example must teach the model
to answer a customer: leading agent turns (greetings before the customer wrote anything, and the
tool results of such turns) and trailing customer turns (questions nobody answered, tool results
no turn answers) are cut, and a conversation without any agent reply is dropped with a reason.

JSONL rows keep OpenAI's tool-calling fields (`tools`, `parallel_tool_calls`, assistant
`tool_calls`, `tool` turns, `developer`, text-part lists), and every row written is first read
back as `finetune` reads it (`formats.to_example`), so the output is accepted by lint and finetune.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from specialize.config import ConvertConfig
from specialize.data.formats import to_example
from specialize.data.io import Record, csv_rows, jsonl_lines
from specialize.errors import UserError

ROLES = {"system", "developer", "user", "assistant", "tool"}
ROW_FIELDS = ("tools", "parallel_tool_calls")  # row fields of OpenAI's format kept beside the messages


def trim_conversation(messages: list[dict], changed: Counter) -> tuple[list[dict] | None, str | None]:
    """Apply the shared rules; return (messages, None) or (None, reason dropped)."""
    if not messages:
        return None, "empty conversation"
    system = [m for m in messages if m["role"] in ("system", "developer")]
    turns = [m for m in messages if m["role"] not in ("system", "developer")]
    start = 0
    while start < len(turns) and turns[start]["role"] in ("assistant", "tool"):
        start += 1
    end = len(turns)
    while end > start and turns[end - 1]["role"] != "assistant":
        end -= 1
    if end <= start:
        return None, "no agent reply"
    if start:
        changed["leading agent turns removed"] += 1
    if end < len(turns):
        changed["trailing customer turns removed"] += 1
    # System messages keep their place at the front; other turns keep their order.
    return system + turns[start:end], None


def read_jsonl(path: Path, text: str, display: str) -> tuple[list[dict], Counter, Counter]:
    """Validated chat rows of an OpenAI-style JSONL file; (rows, dropped, changed)."""
    rows: list[dict] = []
    dropped: Counter = Counter()
    changed: Counter = Counter()
    for number, line in jsonl_lines(text):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise UserError(f"not valid JSON: {e.msg} (column {e.colno})", path=display, line=number) from None
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list):
            raise UserError("each row needs a 'messages' list", path=display, line=number, field="messages")
        for k, message in enumerate(messages):
            _check_message(message, display, number, k)
        kept, reason = trim_conversation(messages, changed)
        if kept is None:
            dropped[reason] += 1
            continue
        out = {"messages": kept, **{k: row[k] for k in ROW_FIELDS if k in row},
               "source": {"file": display, "line": number, "converter": "chat"}}
        to_example(Record(out, display, number), "messages")  # what finetune will read: fails here, naming the line
        rows.append(out)
    return rows, dropped, changed


def _check_message(message, display: str, line: int, index: int) -> None:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise UserError("a message must be an object with 'role' and 'content'", path=display, line=line, field=where)
    role = message.get("role")
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(sorted(ROLES))} (got {role!r})",
                        path=display, line=line, field=f"{where}.role")
    content = message.get("content")
    tool_call = role == "assistant" and content is None and message.get("tool_calls")
    parts_ok = isinstance(content, list) and all(isinstance(p, dict) for p in content)
    if not (isinstance(content, str) or parts_ok or tool_call):
        raise UserError("content must be a string (or a list of content parts)",
                        path=display, line=line, field=f"{where}.content")


def read_csv(path: Path, text: str, display: str, cfg: ConvertConfig) -> tuple[list[dict], Counter, Counter]:
    """Conversations of a one-message-per-row CSV transcript; (rows, dropped, changed)."""
    rows = csv_rows(text, display)
    header = next(rows, (1, []))[1]
    for column, key in ((cfg.conversation_column, "conversation_column"), (cfg.speaker_column, "speaker_column"),
                        (cfg.text_column, "text_column")):
        if column not in header:
            found = ", ".join(h for h in header if h) or "none"
            raise UserError(f"no column '{column}' (columns found: {found}); set {key} to the right name",
                            path=display, line=1, field=key)
    agents = {s.strip().casefold() for s in cfg.agent_speakers}
    conversations: dict[str, list[tuple[int, str, str]]] = {}
    for start, cells in rows:
        record = dict(zip(header, cells))
        conversation = (record.get(cfg.conversation_column) or "").strip()
        content = (record.get(cfg.text_column) or "").strip()
        if not conversation:
            if not any((v or "").strip() for v in record.values() if isinstance(v, str)):
                continue  # a blank row
            raise UserError("empty conversation id", path=display, line=start, field=cfg.conversation_column)
        if not content:
            continue  # attachments or deleted messages leave empty text
        speaker = (record.get(cfg.speaker_column) or "").strip().casefold()
        role = "assistant" if speaker in agents else "user"
        conversations.setdefault(conversation, []).append((start, role, content))
    examples: list[dict] = []
    dropped: Counter = Counter()
    changed: Counter = Counter()
    for conversation, turns in conversations.items():
        messages: list[dict] = []
        for _, role, content in turns:
            if messages and messages[-1]["role"] == role:
                messages[-1]["content"] += "\n" + content  # one side writing several lines in a row
            else:
                messages.append({"role": role, "content": content})
        kept, reason = trim_conversation(messages, changed)
        if kept is None:
            dropped[reason] += 1
            continue
        source = {"file": display, "conversation": conversation, "line": turns[0][0], "converter": "chat"}
        examples.append({"messages": kept, "source": source})
    return examples, dropped, changed
