"""Text that came from users or servers, on its way into a prompt or a message.

Text in user data is data, never instructions: inside a prompt it sits between tags it can
never close (`fence`), and an API key is never quoted back, even in part (`redact`, before any
excerpt is cut). The LLM converter and the LLM judge both go through here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence


def fence(tag: str, text: str, defused: Sequence[str] = ()) -> str:
    """`text` between `<tag>` and `</tag>` lines.

    Every `tag` and `defused` tag inside the text (any case, spacing or attributes) becomes
    "[name tag]", so the text can never close its fence and speak outside it.
    """
    names = sorted({tag, *defused})
    pattern = re.compile(r"<\s*/?\s*(" + "|".join(map(re.escape, names)) + r")\b[^>]*>", re.I)
    body = pattern.sub(lambda m: f"[{m.group(1).lower()} tag]", text)
    return f"<{tag}>\n{body}\n</{tag}>"


def redact(text: str, secret: str | None) -> str:
    """`text` with every occurrence of `secret` replaced by ***; cut excerpts only after this."""
    return text.replace(secret, "***") if secret else text
