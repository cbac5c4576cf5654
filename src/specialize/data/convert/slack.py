"""Slack's standard workspace export (folder or .zip) → question/answer pairs from threads.

An export holds `users.json`, `channels.json` (plus `groups.json` / `mpims.json` / `dms.json`
in fuller exports) and one folder per channel with a `YYYY-MM-DD.json` list of messages per
day. A thread is a parent message (`thread_ts == ts`) and its replies (`thread_ts` of the
parent, `parent_user_id`), which may be filed under later days.

Every thread answered by someone other than the asker becomes one pair: the question is the
parent message, the answer the replies of everyone else in time order, one paragraph each
(the asker's own follow-ups are left out, they are not answers). Left out, and counted:
joins/leaves/topic changes and other system messages, bot messages, messages nobody else
answered in a thread. Mentions `<@U123>` become `@display name`, channel links `#name`,
links `label (url)`.
"""

from __future__ import annotations

import html
import json
import re
import zipfile
from collections import Counter
from pathlib import Path, PurePosixPath

from specialize.data.convert.inputs import leads_out
from specialize.data.io import read_text
from specialize.errors import UserError

# Subtypes that are still people talking; every other subtype is a system event.
_CHAT_SUBTYPES = {None, "thread_broadcast", "file_share", "me_message"}
_DAY_FILE = re.compile(r"^\d{4}-\d{2}-\d{2}\.json$")
_ESCAPE = re.compile(r"<([^<>\n]+)>")
# A zip's member sizes are checked before anything is unpacked, so a zip bomb ends in a clear
# error instead of filling memory. Real exports have day files of a few MB.
MAX_MEMBER_BYTES = 256 * 2**20
MAX_EXPORT_BYTES = 4 * 2**30
LINKED_OUT = "file linked from outside the export"  # counted, never read (see _Export.load)


class _Export:
    """Read access to an export, whether unpacked in a folder or still zipped."""

    def __init__(self, path: Path, display: str):
        self.path, self.display = path, display
        if path.is_dir():
            self.names = [p.relative_to(path).as_posix() for p in path.rglob("*.json")]
            self.zip = None
            self.linked_out = 0
        else:
            self.zip = zipfile.ZipFile(path)
            self.linked_out = 0  # a zip holds no links
            names = [n for n in self.zip.namelist() if n.endswith(".json")]
            # Exports zipped from their folder put everything under one top-level directory.
            root = min((n[:-len("users.json")] for n in names if n.endswith("users.json")), key=len)
            self.prefix = root
            self.names = [n[len(root):] for n in names if n.startswith(root)]
            self.unpacked = 0  # bytes read from the zip so far

    def where(self, name: str) -> str:
        return f"{self.display}/{name}"

    def load(self, name: str, required: bool = True):
        if self.zip is None:
            file = self.path / name
            if file.exists() and leads_out(file, self.path):
                # A link to a file elsewhere would put that file's text into the dataset.
                if name in ("users.json", "channels.json"):
                    raise UserError("is a link that leads out of the Slack export folder; not followed",
                                    path=self.where(name))
                self.linked_out += 1
                return []
            if not file.is_file():
                if required:
                    raise UserError("missing from the Slack export", path=self.where(name))
                return []
            data = file.read_bytes()
        else:
            try:
                info = self.zip.getinfo(self.prefix + name)
            except KeyError:
                if required:
                    raise UserError("missing from the Slack export", path=self.where(name)) from None
                return []
            self._check_size(name, info.file_size)
            # zipfile stops at the declared size, so a member that lies about it cannot unpack more.
            data = self.zip.read(info)
        text = read_text(Path(name), data, self.where(name))
        try:
            return json.loads(text)
        except ValueError as e:
            raise UserError(f"not valid JSON: {e.msg} (column {e.colno})", path=self.where(name),
                            line=e.lineno) from None


    def _check_size(self, name: str, size: int) -> None:
        if size > MAX_MEMBER_BYTES:
            raise UserError(f"unpacks to {size:,} bytes, over the {MAX_MEMBER_BYTES:,}-byte limit for one file of "
                            f"a Slack export (a damaged or hostile zip?)", path=self.where(name))
        self.unpacked += size
        if self.unpacked > MAX_EXPORT_BYTES:
            raise UserError(f"with this file the export unpacks to more than the {MAX_EXPORT_BYTES:,}-byte limit; "
                            f"export fewer channels or a shorter period at a time", path=self.where(name))


def _display_names(users) -> dict[str, str]:
    names = {}
    for user in users if isinstance(users, list) else []:
        if isinstance(user, dict) and isinstance(user.get("id"), str):
            profile = user.get("profile") or {}
            names[user["id"]] = (profile.get("display_name") or profile.get("real_name") or user.get("real_name")
                                 or user.get("name") or user["id"])
    return names


def clean_text(text: str, users: dict[str, str], channels: dict[str, str]) -> str:
    """Slack markup → plain text: mentions resolved, links spelled out, entities unescaped."""
    def replace(match: re.Match) -> str:
        inner = match.group(1)
        target, _, label = inner.partition("|")
        if target.startswith("@"):
            return "@" + users.get(target[1:], label or target[1:])
        if target.startswith("#"):
            return "#" + (label or channels.get(target[1:], target[1:]))
        if target.startswith("!"):
            if target.startswith("!subteam^") or target.startswith("!date^"):
                return label or target[1:].split("^")[0]
            return "@" + target[1:]  # <!here>, <!channel>, <!everyone>
        url = target
        if url.startswith("mailto:"):
            return label or url[len("mailto:"):]
        if not label or label == url or label == re.sub(r"^https?://", "", url):
            return url
        return f"{label} ({url})"
    return html.unescape(_ESCAPE.sub(replace, text or "")).strip()


def read_export(path: Path, display: str) -> tuple[list[dict], Counter]:
    """Question/answer rows of one Slack export; (rows, dropped with reasons)."""
    export = _Export(path, display)
    try:
        return _read(export)
    finally:
        if export.zip is not None:
            export.zip.close()


def _read(export: _Export) -> tuple[list[dict], Counter]:
    users = _display_names(export.load("users.json"))
    channel_list = []
    for listing in ("channels.json", "groups.json", "mpims.json", "dms.json"):
        loaded = export.load(listing, required=listing == "channels.json")
        channel_list += [c for c in (loaded if isinstance(loaded, list) else []) if isinstance(c, dict)]
    channels = {c["id"]: c.get("name") or c["id"] for c in channel_list if isinstance(c.get("id"), str)}
    folders: dict[str, list[str]] = {}
    for name in sorted(export.names):
        parts = PurePosixPath(name).parts
        if len(parts) == 2 and _DAY_FILE.match(parts[1]):
            folders.setdefault(parts[0], []).append(name)
    rows: list[dict] = []
    dropped: Counter = Counter()
    for folder, day_files in sorted(folders.items()):
        messages: list[tuple[dict, str]] = []
        for day_file in day_files:
            day = export.load(day_file)
            if not isinstance(day, list):
                raise UserError("expected a list of messages", path=export.where(day_file))
            messages += [(m, day_file) for m in day if isinstance(m, dict) and m.get("ts")]
        rows += _threads(folder, messages, users, channels, export, dropped)
    dropped[LINKED_OUT] += export.linked_out
    return rows, dropped


def _timestamp(message: dict) -> float:
    try:
        return float(message["ts"])
    except (TypeError, ValueError):
        return 0.0


def _threads(channel: str, messages: list[tuple[dict, str]], users: dict, channels: dict,
             export: _Export, dropped: Counter) -> list[dict]:
    parents: dict[str, tuple[dict, str]] = {}
    replies: dict[str, list[dict]] = {}
    seen: set[str] = set()
    for message, day_file in sorted(messages, key=lambda m: _timestamp(m[0])):
        if message["ts"] in seen:
            continue  # a thread_broadcast reply can be filed twice
        seen.add(message["ts"])
        if message.get("bot_id") or message.get("subtype") == "bot_message":
            dropped["bot message"] += 1
        elif message.get("subtype") not in _CHAT_SUBTYPES:
            dropped["system message"] += 1
        elif message.get("thread_ts") and message["thread_ts"] != message["ts"]:
            replies.setdefault(message["thread_ts"], []).append(message)
        else:
            parents[message["ts"]] = (message, day_file)
    rows = []
    for ts, (parent, day_file) in parents.items():
        asker = parent.get("user")
        answers = [clean_text(r.get("text", ""), users, channels) for r in replies.pop(ts, [])
                   if r.get("user") != asker]
        answers = [a for a in answers if a]
        question = clean_text(parent.get("text", ""), users, channels)
        if not answers:
            dropped["unanswered"] += 1
        elif not question:
            dropped["empty question"] += 1
        else:
            source = {"file": export.where(day_file), "channel": channel, "thread": ts, "converter": "slack"}
            rows.append({"question": question, "answer": "\n\n".join(answers), "source": source})
    if replies:
        dropped["thread question not in export"] += len(replies)
    return rows
