"""The server: a Starlette app over the workers, and `run` (uvicorn).

Safety, as llama-server and Ollama learned it: a loopback bind by default, and there requests whose Host is
not a loopback name are refused (DNS rebinding); with an API key every endpoint but /health and the page
needs `Authorization: Bearer KEY` (or `X-Api-Key`); no CORS headers unless origins are named; bodies,
images and max_tokens are bounded; bad input is a 4xx with an error object, never a traceback or a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import signal
import socket
import sys
import time
from importlib import resources
from pathlib import Path

from ..engine import EngineError
from ..images import ImageError
from ..modelfile import describe
from . import ollama_api, openai_api
from .config import LOOPBACK_HOSTS, ServerConfig
from .requests import RequestError, ollama_job, openai_job, served
from .workers import Busy, Workers

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PUBLIC = ("/health", "/", "/examples")  # no key needed: liveness, the page and its example images
RETRY_AFTER_S = 5


def _error(path: str, err: RequestError):
    """The error object clients of that API parse: Ollama's {"error": "..."} or OpenAI's."""
    from starlette.responses import JSONResponse

    body = {"error": str(err)} if path.startswith("/api/") else err.openai()
    headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status == 503 else None
    return JSONResponse(body, status_code=err.status, headers=headers)


class Guard:
    """ASGI middleware: the Host check, the API key and the body size, before any route runs."""

    def __init__(self, app, cfg: ServerConfig):
        self.app, self.cfg = app, cfg
        self.key = (cfg.api_key or "").encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        problem = self._problem(headers, path)
        if problem is not None:
            return await _error(path, problem)(scope, receive, send)
        await self.app(scope, receive, send)

    def _problem(self, headers: dict, path: str) -> RequestError | None:
        if self.cfg.loopback:
            host = headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]")[0]
            if name not in LOOPBACK_HOSTS:
                return RequestError(f"Host {host!r} is not this machine: on a loopback address the server answers "
                                    "only localhost names (a guard against DNS rebinding)", 403, code="forbidden_host")
        if self.key and path not in PUBLIC and not path.startswith("/examples/"):
            auth = headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), self.key):
                return RequestError("invalid or missing API key (Authorization: Bearer KEY, or X-Api-Key)", 401,
                                    code="invalid_api_key", kind="authentication_error")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.cfg.max_body_bytes):
            return RequestError(f"the request body is over the limit of {self.cfg.max_body_bytes:,} bytes", 413,
                                code="body_too_large")
        return None


async def _json_body(request, limit: int):
    """The body as JSON, read up to `limit` bytes (a chunked body has no Content-Length to check first)."""
    data = bytearray()
    async for piece in request.stream():
        data += piece
        if len(data) > limit:
            raise RequestError(f"the request body is over the limit of {limit:,} bytes", 413, code="body_too_large")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"the body is not valid JSON ({e})") from None


async def _first(events):
    """The search's first event; its errors before anything was sent become the request's answer."""
    try:
        return await anext(events)
    except Busy:
        raise RequestError(f"all workers are busy and the queue is full; retry in {RETRY_AFTER_S} s", 503,
                           code="server_busy", kind="server_error") from None
    except (ValueError, ImageError) as e:
        raise RequestError(str(e)) from None


async def _result(events, first, request):
    """The search's result (non-streamed), or None when the client left first (the search is then cancelled)."""
    async def last():
        ev = first
        while ev.kind != "done":
            ev = await anext(events)
        return ev.data["result"]

    task = asyncio.ensure_future(last())
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await events.aclose()
            return None


async def _guarded_stream(body, path: str):
    """A stream that reports a failure after its start in-band (an SSE error event, or an Ollama error line)."""
    try:
        async for piece in body:
            yield piece
    except (EngineError, ValueError) as e:
        if path.startswith("/api/"):
            yield json.dumps({"error": str(e)}) + "\n"
        else:
            yield f"data: {json.dumps(RequestError(str(e), 500, kind='server_error').openai())}\n\n"
            yield "data: [DONE]\n\n"


def create_app(cfg: ServerConfig, workers: Workers):
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.responses import (
        FileResponse,
        HTMLResponse,
        JSONResponse,
        Response,
        StreamingResponse,
    )
    from starlette.routing import Route

    ids = (cfg.model_id, Path(cfg.model).name, Path(cfg.model).stem)
    created = int(os.stat(cfg.model).st_mtime)
    info = describe(cfg.mmproj or cfg.model)
    family = info.family or describe(cfg.model).architecture
    quant = max(describe(cfg.model).tensor_types.items(), key=lambda kv: kv[1])[0]
    examples = _examples()
    page = resources.files("llavao1_edge.server").joinpath("page.html").read_text(encoding="utf-8")

    async def health(request):
        return JSONResponse({"status": "ok", "model": cfg.model_id, "parallel": len(workers.engines),
                             "busy": workers.busy, "waiting": workers.waiting})

    async def index(request):
        return HTMLResponse(page)

    async def example_list(request):
        return JSONResponse([{"image": f"/examples/{name}", "question": q} for name, q in examples.items()])

    async def example_image(request):
        name = request.path_params["name"]
        if name not in examples:
            raise RequestError(f"no example image {name!r}", 404, code="not_found")
        return FileResponse(EXAMPLES / "images" / name)

    async def list_models(request):
        return JSONResponse(openai_api.models(cfg.model_id, created))

    async def chat(request, make_job, api):
        """A chat request of either API: validated into a job, searched, answered whole or streamed."""
        started = time.perf_counter()
        body = await _json_body(request, cfg.max_body_bytes)
        job = await run_in_threadpool(make_job, body, cfg, ids, workers.has_vision, workers.max_candidates)
        events = workers.run(job, api.wanted(job))
        first = await _first(events)
        model = job.options["model"]
        if job.options["stream"]:
            return StreamingResponse(_guarded_stream(api.stream(job, events, first, model, started), request.url.path),
                                     media_type=api.MEDIA_TYPE, headers={"Cache-Control": "no-cache"})
        result = await _result(events, first, request)
        return JSONResponse(api.reply(job, result, model, started)) if result else Response(status_code=499)

    async def chat_completions(request):
        return await chat(request, openai_job, openai_api)

    async def ollama_chat(request):
        return await chat(request, ollama_job, ollama_api)

    async def ollama_tags(request):
        return JSONResponse(ollama_api.tags(cfg.model_id, cfg.model, family, quant))

    async def ollama_show(request):
        body = await _json_body(request, cfg.max_body_bytes)
        name = body.get("model", body.get("name")) if isinstance(body, dict) else None
        if not served(name, ids):
            raise RequestError(f"model {name!r} not found; this server serves {cfg.model_id!r}", 404,
                               code="model_not_found")
        return JSONResponse(ollama_api.show(cfg.model_id, family, quant, workers.has_vision))

    async def ollama_version(request):
        return JSONResponse(ollama_api.version())

    async def request_error(request, exc: RequestError):
        return _error(request.url.path, exc)

    async def http_error(request, exc: HTTPException):
        kinds = {404: ("not_found", f"no route {request.method} {request.url.path}"),
                 405: ("method_not_allowed", f"{request.method} is not allowed on {request.url.path}")}
        code, message = kinds.get(exc.status_code, ("http_error", exc.detail))
        return _error(request.url.path, RequestError(message, exc.status_code, code=code))

    async def server_error(request, exc: Exception):  # a bug, never a user's mistake: say so without a traceback
        print(f"llavao1-edge serve: {type(exc).__name__}: {exc}", file=sys.stderr)
        return _error(request.url.path, RequestError(f"internal error: {type(exc).__name__}", 500,
                                                     kind="server_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await workers.start()
        yield

    routes = [
        Route("/health", health), Route("/", index), Route("/examples", example_list),
        Route("/examples/{name}", example_image), Route("/v1/models", list_models),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/api/chat", ollama_chat, methods=["POST"]), Route("/api/tags", ollama_tags),
        Route("/api/show", ollama_show, methods=["POST"]),
        Route("/api/version", ollama_version),
    ]
    middleware = [Middleware(Guard, cfg=cfg)]
    if cfg.cors_origins:  # outside the key check: a browser's preflight carries no key
        middleware.insert(0, Middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins),
                                        allow_methods=["GET", "POST", "OPTIONS"],
                                        allow_headers=["Authorization", "Content-Type", "X-Api-Key"]))
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                     exception_handlers={RequestError: request_error, HTTPException: http_error,
                                         Exception: server_error})


def _examples() -> dict[str, str]:
    """The shipped example images and their questions, for the page."""
    out = {}
    with open(EXAMPLES / "questions.jsonl", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            out[Path(rec["image"]).name] = rec["conversations"][0]["value"].replace("<image>", "").strip()
    return out


def run(cfg: ServerConfig, ready=lambda url: None) -> int:
    """Load the model, listen, serve until Ctrl-C or SIGTERM (in-flight searches are cancelled and answered),
    then free the native memory."""
    import uvicorn

    try:
        sock = socket.create_server((cfg.host, cfg.port), family=socket.AF_INET6 if ":" in cfg.host else
                                    socket.AF_INET, reuse_port=False)
    except OSError as e:
        raise OSError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    workers = Workers(cfg)
    try:
        app = create_app(cfg, workers)
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, access_log=False)

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                """Cancel the searches (their requests end at once), then shut down; unlike uvicorn's own, the
                signal is not raised again afterwards, so the native memory is freed and the exit code is 0."""
                workers.cancel_all()
                if self.should_exit and sig == signal.SIGINT:
                    self.force_exit = True  # a second Ctrl-C: stop waiting for connections
                self.should_exit = True

        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        ready(f"http://{host}:{sock.getsockname()[1]}")
        Server(config).run(sockets=[sock])
    finally:
        workers.close()
        sock.close()
    print("llavao1-edge serve: stopped", file=sys.stderr)
    return 0

