"""`specialize studio` API: the token, cross-site refusals, path confinement, uploads, forms, runs, jobs.

Each security check here fails when its check in studio/guard.py or studio/workspace.py is
removed (tried one by one when they were written). The browser flow is tests/test_studio_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
import typing
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from filelock import FileLock
from helpers import QA8

from specialize.config import FinetuneConfig, StudioConfig
from specialize.errors import UserError
from specialize.flags import _strip_none
from specialize.studio import resolve_token
from specialize.studio.app import create_app
from specialize.studio.forms import FORMS, NAMED_PATHS, NOT_PATHS, schema, to_flags
from specialize.studio.jobs import JobQueue
from specialize.studio.playground import Playground
from specialize.studio.workspace import Workspace

TOKEN = "test-token-123456"
ORIGIN = "http://127.0.0.1:7860"
WRITE = {"X-Studio": "1"}


@pytest.fixture
def workspace(tmp_path) -> Path:
    root = tmp_path / "ws"
    (root / "data").mkdir(parents=True)
    (root / "data" / "qa.jsonl").write_text(QA8.read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "secret.jsonl").write_text('{"question": "secret?", "answer": "outside"}\n', encoding="utf-8")
    return root


def client(workspace: Path, signed_in: bool = True, **settings) -> TestClient:
    app = create_app(StudioConfig(workspace=workspace, **settings), TOKEN)
    c = TestClient(app, base_url=ORIGIN)
    if signed_in:
        assert c.get(f"/?token={TOKEN}", follow_redirects=False).status_code == 303
    return c


# -- the token ------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/", "/static/app.js", "/api/files", "/api/runs", "/api/forms/finetune"])
def test_every_page_and_api_needs_the_token(workspace, path):
    c = client(workspace, signed_in=False)
    assert c.get(path).status_code == 401
    assert c.get(path, headers={"Authorization": "Bearer wrong-token-0000"}).status_code == 401
    c.cookies.set("specialize-studio-7860", "wrong-token-0000")
    assert c.get(path).status_code == 401
    assert c.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert c.post("/api/lint", json={"data": ["data/qa.jsonl"]}, headers=WRITE).status_code == 401


def test_token_url_sets_a_strict_cookie_and_drops_the_token_from_the_address(workspace):
    c = client(workspace, signed_in=False)
    assert c.get("/?token=wrong-token-0000", follow_redirects=False).status_code == 401
    r = c.get(f"/?token={TOKEN}&x=1", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/?x=1"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"specialize-studio-7860={TOKEN};")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    page = c.get("/")
    assert page.status_code == 200 and "specialize <span>studio</span>" in page.text
    assert "http" not in page.text.replace("http://www.w3.org", "")  # nothing fetched from elsewhere


def test_token_comes_from_flag_then_environment_then_random(monkeypatch):
    monkeypatch.delenv("SPECIALIZE_TOKEN", raising=False)
    assert resolve_token(StudioConfig(token="from-the-flag")) == "from-the-flag"
    monkeypatch.setenv("SPECIALIZE_TOKEN", "from-the-env")
    assert resolve_token(StudioConfig()) == "from-the-env"
    monkeypatch.delenv("SPECIALIZE_TOKEN")
    first, second = resolve_token(StudioConfig()), resolve_token(StudioConfig())
    assert first != second and len(first) >= 32
    with pytest.raises(UserError, match="at least 8 characters"):
        resolve_token(StudioConfig(token="short"))


# -- cross-site requests --------------------------------------------------------------------------
def test_state_changes_need_the_studio_header_and_the_studio_origin(workspace):
    c = client(workspace)
    body = {"data": ["data/qa.jsonl"]}
    assert c.post("/api/lint", json=body).status_code == 403  # a form post from another site looks like this
    assert c.post("/api/lint", json=body, headers=WRITE | {"Origin": "http://evil.example"}).status_code == 403
    assert c.post("/api/lint", json=body, headers=WRITE | {"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert c.put("/api/files?path=x.jsonl", content=b"{}\n").status_code == 403
    ok = c.post("/api/lint", json=body, headers=WRITE | {"Origin": ORIGIN, "Sec-Fetch-Site": "same-origin"})
    assert ok.status_code == 200 and ok.json()["train"] == 8


# -- paths stay in the workspace ------------------------------------------------------------------
OUTSIDE = [("../secret.jsonl", "'..' is not allowed"), ("data/../../secret.jsonl", "'..' is not allowed"),
           ("..\\secret.jsonl", "'..' is not allowed"), ("/etc/passwd", "absolute paths are not allowed"),
           ("C:/Windows/win.ini", "absolute paths are not allowed"),
           ("link/secret.jsonl", "leads out of the workspace"), ("escape.jsonl", "leads out of the workspace")]


@pytest.mark.parametrize("path, refusal", OUTSIDE)
def test_paths_outside_the_workspace_are_refused(workspace, path, refusal):
    (workspace / "link").symlink_to(workspace.parent, target_is_directory=True)  # a folder link out
    (workspace / "escape.jsonl").symlink_to(workspace.parent / "secret.jsonl")  # a file link out
    c = client(workspace)
    for r in (c.get("/api/files/preview", params={"path": path}),
              c.post("/api/lint", json={"data": [path]}, headers=WRITE),
              c.post("/api/lint", json={"data": ["data/qa.jsonl"], "eval_data": [path]}, headers=WRITE),
              c.put("/api/files", params={"path": path}, content=b'{"text": "x"}\n', headers=WRITE),
              c.post("/api/jobs/finetune", json={"data": [path], "base": "m", "out": "runs/a"}, headers=WRITE),
              c.post("/api/jobs/finetune", json={"data": ["data/qa.jsonl"], "base": path, "out": "runs/a"},
                     headers=WRITE),
              c.post("/api/jobs/finetune", json={"data": ["data/qa.jsonl"], "base": "m", "out": path},
                     headers=WRITE),
              c.post("/api/jobs/compare", json={"model": "runs/a", "data": ["data/qa.jsonl"], "docs": path},
                     headers=WRITE),
              c.post("/api/convert", json={"inputs": [path], "to": "x.jsonl"}, headers=WRITE),
              c.post("/api/convert", json={"inputs": ["data/qa.jsonl"], "to": path}, headers=WRITE),
              c.get("/api/runs/metrics", params={"run": path}),
              c.get("/api/runs/scorecard", params={"run": path}),
              c.get("/api/exports/info", params={"path": path})):
        assert r.status_code == 400, r.text
        assert "outside" not in r.text and "secret?" not in r.text
        assert refusal in r.json()["error"]
    chat = c.post("/api/chat", json={"run": path, "messages": [{"role": "user", "content": "hi"}]}, headers=WRITE)
    assert [json.loads(line) for line in chat.text.splitlines()] == [{"error": chat.json()["error"]}]
    assert refusal in chat.json()["error"]
    assert "secret" not in json.dumps(c.get("/api/files").json()["files"])
    assert not c.app.state.queue.jobs


def test_playground_loads_only_what_a_real_run_records_inside_the_workspace(workspace, tmp_path):
    ws, play = Workspace(workspace), Playground(Workspace(workspace))
    fake = workspace / "uploads"  # any folder can get a train_summary.json by upload; it is not a run
    fake.mkdir()
    (fake / "train_summary.json").write_text(json.dumps({"base": str(tmp_path / "outside")}))
    with pytest.raises(UserError, match="uploads is not a run folder"):
        play.model_ref("uploads", "base")
    run = _fake_run(workspace, "r", 2, finished=True, checkpoint=False)
    (workspace / "models" / "tiny").mkdir(parents=True)
    (workspace / "docs").mkdir()
    assert play.model_ref("runs/r", "base") == str(ws.root / "models" / "tiny")
    for base, said in ((str(tmp_path / "outside"), "outside the workspace"), ("../outside", "outside the workspace"),
                       ("nowhere/../../x", "outside the workspace"), ("/etc", "outside the workspace")):
        (run / "train_summary.json").write_text(json.dumps({"base": base}))
        with pytest.raises(UserError, match=f"runs/r records its base '{re.escape(base)}', {said}"):
            play.model_ref("runs/r", "base")
    (run / "train_summary.json").write_text(json.dumps({"base": str(ws.root / "models" / "tiny")}))
    assert play.model_ref("runs/r", "base") == str(ws.root / "models" / "tiny")  # absolute, but inside
    (run / "train_summary.json").write_text(json.dumps({"base": "HuggingFaceTB/SmolLM2-135M"}))
    assert play.model_ref("runs/r", "base") == "HuggingFaceTB/SmolLM2-135M"  # a hub id: names no file
    for docs, said in (("/etc", "outside the workspace"), ("docs", None), ("missing/docs", "which is not in the workspace")):
        config = yaml.safe_load((run / "config.yaml").read_text()) | {"rag_docs": docs}
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        if said is None:
            assert play.docs_path("runs/r", None) == ws.root / "docs"
        else:
            with pytest.raises(UserError, match=f"runs/r records rag_docs '{docs}', {said}"):
                play.docs_path("runs/r", None)


def test_convert_writes_only_jsonl_outside_hidden_folders(workspace):
    (workspace / "train.py").write_text("print('mine')\n")
    (workspace / ".git").mkdir()
    (workspace / "faq.md").write_text("# FAQ\n\n## What is ice?\n\nFrozen water.\n")
    c = client(workspace)
    for body, refusal in (({"to": "train.py"}, "to: convert writes .jsonl files, not train.py"),
                          ({"to": ".git/hooks/x.jsonl"}, "to: convert does not write into hidden files or folders"),
                          ({"to": ".studio/x.jsonl"}, "to: convert does not write into hidden files or folders"),
                          ({"to": ".x.jsonl"}, "to: convert does not write into hidden files or folders"),
                          ({"to": "x.jsonl", "cache": "train.py"},
                           "cache: convert writes .generator-cache.jsonl files, not train.py"),
                          ({"to": "x.jsonl", "cache": ".git/.x.generator-cache.jsonl"},
                           "cache: convert does not write into hidden files or folders")):
        r = c.post("/api/convert", json={"inputs": ["faq.md"], **body}, headers=WRITE)
        assert r.status_code == 400 and r.json()["error"].startswith(refusal), (body, r.text)
    assert (workspace / "train.py").read_text() == "print('mine')\n" and not any((workspace / ".git").iterdir())
    r = c.post("/api/convert", json={"inputs": ["faq.md"], "to": "out/x.jsonl",
                                     "cache": "out/.x.generator-cache.jsonl"}, headers=WRITE)
    assert r.status_code == 200 and r.json()["to"] == "out/x.jsonl", r.text


def test_workspace_resolve_keeps_inside_paths():
    ws = Workspace(Path(__file__).parent)
    assert ws.resolve("assets/qa8.jsonl") == QA8.resolve()
    assert ws.resolve("new/folder/file.jsonl") == ws.root / "new/folder/file.jsonl"
    assert ws.resolve("./assets/./qa8.jsonl") == QA8.resolve()


# -- uploads --------------------------------------------------------------------------------------
def test_upload_over_the_limit_is_413_and_leaves_nothing(workspace):
    c = client(workspace, max_upload_bytes=100)
    r = c.put("/api/files", params={"path": "up/big.jsonl"}, content=b"x" * 101, headers=WRITE)
    assert r.status_code == 413 and "larger than 100 bytes" in r.json()["error"]

    def chunks():  # no Content-Length: refused once the limit is passed
        for _ in range(10):
            yield b"y" * 30
    r = c.put("/api/files", params={"path": "up/big.jsonl"}, content=chunks(), headers=WRITE)
    assert r.status_code == 413
    assert not (workspace / "up" / "big.jsonl").exists() and not list(workspace.rglob("*.upload"))
    ok = c.put("/api/files", params={"path": "up/small.jsonl"}, content=b'{"text": "hi"}\n', headers=WRITE)
    assert ok.json() == {"path": "up/small.jsonl", "bytes": 15}
    assert (workspace / "up" / "small.jsonl").read_bytes() == b'{"text": "hi"}\n'


def test_a_body_announced_too_large_is_refused_before_it_is_read():
    from specialize.studio.guard import Guard

    async def app(scope, receive, send):
        raise AssertionError("the route ran")

    async def receive():
        raise AssertionError("the body was read")

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "PUT", "path": "/api/files", "query_string": b"path=x.jsonl",
             "headers": [(b"authorization", f"Bearer {TOKEN}".encode()), (b"content-length", b"1000000000")]}
    asyncio.run(Guard(app, TOKEN, "c", max_upload_bytes=100)(scope, receive, send))
    assert sent[0]["status"] == 413


def test_any_other_body_is_capped_while_it_streams(workspace):
    def chunks():  # a JSON body sent without Content-Length, past the 1 MiB cap of non-upload requests
        yield b'{"data": ["'
        for _ in range(40):
            yield b"a" * 32768
        yield b'"]}'
    r = client(workspace).post("/api/lint", content=chunks(), headers=WRITE)
    assert r.status_code == 413 and r.json()["error"] == "request body larger than 1,048,576 bytes"


def test_save_upload_stops_at_the_limit_and_leaves_nothing(tmp_path):
    async def chunks():
        for _ in range(5):
            yield b"z" * 40
    with pytest.raises(UserError, match="upload larger than the limit of 100 bytes"):
        asyncio.run(Workspace(tmp_path).save_upload("big.jsonl", chunks(), limit=100))
    assert list(tmp_path.iterdir()) == []


def test_bad_uploads_are_one_clear_error(workspace):
    c = client(workspace)
    r = c.put("/api/files", params={"path": "tool.sh"}, content=b"rm -rf /", headers=WRITE)
    assert r.status_code == 400 and "uploads are data files" in r.json()["error"]
    c.put("/api/files", params={"path": "bad.jsonl"}, content=b'{"question": "q?", "answer": null}\n', headers=WRITE)
    r = c.post("/api/lint", json={"data": ["bad.jsonl"]}, headers=WRITE)
    assert r.status_code == 400 and r.json()["error"] == "bad.jsonl:1: field 'answer': is null"
    r = c.post("/api/lint", content=b"not json", headers=WRITE)
    assert r.status_code == 400 and r.json()["error"] == "the request body is not JSON"


# -- data tab -------------------------------------------------------------------------------------
def test_lint_marks_trained_text_and_lists_findings_with_their_rows(workspace):
    rows = [json.loads(line) for line in QA8.read_text(encoding="utf-8").splitlines()]
    (workspace / "dup.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [rows[0], rows[1], rows[0]]))
    r = client(workspace).post("/api/lint", json={"data": ["dup.jsonl"]}, headers=WRITE).json()
    assert not r["ok"] and r["template"] == "qa"
    duplicate = next(f for f in r["findings"] if f["code"] == "duplicate")
    assert duplicate["sources"] == ["dup.jsonl:3 = dup.jsonl:1"]
    assert r["rows"]["dup.jsonl:3"][-1] == {"role": "assistant", "content": rows[0]["answer"]}
    first = r["examples"][0]
    assert first["source"] == "dup.jsonl:1"
    assert [text for text, trained in first["pieces"] if trained] == [rows[0]["answer"] + "<|endoftext|>"]


def test_preview_shows_the_first_rows(workspace):
    r = client(workspace).get("/api/files/preview", params={"path": "data/qa.jsonl"}).json()
    assert r["total"] == 8 and r["rows"][0]["line"] == 1 and "question" in r["rows"][0]["data"]


# -- the train form -------------------------------------------------------------------------------
def test_form_is_the_finetune_config(workspace):
    fields = {f["name"]: f for f in schema("finetune")}
    assert set(fields) == set(FinetuneConfig.model_fields) - {"progress"}
    assert fields["method"]["choices"] == ["auto", "full", "lora", "qlora"] and fields["method"]["default"] == "auto"
    assert fields["lora_rank"]["help"] == FinetuneConfig.model_fields["lora_rank"].description
    assert fields["data"]["kind"] == "list" and fields["packing"]["kind"] == "bool"


def test_form_values_become_the_cli_flags(workspace):
    _, flags = to_flags(Workspace(workspace), "finetune", {
        "base": "models/tiny", "data": ["data/qa.jsonl", "more.jsonl"], "out": "runs/a", "max_steps": 4,
        "packing": False, "learning_rate": 0.005, "method": "auto", "max_grad_norm": None})
    assert flags == ["--out", "runs/a", "--max-steps", "4", "--learning-rate", "0.005", "--max-grad-norm", "none",
                     "--no-packing", "--base", "models/tiny", "--data", "data/qa.jsonl", "--data", "more.jsonl",
                     "--no-progress"]  # method "auto" is the default: not passed
    _, flags = to_flags(Workspace(workspace), "compare", {"model": "runs/a", "data": ["data/qa.jsonl"],
                                                         "out": "runs/a/compare", "task": "qa", "docs": "docs"})
    assert flags == ["--model", "runs/a", "--data", "data/qa.jsonl", "--docs", "docs", "--out", "runs/a/compare"]
    with pytest.raises(UserError, match="max_steps: Input should be greater than 0"):
        to_flags(Workspace(workspace), "finetune", {"max_steps": 0})
    with pytest.raises(UserError, match="unknown field 'shell'"):
        to_flags(Workspace(workspace), "finetune", {"shell": "rm"})


@pytest.mark.parametrize("form, field", [("finetune", "retention"), ("finetune", "replay_data"),
                                         ("finetune", "eval_data"), ("finetune", "rag_docs"),
                                         ("compare", "predictions"), ("compare", "runs"), ("compare", "docs"),
                                         ("export", "model")])
def test_every_path_field_is_confined(workspace, form, field):
    """A file field is confined whether or not anyone listed it; NAME=PATH is checked after the `=`."""
    many = typing.get_origin(_strip_none(FORMS[form].model_fields[field].annotation)[0]) is list
    values = ["/etc/passwd", "../secret.jsonl"] + (["x=/etc/passwd", "x=../secret.jsonl"] if field in NAMED_PATHS else [])
    for value, refusal in zip(values, ["absolute paths", "'..'", "absolute paths", "'..'"], strict=False):
        fine = {"model": "runs/a", "data": ["data/qa.jsonl"]} if form == "compare" else {}
        r = client(workspace).post(f"/api/jobs/{form}", json={**fine, field: [value] if many else value},
                                   headers=WRITE)
        assert r.status_code == 400, (value, r.text)
        assert r.json()["error"].startswith(f"{field}: ") and refusal in r.json()["error"], r.text
    with pytest.raises(UserError, match="runs: absolute paths are not allowed"):
        to_flags(Workspace(workspace), "compare", {"model": "runs/a", "runs": ["sft=/etc"]})
    assert {f["name"] for f in schema("finetune") if f["path"]} >= {"retention", "replay_data", "base", "data"}
    assert not {f["name"] for f in schema("finetune") if f["path"]} & NOT_PATHS


def test_text_fields_that_are_not_paths_pass_as_they_are(workspace):
    _, flags = to_flags(Workspace(workspace), "finetune", {"data": ["data/qa.jsonl"], "reward": ["f1"],
                                                          "system_prompt": "Answer from /docs/faq.md only.",
                                                          "judge_url": "http://127.0.0.1:8000/v1"})
    assert "Answer from /docs/faq.md only." in flags and "http://127.0.0.1:8000/v1" in flags


# -- runs, read from their folders ----------------------------------------------------------------
def _fake_run(root: Path, name: str, steps: int, *, finished: bool, checkpoint: bool) -> Path:
    run = root / "runs" / name
    (run / "model").mkdir(parents=True)
    (run / ".specialize-run").write_text('{"kind": "finetune", "format": 1}')
    (run / "config.yaml").write_text(yaml.safe_dump({"out": f"runs/{name}", "base": "models/tiny", "method": "full",
                                                     "epochs": 2.0, "max_steps": None}))
    rows = [{"step": s, "epoch": s / 5, "loss": 2.0 / s, "tokens_per_s": 100.0 * s} for s in range(1, steps + 1)]
    rows.append({"step": steps, "eval_loss": 1.5, "eval_ppl": 4.48})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if checkpoint:
        (run / "checkpoints" / f"step-{steps}").mkdir(parents=True)
    if finished:
        (run / "train_summary.json").write_text(json.dumps({"steps": 10, "base": "models/tiny", "method": "full"}))
    return run


def test_runs_tab_reads_run_folders(workspace):
    _fake_run(workspace, "done", 10, finished=True, checkpoint=False)
    _fake_run(workspace, "halted", 3, finished=False, checkpoint=True)
    going = _fake_run(workspace, "going", 2, finished=False, checkpoint=False)
    (workspace / "runs" / "not-a-run").mkdir()
    lock = FileLock(str(going / ".lock"))
    lock.acquire()  # as a training process (from the CLI, or an earlier studio) holds it
    try:
        runs = {r["path"]: r for r in client(workspace).get("/api/runs").json()["runs"]}
    finally:
        lock.release()
    assert set(runs) == {"runs/done", "runs/halted", "runs/going"}
    assert runs["runs/done"] | {"modified": 0} == runs["runs/done"] | {
        "state": "finished", "step": 10, "total_steps": 10, "loss": 0.2, "eval_loss": 1.5, "tokens_per_s": 1000.0,
        "base": "models/tiny", "method": "full", "modified": 0}
    assert runs["runs/halted"]["state"] == "stopped" and runs["runs/halted"]["checkpoints"] == ["step-3"]
    assert runs["runs/halted"]["total_steps"] == 10  # 5 steps per epoch (step / epoch) x 2 epochs
    assert runs["runs/going"]["state"] == "running"


def test_metrics_arrive_incrementally(workspace):
    run = _fake_run(workspace, "live", 2, finished=False, checkpoint=False)
    c = client(workspace)
    first = c.get("/api/runs/metrics", params={"run": "runs/live"}).json()
    assert [r["step"] for r in first["rows"]] == [1, 2, 2]
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 0.5}) + "\n" + '{"step": 4, "lo')  # a row half written
    nxt = c.get("/api/runs/metrics", params={"run": "runs/live", "offset": first["offset"],
                                              "file_id": first["file_id"]}).json()
    assert nxt["rows"] == [{"step": 3, "loss": 0.5}] and not nxt["reset"]
    tmp = run / "metrics.new"  # a resumed run rewrites the file (atomically): the page starts afresh
    tmp.write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    os.replace(tmp, run / "metrics.jsonl")
    again = c.get("/api/runs/metrics", params={"run": "runs/live", "offset": nxt["offset"],
                                                "file_id": nxt["file_id"]}).json()
    assert again["reset"] and again["rows"] == [{"step": 1, "loss": 9.0}]
    assert c.get("/api/runs/metrics", params={"run": "data"}).status_code == 400


# -- the job queue --------------------------------------------------------------------------------
def test_jobs_queue_one_at_a_time_and_stop_with_sigterm(workspace, monkeypatch):
    # Stand-ins for `specialize finetune`: the queue is what is tested; the real run is in the e2e test.
    script = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(143)); "
              "print('started', flush=True); time.sleep(float(sys.argv[1])); sys.exit(int(sys.argv[2]))")
    monkeypatch.setattr("specialize.studio.jobs.Job.argv", property(lambda j: [sys.executable, "-c", script, *j.args]))
    queue = JobQueue(workspace, slots=1)
    try:
        long = queue.submit("finetune", ["60", "0"], "runs/a")
        crash = queue.submit("finetune", ["0", "3"], "runs/b")
        assert (long.state, crash.state) == ("running", "queued")
        assert queue.busy("runs/a") is long and queue.busy("runs/c") is None
        deadline = time.monotonic() + 20
        while "started" not in long.log_tail() and time.monotonic() < deadline:
            time.sleep(0.05)
        queue.stop(long.id)
        while crash.state in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (long.state, long.returncode) == ("stopped", 143)
        assert (crash.state, crash.returncode) == ("failed", 3)  # a crashing run is a failed job, nothing more
        assert long.log.parent == workspace / ".studio" / "logs" and "started" in long.log_tail()
    finally:
        queue.close(stop_running=True, timeout=10)


def test_stop_checkpoints_and_resume_finishes_the_run(workspace, tiny_llama, monkeypatch):
    """The real `specialize finetune` child: stopped from the studio (SIGTERM: a checkpoint, exit 143),
    then resumed from the Runs tab to the end."""
    import shutil

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    shutil.copytree(tiny_llama, workspace / "models" / "tiny")
    c = client(workspace)
    queue = c.app.state.queue
    try:
        job = c.post("/api/jobs/finetune", headers=WRITE, json={
            "base": "models/tiny", "data": ["data/qa.jsonl"], "out": "runs/s", "max_steps": 200,
            "micro_batch_size": 2, "save_every": 1000, "learning_rate": 0.005}).json()
        assert job["command"] == ("specialize finetune --out runs/s --max-steps 200 --learning-rate 0.005 "
                                  "--micro-batch-size 2 --save-every 1000 --base models/tiny --data data/qa.jsonl "
                                  "--no-progress")
        deadline = time.monotonic() + 120
        rows: list = []
        while not rows and time.monotonic() < deadline:  # training has begun
            time.sleep(0.2)
            rows = c.get("/api/runs/metrics", params={"run": "runs/s"}).json()["rows"] \
                if (workspace / "runs" / "s" / "metrics.jsonl").exists() else []
        assert c.post(f"/api/jobs/{job['id']}/stop", headers=WRITE).status_code == 200
        while queue.jobs[job["id"]].state == "running" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (queue.jobs[job["id"]].state, queue.jobs[job["id"]].returncode) == ("stopped", 143)
        run = {r["path"]: r for r in c.get("/api/runs").json()["runs"]}["runs/s"]
        assert run["state"] == "stopped" and run["checkpoints"] == [f"step-{run['step']}"] and run["step"] < 200

        resumed = c.post("/api/runs/resume", json={"run": "runs/s"}, headers=WRITE).json()
        assert resumed["command"] == ("specialize finetune --config runs/s/config.yaml --out runs/s --resume "
                                      "--no-progress")
        while queue.jobs[resumed["id"]].state in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert queue.jobs[resumed["id"]].state == "done", queue.jobs[resumed["id"]].log_tail()
        run = {r["path"]: r for r in c.get("/api/runs").json()["runs"]}["runs/s"]
        assert (run["state"], run["step"], run["total_steps"]) == ("finished", 200, 200)
        assert "resuming from runs/s/checkpoints/step-" in queue.jobs[resumed["id"]].log_tail()
    finally:
        queue.close(stop_running=True, timeout=30)
