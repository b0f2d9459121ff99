"""The HTTP API: OpenAI's `/v1/completions`, `/v1/chat/completions`, `/v1/models`, plus `/health` and `/metrics`.

    request ─► size limit (413) ─► bearer key (401) ─► pydantic body (400) ─► limits (400, 429)
            ─► Engine.submit per prompt and choice ─► events awaited on the event loop (never blocked:
               the model runs in the engine's thread) ─► one JSON response, or server-sent events
               ending with `data: [DONE]`; a client that disconnects cancels its generation.

Every error is OpenAI's body {"error": {"message", "type", "param", "code"}} with a 4xx status.
"""

from __future__ import annotations

import hmac
import json

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from gtransformer.data.tokenizer import Tokenizer
from gtransformer.inference.chat import ChatTemplate
from gtransformer.inference.engine import Engine
from gtransformer.serving.metrics import ServerMetrics
from gtransformer.serving.page import PAGE_HTML
from gtransformer.serving.protocol import APIError, ChatCompletionRequest, CompletionRequest
from gtransformer.serving.service import CompletionService, ServerSettings

class BodyLimit:
    """Pure ASGI middleware: a request body over `limit` bytes is answered 413 before anything parses it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def error(self) -> APIError:
        return APIError(413, f"request body over {self.limit} bytes; send a shorter prompt", code="body_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(send)
        seen = 0

        async def counted_receive():  # a body sent without Content-Length (chunked) is counted as it arrives
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise self.error()
            return message

        try:
            await self.app(scope, counted_receive, send)
        except APIError:
            await self._too_large(send)

    async def _too_large(self, send) -> None:
        body = json.dumps(self.error().body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def create_app(engine: Engine, tokenizer: Tokenizer, context_length: int, settings: ServerSettings,
               chat_template: ChatTemplate) -> FastAPI:
    app = FastAPI(title="gtransformer", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServerMetrics()
    service = CompletionService(engine, tokenizer, context_length, settings, chat_template, metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return await api_error(request, APIError(400, "the request body is not valid JSON", code="invalid_json"))
        param = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
        return await api_error(request, APIError(400, f"{param or 'body'}: {first.get('msg')}", param=param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        error = APIError(exc.status_code, str(exc.detail), type="invalid_request_error")
        return await api_error(request, error)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")  # the matched route's path: a bounded set of labels
        metrics.request(route.path if route is not None else "other", response.status_code)
        return response

    def require_key(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "missing or wrong API key; send the header Authorization: Bearer <key>",
                           type="authentication_error", code="invalid_api_key")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE_HTML)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        queued, active = engine.load()
        return PlainTextResponse(metrics.render(queued, active), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "gtransformer", "context_length": context_length}]}

    @app.post("/v1/completions", dependencies=[Depends(require_key)])
    async def completions(body: CompletionRequest, http: Request):
        if body.stream:
            return StreamingResponse(await service.completion_stream(body, http), media_type="text/event-stream")
        return await service.completion(body, http) or JSONResponse({}, status_code=499)

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        if body.stream:
            return StreamingResponse(await service.chat_stream(body, http), media_type="text/event-stream")
        return await service.chat(body, http) or JSONResponse({}, status_code=499)

    return BodyLimit(app, settings.max_body_bytes)
