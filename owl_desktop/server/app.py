"""The ASGI app: routes of both dialects over one ModelHost, behind the access log, CORS and the guard.

Every chat request goes the same way: body (capped) → JSON → the dialect's parser (off the event loop: base64 and
URL fetches) → model check → a Job in the engine queue (503 when full or loading) → wait for the prompt to be built
(errors up to here are plain HTTP errors) → the answer, streamed or whole. A client that goes away at any point
cancels its job.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from owl_desktop.app.engine_queue import QueueFull
from owl_desktop.errors import OwlError
from owl_desktop.server import models, ollama_api, openai_api
from owl_desktop.server.access_log import AccessLog
from owl_desktop.server.config import ServerConfig
from owl_desktop.server.errors import INTERNAL, ApiError, from_owl_error
from owl_desktop.server.guard import Guard, error_payload, parse_json, read_body
from owl_desktop.server.host import ModelHost
from owl_desktop.server.images import from_url
from owl_desktop.server.jobs import Done, Failed, Job, JobResult, Piece, Ready
from owl_desktop.server.requests import ChatRequest

log = logging.getLogger(__name__)

T = TypeVar("T")
RETRY_BUSY_S = 2
RETRY_LOADING_S = 5


@dataclass
class ServerState:
    """What the runner needs to reach: the jobs in flight (cancelled when the server stops)."""

    jobs: set[Job] = field(default_factory=set)

    def add(self, job: Job) -> None:
        self.jobs = {j for j in self.jobs if not j.finished} | {job}

    def cancel_all(self) -> None:
        for job in list(self.jobs):
            job.cancel()


class ClientGone(Exception):
    """The client disconnected; its job was cancelled."""


def error_response(path: str, err: ApiError) -> Response:
    return JSONResponse(error_payload(path, err), status_code=err.status, headers=err.headers)


def endpoint(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Errors become bodies in the path's dialect; anything unexpected is logged and answered 500 without details."""

    async def wrapped(request: Request) -> Response:
        path = request.url.path
        try:
            return await fn(request)
        except ApiError as exc:
            return error_response(path, exc)
        except ClientGone:
            return Response(status_code=499)
        except OwlError as exc:
            return error_response(path, from_owl_error(exc))
        except Exception:  # noqa: BLE001
            log.exception("%s %s failed", request.method, path)
            return error_response(path, ApiError(500, INTERNAL))

    return wrapped


def create_app(host: ModelHost, config: ServerConfig, state: ServerState | None = None) -> Starlette:
    state = state or ServerState()
    api = _Api(host, config, state)
    routes = [
        Route("/", api.root, methods=["GET"]),
        Route("/v1/models", endpoint(api.openai_models), methods=["GET"]),
        Route("/v1/models/{model_id:path}", endpoint(api.openai_model), methods=["GET"]),
        Route("/v1/chat/completions", endpoint(api.openai_chat), methods=["POST"]),
        Route("/api/version", endpoint(api.ollama_version), methods=["GET"]),
        Route("/api/tags", endpoint(api.ollama_tags), methods=["GET"]),
        Route("/api/ps", endpoint(api.ollama_ps), methods=["GET"]),
        Route("/api/show", endpoint(api.ollama_show), methods=["POST"]),
        Route("/api/chat", endpoint(api.ollama_chat), methods=["POST"]),
        Route("/api/generate", endpoint(api.ollama_generate), methods=["POST"]),
    ]
    middleware = [Middleware(AccessLog)]
    if config.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(config.cors_origins),
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["*"],
                max_age=600,
            )
        )
    middleware.append(Middleware(Guard, config=config))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = "no such endpoint" if exc.status_code == 404 else exc.detail
        return error_response(request.url.path, ApiError(exc.status_code, str(message)))

    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: http_error})


class _Api:
    def __init__(self, host: ModelHost, config: ServerConfig, state: ServerState) -> None:
        self.host = host
        self.config = config
        self.state = state

    # ---------------------------------------------------------------- shared steps

    async def _chat_request(self, request: Request, parse: Callable[[Any], ChatRequest]) -> ChatRequest:
        body = parse_json(await read_body(request, self.config.max_body_bytes))
        chat = await run_in_threadpool(parse, body)
        return replace(chat, model=self._model(chat.model))

    def _model(self, requested: str | None) -> str | None:
        """The loaded model's id if the request may use it; 503 while the model loads."""
        if self.host.loading:
            raise ApiError(503, "the model is still loading", headers={"Retry-After": str(RETRY_LOADING_S)})
        if self.host.pipeline is None:
            raise ApiError(
                503, "no model is loaded; load one in owl-desktop", headers={"Retry-After": str(RETRY_LOADING_S)}
            )
        return models.choose(self.host, requested)

    def _start(self, chat: ChatRequest) -> Job:
        try:
            job = Job(self.host, chat)
        except QueueFull as exc:
            raise ApiError(
                503, f"{exc.message}; try again shortly", headers={"Retry-After": str(RETRY_BUSY_S)}
            ) from None
        self.state.add(job)
        job.start()
        return job

    async def _until_ready(self, request: Request, job: Job) -> str:
        """Wait for the prompt to be built (the model id), watching for the client to leave."""
        event = await _or_disconnect(request, job, job.next())
        if isinstance(event, Failed):
            raise event.error
        assert isinstance(event, Ready)
        return event.model

    async def _result(self, request: Request, job: Job) -> JobResult:
        return await _or_disconnect(request, job, _collect(job))

    async def _stream(self, job: Job) -> AsyncIterator[Any]:
        """The job's events until its end; cancelled (client gone, server stopping) ends the job too."""
        try:
            while True:
                event = await job.next()
                yield event
                if isinstance(event, (Done, Failed)):
                    return
        finally:
            job.cancel()  # a no-op when the job ended

    # ---------------------------------------------------------------- routes

    async def root(self, request: Request) -> Response:
        return PlainTextResponse("owl-desktop is running")

    async def openai_models(self, request: Request) -> Response:
        return JSONResponse(openai_api.model_list(models.available(self.host)))

    async def openai_model(self, request: Request) -> Response:
        return JSONResponse(openai_api.model_entry(models.find(self.host, request.path_params["model_id"])))

    async def openai_chat(self, request: Request) -> Response:
        def read_image(url: str, label: str) -> Any:
            return from_url(url, label, self.config)

        base = self.host.default_sampling()
        chat = await self._chat_request(request, lambda body: openai_api.parse_chat(body, read_image, base))
        job = self._start(chat)
        model = await self._until_ready(request, job)
        cid, created = openai_api.completion_id(), openai_api.now()
        if not chat.stream:
            result = await self._result(request, job)
            return JSONResponse(openai_api.completion(cid, created, result))

        async def events() -> AsyncIterator[str]:
            yield _sse(openai_api.chunk(cid, created, model, {"role": "assistant", "content": ""}))
            async for event in self._stream(job):
                if isinstance(event, Piece):
                    yield _sse(openai_api.chunk(cid, created, model, {"content": event.text}))
                elif isinstance(event, Done):
                    r = event.result
                    last = openai_api.chunk(cid, created, model, {}, r.finish_reason)
                    if chat.include_usage:
                        yield _sse(last)
                        last = {**openai_api.chunk(cid, created, model, {}), "choices": []}
                        last["usage"] = openai_api.usage(r)
                    last["timings"] = openai_api.timings(r)
                    yield _sse(last)
                    yield "data: [DONE]\n\n"
                elif isinstance(event, Failed):
                    yield _sse(openai_api.error_body(event.error))

        return StreamingResponse(events(), media_type="text/event-stream", headers=_STREAM_HEADERS)

    async def ollama_version(self, request: Request) -> Response:
        return JSONResponse({"version": ollama_api.VERSION})

    async def ollama_tags(self, request: Request) -> Response:
        return JSONResponse(ollama_api.tags(models.available(self.host)))

    async def ollama_ps(self, request: Request) -> Response:
        pipe = self.host.pipeline
        if pipe is None:
            return JSONResponse({"models": []})
        return JSONResponse(ollama_api.ps(models.find(self.host, pipe.bundle.id), pipe.llm.n_ctx))

    async def ollama_show(self, request: Request) -> Response:
        body = parse_json(await read_body(request, self.config.max_body_bytes))
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "'model' is missing", param="model")
        m = models.find(self.host, name)
        pipe = self.host.pipeline
        n_ctx = pipe.llm.n_ctx if pipe is not None and pipe.bundle.id == m["id"] else None
        return JSONResponse(ollama_api.show(m, n_ctx))

    async def ollama_chat(self, request: Request) -> Response:
        base = self.host.default_sampling()
        chat = await self._chat_request(request, lambda body: ollama_api.parse_chat(body, base))
        return await self._ollama_answer(request, chat, ollama_api.chat_piece, ollama_api.chat_final)

    async def ollama_generate(self, request: Request) -> Response:
        base = self.host.default_sampling()
        chat = await self._chat_request(request, lambda body: ollama_api.parse_generate(body, base))
        if not chat.turns:  # an empty prompt asks for the model to be loaded: it is
            return JSONResponse(ollama_api.loaded_reply(chat.model or ""))
        return await self._ollama_answer(request, chat, ollama_api.generate_piece, ollama_api.generate_final)

    async def _ollama_answer(
        self,
        request: Request,
        chat: ChatRequest,
        piece: Callable[[str, str], dict[str, Any]],
        final: Callable[..., dict[str, Any]],
    ) -> Response:
        started = time.perf_counter()
        job = self._start(chat)
        model = await self._until_ready(request, job)
        if not chat.stream:
            result = await self._result(request, job)
            return JSONResponse(final(result, _ms(started), result.text))

        async def lines() -> AsyncIterator[str]:
            async for event in self._stream(job):
                if isinstance(event, Piece):
                    yield _line(piece(model, event.text))
                elif isinstance(event, Done):
                    yield _line(final(event.result, _ms(started)))
                elif isinstance(event, Failed):
                    yield _line(ollama_api.error_body(event.error))

        return StreamingResponse(lines(), media_type="application/x-ndjson", headers=_STREAM_HEADERS)


_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _line(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False) + "\n"


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000


async def _collect(job: Job) -> JobResult:
    while True:
        event = await job.next()
        if isinstance(event, Done):
            return event.result
        if isinstance(event, Failed):
            raise event.error


async def _or_disconnect(request: Request, job: Job, work: Coroutine[Any, Any, T]) -> T:
    """Await `work`; if the client disconnects first, cancel the job and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        job.cancel()
        raise
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()
    if task in done:
        return task.result()
    job.cancel()
    raise ClientGone()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
