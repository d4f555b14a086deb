"""The rater page as an ASGI app (FastAPI), served by uvicorn on the loopback address unless told otherwise.

Routes: ``GET /`` the page; ``GET /api/me`` the rater and their progress; ``POST /api/raters`` ``{"name": ...}``
registers (the id goes into the ``wurst_rater`` cookie; API clients may send it as ``X-Rater`` instead);
``GET /api/next`` the next pair (``{"showing", "prompt", "left", "right", "done", "total"}`` or ``{"finished": true}``);
``POST /api/vote`` ``{"showing", "choice"}``; ``GET /images/<sha256>.png``; ``GET /api/health``.

Refusals: every bad request gets a 4xx with ``{"error": message}`` and writes nothing (the service validates before
its transaction): 400 malformed body, 401 no or unknown rater, 404 unknown showing or image, 405 wrong method,
409 a showing answered differently before, 413 a body over ``MAX_BODY`` bytes, 422 invalid fields. A vote is
committed to the database before its 200 is sent. A busy database answers 503 (retry), never a lost write.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .page import page
from .service import StudyError, StudyService

COOKIE = "wurst_rater"
HEADER = "x-rater"
MAX_BODY = 16 * 1024  # bytes: a vote is well under 200
DB_ENV = "WURST_STUDY_DB"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class BodyLimit:
    """ASGI middleware: read a request's body up to ``limit`` bytes before the app sees it; a larger one (declared
    or streamed) is answered 413 and never reaches the app."""

    def __init__(self, app: Any, limit: int = MAX_BODY) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._refuse(send, 413 if declared.isdigit() else 400)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._refuse(send, 413)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any, status: int) -> None:
        message = (f"request body over {self.limit} bytes" if status == 413 else "malformed Content-Length")
        payload = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


async def _json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        raise StudyError("malformed JSON body") from None
    if not isinstance(data, dict):
        raise StudyError("the body must be a JSON object")
    return data


def _rater_id(request: Request) -> str | None:
    return request.cookies.get(COOKIE) or request.headers.get(HEADER)


def create_app(db: str | os.PathLike, title: str = "Which image do you prefer?") -> Any:
    """The ASGI app of one study database (checked now: a missing or foreign file fails here, not per request)."""
    service = StudyService(db)
    app = FastAPI(title="wurst study", docs_url=None, redoc_url=None, openapi_url=None)
    html = page(title)

    @app.exception_handler(StudyError)
    async def _study_error(request: Request, e: StudyError) -> JSONResponse:
        return _error(e.status, str(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid request")

    @app.exception_handler(sqlite3.OperationalError)
    async def _busy(request: Request, e: sqlite3.OperationalError) -> JSONResponse:
        response = _error(503, "the study database is busy; try again")
        response.headers["Retry-After"] = "1"
        return response

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "items": service.total}

    @app.get("/api/me")
    async def me(request: Request) -> dict[str, Any]:
        rater = await run_in_threadpool(service.rater, _rater_id(request))
        done, total = await run_in_threadpool(service.progress, rater.rater_id)
        return {"rater": rater.rater_id, "name": rater.name, "done": done, "total": total}

    @app.post("/api/raters")
    async def register(request: Request) -> JSONResponse:
        data = await _json(request)
        rater = await run_in_threadpool(service.register, data.get("name"), data.get("simulated", False))
        done, total = await run_in_threadpool(service.progress, rater.rater_id)
        response = JSONResponse({"rater": rater.rater_id, "name": rater.name, "done": done, "total": total})
        response.set_cookie(COOKIE, rater.rater_id, max_age=365 * 24 * 3600, httponly=True, samesite="strict")
        return response

    @app.get("/api/next")
    async def next_pair(request: Request) -> dict[str, Any]:
        rater_id = _rater_id(request)
        showing = await run_in_threadpool(service.next, rater_id)
        if showing is None:
            done, total = await run_in_threadpool(service.progress, rater_id)
            return {"finished": True, "done": done, "total": total}
        return showing.public()

    @app.post("/api/vote")
    async def vote(request: Request) -> dict[str, Any]:
        data = await _json(request)
        ack = await run_in_threadpool(service.vote, _rater_id(request), data.get("showing"), data.get("choice"))
        return {"ok": True, "showing": ack.showing_id, "choice": ack.choice, "duplicate": ack.duplicate,
                "done": ack.done, "total": ack.total}

    @app.get("/images/{name}")
    async def image(name: str) -> FileResponse:
        path = await run_in_threadpool(service.image, name)
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})

    return BodyLimit(app)


def app_from_env() -> Any:
    """``uvicorn --factory wurst_core.human.server:app_from_env`` with the database in ``WURST_STUDY_DB``."""
    db = os.environ.get(DB_ENV)
    if not db:
        raise RuntimeError(f"set {DB_ENV} to the study database")
    return create_app(db)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(db: str | os.PathLike, host: str = "127.0.0.1", port: int = 8765, log_level: str = "warning") -> None:
    """Serve the rater page until interrupted (the database is checked before the port is opened)."""
    app = create_app(db)
    if not is_loopback(host):
        print(f"note: serving on {host}, reachable from other machines; the page has no login of its own",
              file=sys.stderr)
    print(f"rating page for {Path(db).resolve()} at http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def spawn(db: str | os.PathLike, port: int | None = None, command: Sequence[str] | None = None,
          timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start the server in a child process on the loopback address and wait until it answers; returns the process
    and its URL. ``command``: the argv to run (default: uvicorn on :func:`app_from_env`), ``{port}`` filled in."""
    port = port or free_port()
    argv = [a.format(port=port) for a in (command or [
        sys.executable, "-m", "uvicorn", "--factory", "wurst_core.human.server:app_from_env", "--host", "127.0.0.1",
        "--port", "{port}", "--log-level", "warning", "--no-access-log"])]
    proc = subprocess.Popen(argv, env={**os.environ, DB_ENV: str(Path(db).resolve())}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stdout.read().decode()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return proc, url
        time.sleep(0.2)
    stop(proc)
    raise TimeoutError(f"the server did not answer within {timeout:.0f} s")


def stop(proc: subprocess.Popen, kill: bool = False) -> None:
    """End a spawned server (SIGTERM, or SIGKILL with ``kill``) and wait for it."""
    if proc.poll() is None:
        proc.kill() if kill else proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
    if proc.stdout is not None:
        proc.stdout.close()


@contextlib.contextmanager
def running(db: str | os.PathLike, **kwargs: Any) -> Iterator[str]:
    """A spawned server for the block's duration (its URL), stopped however the block ends."""
    proc, url = spawn(db, **kwargs)
    try:
        yield url
    finally:
        stop(proc)
