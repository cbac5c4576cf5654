"""The studio's routes: the page, its static files, and the JSON API each tab calls.

    GET  /                          the page (static/index.html); static/* its script and style
    GET  /api/files                 data files in the workspace; PUT /api/files?path= uploads one
    GET  /api/files/preview?path=   the first rows of a file
    POST /api/lint, /api/convert    the Data tab
    GET  /api/forms/{finetune|compare|export}   form fields from the config model
    POST /api/jobs/{kind}           queue `specialize finetune|compare|export` with the form's values
    GET  /api/jobs, /api/jobs/{id}/log;  POST /api/jobs/{id}/stop
    GET  /api/runs, /api/runs/metrics?run=&offset=, /api/runs/scorecard?run=, /api/runs/report?run=
    POST /api/runs/resume           the same command again, with --resume
    GET  /api/exports/info?path=    what an export wrote (parity, Ollama name)
    POST /api/chat                  one answer, streamed as NDJSON (playground.py)

Every request passes `guard.Guard` first (token, cross-site checks, body caps); every path
passes `Workspace.resolve`. A user error is a 400 with `{"error": message}`.
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from specialize.config import ConvertConfig, LintConfig, StudioConfig
from specialize.errors import UserError
from specialize.rundir import RunDir
from specialize.studio.forms import FORMS, schema, to_flags
from specialize.studio.guard import Guard
from specialize.studio.jobs import JobQueue
from specialize.studio.playground import Playground
from specialize.studio.runs import (
    find_runs,
    read_metrics_from,
    scorecard_path,
    summarise,
)
from specialize.studio.workspace import UploadTooLarge, Workspace

STATIC = Path(str(resources.files("specialize.studio") / "static"))
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml",
                ".png": "image/png"}
# report.html is compare's own self-contained page (inline style and SVG, no script): shown in
# an iframe, sandboxed, so nothing in it can act as the studio.
REPORT_CSP = "sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'self'"


def cookie_name(cfg: StudioConfig) -> str:
    return f"specialize-studio-{cfg.port}"  # cookies ignore ports: two studios keep theirs apart


def _run(workspace: Workspace, name: str) -> RunDir:
    path = workspace.resolve(name, must_exist=True)
    if not RunDir.is_run(path):
        raise UserError(f"{name} is not a run folder")
    return RunDir(path)


async def _json(request: Request) -> dict:
    body = await request.body()
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        raise UserError("the request body is not JSON") from None
    if not isinstance(value, dict):
        raise UserError("the request body must be a JSON object")
    return value


def _config(cls, values: dict):
    """A stage config from the page's values; a bad one is one line naming the field."""
    try:
        return cls(**values)
    except ValidationError as e:
        err = e.errors()[0]
        raise UserError(f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def create_app(cfg: StudioConfig, token: str) -> FastAPI:
    """The studio app over `cfg.workspace`, requiring `token`."""
    workspace = Workspace(cfg.workspace)
    queue = JobQueue(workspace.root, cfg.jobs)
    playground = Playground(workspace)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        still = queue.close(stop_running=False)
        for job in still:
            print(f"still running (see it in the next studio's Runs tab): {job.to_json()['command']}")

    app = FastAPI(title="specialize studio", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.queue, app.state.workspace = queue, workspace

    @app.exception_handler(UserError)
    async def user_error(request: Request, e: UserError):
        status = 413 if isinstance(e, UploadTooLarge) else 400
        return JSONResponse({"error": str(e).replace(str(workspace.root) + "/", "")}, status_code=status)

    # -- page -------------------------------------------------------------------------------------
    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}")
    async def static(name: str):
        path = STATIC / name
        if "/" in name or path.suffix not in STATIC_TYPES or not path.is_file():
            return JSONResponse({"error": "not found"}, status_code=404)
        return FileResponse(path, media_type=STATIC_TYPES[path.suffix])

    # -- data -------------------------------------------------------------------------------------
    @app.get("/api/files")
    async def files():
        return {"workspace": str(workspace.root), "files": await run_in_threadpool(workspace.files),
                "max_upload_bytes": cfg.max_upload_bytes}

    @app.put("/api/files")
    async def upload(request: Request, path: str):
        saved = await workspace.save_upload(path, request.stream(), cfg.max_upload_bytes)
        return {"path": workspace.relative(saved), "bytes": saved.stat().st_size}

    @app.get("/api/files/preview")
    async def preview(path: str):
        from specialize.studio.data import preview as rows

        return await run_in_threadpool(rows, workspace, path)

    @app.post("/api/lint")
    async def lint(request: Request):
        from specialize.studio.data import lint_json

        values = await _json(request)
        return await run_in_threadpool(lint_json, workspace, _config(LintConfig, values))

    @app.post("/api/convert")
    async def convert(request: Request):
        from specialize.studio.data import convert_json

        values = await _json(request)
        return await run_in_threadpool(convert_json, workspace, _config(ConvertConfig, values))

    # -- jobs -------------------------------------------------------------------------------------
    @app.get("/api/forms/{name}")
    async def form(name: str):
        if name not in FORMS:
            return JSONResponse({"error": f"no form {name}"}, status_code=404)
        return {"name": name, "fields": schema(name)}

    @app.post("/api/jobs/{kind}")
    async def submit(kind: str, request: Request):
        if kind not in FORMS:
            return JSONResponse({"error": f"no job kind {kind}"}, status_code=404)
        job_cfg, flags = to_flags(workspace, kind, await _json(request))
        target = workspace.relative(workspace.resolve(str(job_cfg.out)))
        if queue.busy(target):
            raise UserError(f"{target} is already being written by a queued or running job")
        return queue.submit(kind, flags, target).to_json()

    @app.get("/api/jobs")
    async def jobs():
        return {"jobs": queue.list()}

    @app.get("/api/jobs/{job_id}/log")
    async def job_log(job_id: str):
        if job_id not in queue.jobs:
            return JSONResponse({"error": "no such job"}, status_code=404)
        job = queue.jobs[job_id]
        return {"job": job.to_json(), "log": job.log_tail()}

    @app.post("/api/jobs/{job_id}/stop")
    async def stop(job_id: str):
        if job_id not in queue.jobs:
            return JSONResponse({"error": "no such job"}, status_code=404)
        return queue.stop(job_id).to_json()

    # -- runs -------------------------------------------------------------------------------------
    @app.get("/api/runs")
    async def runs():
        def collect():
            found = [summarise(run, workspace) for run in find_runs(workspace)]
            return sorted(found, key=lambda r: -r["modified"])
        return {"runs": await run_in_threadpool(collect)}

    @app.get("/api/runs/metrics")
    async def metrics(run: str, offset: int = 0, file_id: str | None = None):
        found = _run(workspace, run)
        return read_metrics_from(found, max(0, offset), file_id) | {"run": summarise(found, workspace)}

    @app.post("/api/runs/resume")
    async def resume(request: Request):
        name = str((await _json(request)).get("run", ""))
        found = _run(workspace, name)
        target = workspace.relative(found.path)
        if queue.busy(target):
            raise UserError(f"{target} is already queued or running")
        verb = "pretrain" if "size" in found.read_config() and "base" not in found.read_config() else "finetune"
        flags = ["--config", f"{target}/config.yaml", "--out", target, "--resume", "--no-progress"]
        return queue.submit(verb, flags, target).to_json()

    @app.get("/api/runs/scorecard")
    async def scorecard(run: str):
        card = scorecard_path(_run(workspace, run))
        if card is None:
            return JSONResponse({"error": f"{run} has no comparison yet"}, status_code=404)
        return json.loads(card.read_text(encoding="utf-8"))

    @app.get("/api/runs/report")
    async def report(run: str):
        card = scorecard_path(_run(workspace, run))
        html = card.with_name("report.html") if card is not None else None
        if html is None or not html.is_file():
            return Response("no report yet", status_code=404, media_type="text/plain")
        return Response(html.read_bytes(), media_type="text/html",
                        headers={"content-security-policy": REPORT_CSP})

    @app.get("/api/exports/info")
    async def export_info(path: str):
        from specialize.export import MARKER

        marker = workspace.resolve(path) / MARKER
        if not marker.is_file():
            return JSONResponse({"error": f"{path} holds no finished export"}, status_code=404)
        return {"path": path, "info": json.loads(marker.read_text(encoding="utf-8"))}

    # -- playground -------------------------------------------------------------------------------
    @app.post("/api/chat")
    async def chat(request: Request):
        body = await _json(request)
        return StreamingResponse(playground.stream(body), media_type="application/x-ndjson")

    # Added last, so it is the outermost: nothing runs before the token check.
    app.add_middleware(Guard, token=token, cookie=cookie_name(cfg), max_upload_bytes=cfg.max_upload_bytes)
    return app
