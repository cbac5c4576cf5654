"""Support-chat transcripts and Slack exports → exact examples, drops and sources."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest

from specialize.config import ConvertConfig
from specialize.data.convert import convert
from specialize.data.convert import slack
from specialize.data.convert.slack import clean_text
from specialize.errors import UserError

ASSETS = Path(__file__).parent / "assets" / "convert"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_csv_transcripts_become_trimmed_merged_conversations(tmp_path):
    out = tmp_path / "chats.jsonl"
    summary = convert(ConvertConfig(inputs=[str(ASSETS / "chat" / "transcripts.csv")], to=out), progress=False)
    file = (ASSETS / "chat" / "transcripts.csv").as_posix()
    assert _rows(out) == [
        {"messages": [
            # The agent's greeting comes before the customer wrote anything: cut.
            {"role": "user", "content": "My parcel shows delivered but I never got it.\nTracking number PX-448812."},
            {"role": "assistant", "content": "Sorry about that. I opened an investigation with the carrier.\n"
                                             "You will hear from us within 48 hours."}],
            # "ok thanks!" after the last agent reply is cut too.
            "source": {"file": file, "conversation": "T-1001", "line": 2, "converter": "chat"}},
        {"messages": [
            {"role": "user", "content": "Can I change the delivery address after ordering?"},
            {"role": "assistant", "content": 'Yes, until the parcel is handed to the carrier: open the order and '
                                             'click "Change address".'}],
            "source": {"file": file, "conversation": "T-1002", "line": 8, "converter": "chat"}},
        {"messages": [
            {"role": "user", "content": "Do you ship to Norway?"},
            {"role": "assistant", "content": "Yes, Norway takes 4-6 working days."}],
            "source": {"file": file, "conversation": "T-1004", "line": 12, "converter": "chat"}},
    ]
    assert summary.dropped == {"no agent reply": 1}  # T-1003: the customer was never answered
    assert summary.changed == {"leading agent turns removed": 1, "trailing customer turns removed": 1}
    assert summary.conversations == 3 and summary.pairs == 0


def test_csv_column_names_and_agents_are_configurable(tmp_path):
    out = tmp_path / "o.jsonl"
    cfg = ConvertConfig(inputs=[str(ASSETS / "chat" / "tickets_custom.csv")], to=out, conversation_column="ticket",
                        speaker_column="author", text_column="body", agent_speakers=["helpdesk"])
    convert(cfg, progress=False)
    assert [r["messages"] for r in _rows(out)] == [[
        {"role": "user", "content": "Where is my invoice?"},
        {"role": "assistant", "content": "Under Settings > Billing > Invoices."}]]


def test_csv_missing_column_names_file_and_field(tmp_path):
    cfg = ConvertConfig(inputs=[str(ASSETS / "chat" / "tickets_custom.csv")], to=tmp_path / "o.jsonl")
    with pytest.raises(UserError) as err:
        convert(cfg, progress=False)
    assert str(err.value) == (f"{(ASSETS / 'chat' / 'tickets_custom.csv').as_posix()}:1: field 'conversation_column': "
                              "no column 'conversation_id' (columns found: ticket, author, body); "
                              "set conversation_column to the right name")


def test_jsonl_messages_pass_through_validated(tmp_path):
    out = tmp_path / "o.jsonl"
    summary = convert(ConvertConfig(inputs=[str(ASSETS / "chat" / "openai.jsonl")], to=out), progress=False)
    file = (ASSETS / "chat" / "openai.jsonl").as_posix()
    assert _rows(out) == [
        {"messages": [{"role": "system", "content": "You are Parcelly's support assistant."},
                      {"role": "user", "content": "How long does a refund take?"},
                      {"role": "assistant", "content": "Refunds reach your account within 5 working days."}],
         "source": {"file": file, "line": 1, "converter": "chat"}},
        {"messages": [{"role": "user", "content": "Is there a student discount?"},
                      {"role": "assistant", "content": "Yes, 10% with a valid student ID."}],
         "source": {"file": file, "line": 2, "converter": "chat"}},
    ]
    assert summary.dropped == {"no agent reply": 1}
    assert summary.changed == {"trailing customer turns removed": 1}


def test_jsonl_bad_role_names_line_and_field(tmp_path):
    cfg = ConvertConfig(inputs=[str(ASSETS / "chat" / "bad_role.jsonl")], to=tmp_path / "o.jsonl")
    with pytest.raises(UserError, match=r"bad_role\.jsonl:2: field 'messages\[0\]\.role': role must be one of "):
        convert(cfg, progress=False)


def test_jsonl_malformed_line(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text('{"messages": []}\n{"messages": [\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"chats\.jsonl:2: not valid JSON"):
        convert(ConvertConfig(inputs=[str(path)], to=tmp_path / "o.jsonl"), progress=False)


SLACK_ROWS = [
    {"question": "How do I get access to the staging database? @sam said to ask here",
     # Replies by others in time order; the asker's "thanks! is that the same for prod?" and the
     # deploy bot are left out; the reply filed under the next day still belongs to the thread.
     "answer": "Request it in #help with the form at the access page (https://wiki.example.com/db-access), "
               "& @sam approves it.\n\n"
               "No, prod needs a ticket in #random. See https://wiki.example.com/prod\n\n"
               "Late answer on the staging question: @Devon Price is right; you can also ping @sam directly.",
     "source": {"file": "{export}/help/2021-03-01.json", "channel": "help", "thread": "1614592800.000200",
                "converter": "slack"}},
    {"question": "Who broke the coffee machine?",
     "answer": "It was descaling, it works again :coffee:",
     "source": {"file": "{export}/random/2021-03-01.json", "channel": "random", "thread": "1614610000.000100",
                "converter": "slack"}},
]
# joins and topic changes; the deploy bot twice; "slow CI?" (no thread) and the VPN question
# answered only by its asker and a bot.
SLACK_DROPPED = {"system message": 2, "bot message": 2, "unanswered": 2}


def _expected_slack(export: str) -> list[dict]:
    return [{**row, "source": {**row["source"], "file": row["source"]["file"].format(export=export)}}
            for row in SLACK_ROWS]


def test_slack_export_folder(tmp_path):
    out = tmp_path / "o.jsonl"
    export = ASSETS / "slack" / "export"
    summary = convert(ConvertConfig(inputs=[str(export)], to=out), progress=False)
    assert _rows(out) == _expected_slack(export.as_posix())
    assert summary.dropped == SLACK_DROPPED
    assert summary.kinds == {export.as_posix(): "slack"} and summary.per_file == {export.as_posix(): 2}


def test_slack_export_zip_with_top_folder(tmp_path):
    archive = tmp_path / "Acme Slack export.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for file in sorted((ASSETS / "slack" / "export").rglob("*.json")):
            z.write(file, "export/" + file.relative_to(ASSETS / "slack" / "export").as_posix())
    out = tmp_path / "o.jsonl"
    summary = convert(ConvertConfig(inputs=[str(archive)], to=out), progress=False)
    assert _rows(out) == _expected_slack(archive.as_posix())
    assert summary.dropped == SLACK_DROPPED


def test_slack_malformed_json_names_the_day_file(tmp_path):
    export = tmp_path / "export"
    shutil.copytree(ASSETS / "slack" / "export", export)
    (export / "random" / "2021-03-01.json").write_text('[\n  {"ts": "1.0", "text": "hi"\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"export/random/2021-03-01\.json:3: not valid JSON"):
        convert(ConvertConfig(inputs=[str(export)], to=tmp_path / "o.jsonl"), progress=False)


def test_slack_markup_cleaning():
    users, channels = {"U1": "Ann Lee"}, {"C9": "ops"}
    text = ("<!here> <@U1> and <@U2|bob> see <#C9> / <#C7|dev>: <https://x.io/a|docs>, <https://x.io/b>, "
            "<mailto:a@x.io|a@x.io>, <!subteam^S1|@oncall> &lt;b&gt; &amp;")
    assert clean_text(text, users, channels) == ("@here @Ann Lee and @bob see #ops / #dev: docs (https://x.io/a), "
                                                 "https://x.io/b, a@x.io, @oncall <b> &")


def _zipped_export(archive: Path, extra: dict[str, str]) -> None:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for file in sorted((ASSETS / "slack" / "export").rglob("*.json")):
            z.write(file, "export/" + file.relative_to(ASSETS / "slack" / "export").as_posix())
        for name, text in extra.items():
            z.writestr("export/" + name, text)


def test_slack_zip_member_over_the_size_limit_is_never_unpacked(tmp_path, monkeypatch):
    archive = tmp_path / "bomb.zip"
    _zipped_export(archive, {"random/2021-03-02.json": "[" + " " * 100_000 + "]"})  # ~100 bytes packed
    assert archive.stat().st_size < 5_000
    monkeypatch.setattr(slack, "MAX_MEMBER_BYTES", 10_000)
    read, real_read = [], zipfile.ZipFile.read

    def recording_read(self, name, pwd=None):
        read.append(getattr(name, "filename", name))
        return real_read(self, name, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "read", recording_read)
    with pytest.raises(UserError) as err:
        convert(ConvertConfig(inputs=[str(archive)], to=tmp_path / "o.jsonl"), progress=False)
    assert str(err.value) == (f"{archive.as_posix()}/random/2021-03-02.json: unpacks to 100,002 bytes, over the "
                              "10,000-byte limit for one file of a Slack export (a damaged or hostile zip?)")
    assert "export/random/2021-03-01.json" in read and "export/random/2021-03-02.json" not in read


def test_slack_zip_total_size_is_limited(tmp_path, monkeypatch):
    archive = tmp_path / "big.zip"
    _zipped_export(archive, {})
    # users.json (509 bytes) and channels.json (314) fit; the first day file (2,375) goes over.
    monkeypatch.setattr(slack, "MAX_EXPORT_BYTES", 3_000)
    with pytest.raises(UserError) as err:
        convert(ConvertConfig(inputs=[str(archive)], to=tmp_path / "o.jsonl"), progress=False)
    assert str(err.value) == (f"{archive.as_posix()}/help/2021-03-01.json: with this file the export unpacks to "
                              "more than the 3,000-byte limit; export fewer channels or a shorter period at a time")
