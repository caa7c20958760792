"""One ASGI app on one port: the OpenAI-compatible HTTP API and the WebSocket chat stream."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route, WebSocketRoute

from streamvlm.engine.async_engine import AsyncEngine
from streamvlm.gateway import http, tokenizer_routes, ws
from streamvlm.gateway.admission import AdmissionTurns
from streamvlm.gateway.settings import GatewaySettings
from streamvlm.gateway.shutdown import RefuseWhileDraining, ShutdownGate


def build_app(engine: AsyncEngine, settings: GatewaySettings | None = None) -> Starlette:
    """The engine is started with the app (lifespan) and shut down with it."""
    settings = settings or GatewaySettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await engine.start()
        app.state.chats = ws.ChatRegistry(settings)
        try:
            yield
        finally:
            await app.state.chats.close()
            await engine.shutdown()

    gate = ShutdownGate()
    app = Starlette(middleware=[*cors_middleware(settings),
                                Middleware(RefuseWhileDraining, gate=gate),
                                Middleware(http.BearerAuth, api_key=settings.api_key,
                                           open_paths=http.open_paths(settings))], routes=[
        Route("/health", http.health, methods=["GET"]),
        Route("/metrics", http.metrics, methods=["GET"]),
        Route("/version", http.version, methods=["GET"]),
        Route("/v1/models", http.models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", http.model, methods=["GET"]),
        Route("/v1/chat/completions", http.chat_completions, methods=["POST"]),
        Route("/v1/completions", http.completions, methods=["POST"]),
        Route("/tokenize", tokenizer_routes.tokenize, methods=["POST"]),
        Route("/detokenize", tokenizer_routes.detokenize, methods=["POST"]),
        Route("/v1/apply_template", tokenizer_routes.apply_template, methods=["POST"]),
        WebSocketRoute("/v1/ws", ws.websocket_endpoint),
    ], exception_handlers={HTTPException: http.http_error}, lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    app.state.shutdown_gate = gate
    app.state.admission = AdmissionTurns()
    return app


def cors_middleware(settings: GatewaySettings) -> list[Middleware]:
    """Outermost, so that a browser can read every answer (a 401 or 503 too) and a preflight
    OPTIONS, which carries no API key, is answered before authentication. None when no origin
    is allowed."""
    if not settings.allowed_origins:
        return []
    return [Middleware(CORSMiddleware, allow_origins=settings.allowed_origins,
                       allow_methods=["GET", "POST", "OPTIONS"],
                       allow_headers=["Authorization", "Content-Type"], max_age=600)]
