"""The FastAPI application: routes, the API-key check, and one error shape (OpenAI's) for every failure, so bad
input is a 4xx naming the parameter and never a 500."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from quantkit.engine.async_engine import AsyncLLMEngine
from quantkit.server.metrics import CONTENT_TYPE, ServerMetrics
from quantkit.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from quantkit.server.serving import OpenAIServing

logger = logging.getLogger(__name__)


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class APIKeyMiddleware:
    """Bearer-token check on /v1/* before anything else (a malformed body without a key is a 401, not a 400);
    /health, /metrics, /tokenize and /detokenize stay open, as in vLLM."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                what = "Missing" if not given else "Incorrect"
                response = error_response(APIError(401, f"{what} API key: send 'Authorization: Bearer <key>'",
                                                   code="invalid_api_key"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _validation_error(exc: RequestValidationError) -> APIError:
    """pydantic's errors as one 400: the first problem, with its parameter path as `param`."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                        code="invalid_json")
    if tuple(first.get("loc", ())) == ("body",):
        return APIError(400, "the body must be a JSON object, sent with Content-Type: application/json",
                        code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif first.get("type") == "missing":
        message = f"Missing required parameter: {param}"
    else:
        value = json.dumps(first.get("input"), default=str)[:100]
        message = f"{param or 'body'}: {first['msg']} (got {value})"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return APIError(400, message + more, param, code="invalid_value")


def build_app(engine: AsyncLLMEngine, model_name: str, api_key: str | None = None,
              shutdown_timeout: float = 10.0) -> FastAPI:
    """The server around a not yet started AsyncLLMEngine: it starts with the app and stops with it."""
    serving = OpenAIServing(engine, model_name)
    metrics = ServerMetrics(engine, model_name)
    engine.on_finished = metrics.record

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.drain(shutdown_timeout)
        await engine.close()

    app = FastAPI(title="quantkit", lifespan=lifespan)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(APIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_alive:
            return error_response(APIError(503, f"the engine is not running: {engine.error!r}",
                                           code="unavailable"))
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return serving.models()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await serving.completions(body, raw)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: Request) -> Response:
        return await serving.chat(body, raw)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        return serving.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        return serving.detokenize(body)

    return app


class GracefulServer(uvicorn.Server):
    """uvicorn waits for open connections on SIGTERM/SIGINT; meanwhile the engine takes no new requests, lets the
    running ones finish for `shutdown_timeout` seconds and then aborts the rest, so every stream ends with its
    final chunk and [DONE] instead of a cut connection."""

    def __init__(self, config: uvicorn.Config, engine: AsyncLLMEngine, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout = shutdown_timeout

    async def shutdown(self, sockets: Any = None) -> None:
        drain = asyncio.create_task(self.engine.drain(self.shutdown_timeout))
        await super().shutdown(sockets)
        await drain


def make_server(engine: AsyncLLMEngine, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                api_key: str | None = None, shutdown_timeout: float = 10.0,
                log_level: str = "info") -> GracefulServer:
    app = build_app(engine, model_name, api_key, shutdown_timeout)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=int(shutdown_timeout) + 10, timeout_keep_alive=5)
    return GracefulServer(config, engine, shutdown_timeout)
