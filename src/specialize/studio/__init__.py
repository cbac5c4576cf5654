"""`specialize studio`: the whole life cycle in the browser, over one workspace folder.

    specialize studio --workspace ~/faq-project        # prints http://127.0.0.1:7860/?token=...

Tabs: Data (pick or upload files, convert, preview rows, lint: trained tokens marked, findings
with their rows), Train (the finetune form from `FinetuneConfig`; runs queue as child
processes; live loss, eval loss, tokens/s; stop and resume), Runs (every run folder in the
workspace), Compare (`specialize compare`, its scorecard, report and recommendation),
Playground (a run, its base and the run with RAG, side by side, streamed) and Export.

    workspace.py   paths from the browser: relative, inside the workspace, no `..`, no symlink out
    guard.py       the token on every request, cross-site refusals, body caps
    forms.py       config model -> form fields; form values -> CLI flags
    jobs.py        the queue of `specialize finetune|compare|export` child processes
    runs.py        run folders -> the Runs tab (config, metrics, summary, lock, scorecard)
    data.py        preview, lint and convert as JSON
    playground.py  streamed answers with the `chat`/`serve` generation code
    app.py         the routes
    static/        the page: hand-written HTML, CSS and JS (SVG charts), nothing from a CDN
"""

from __future__ import annotations

import os
import secrets
import socket

from specialize.config import StudioConfig
from specialize.errors import UserError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def resolve_token(cfg: StudioConfig) -> str:
    """--token, else SPECIALIZE_TOKEN, else a fresh random one (printed in the URL)."""
    token = cfg.token or os.environ.get("SPECIALIZE_TOKEN") or secrets.token_urlsafe(24)
    if len(token) < 8:
        raise UserError("the studio token must have at least 8 characters", field="token")
    return token


def studio(cfg: StudioConfig) -> None:
    """Serve the studio until Ctrl-C; runs it started keep going and are found by the next studio."""
    import uvicorn

    from specialize.studio.app import create_app

    token = resolve_token(cfg)
    if cfg.token and os.environ.get("SPECIALIZE_TOKEN") != cfg.token:
        print("warning: a token given as --token is visible to other users in `ps` and stays in your shell "
              "history; prefer the SPECIALIZE_TOKEN environment variable", flush=True)
    try:  # bind first, so a busy port is one clear line rather than a uvicorn traceback
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        sock = socket.create_server((cfg.host, cfg.port), family=family)
    except OSError as e:
        raise UserError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    app = create_app(cfg, token)
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    if cfg.host not in LOCAL_HOSTS:
        print(f"warning: listening on {cfg.host}: anyone who can reach this machine and has the token can "
              "train, read and write files in the workspace", flush=True)
    print(f"specialize studio over {app.state.workspace.root}\n"
          f"open http://{host}:{cfg.port}/?token={token}\n(Ctrl-C stops the studio; runs it started keep going)",
          flush=True)
    server = uvicorn.Server(uvicorn.Config(app, ws="none", access_log=False,
                                           log_level="info" if cfg.progress else "warning"))
    server.run(sockets=[sock])
