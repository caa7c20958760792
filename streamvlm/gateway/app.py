"""One ASGI app on one port: the OpenAI-compatible HTTP API and the WebSocket chat stream."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route, WebSocketRoute

from streamvlm.engine.async_engine import AsyncEngine
from streamvlm.gateway import http, ws
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
    app = Starlette(middleware=[Middleware(RefuseWhileDraining, gate=gate),
                                Middleware(http.BearerAuth, api_key=settings.api_key)], routes=[
        Route("/health", http.health, methods=["GET"]),
        Route("/metrics", http.metrics, methods=["GET"]),
        Route("/v1/models", http.models, methods=["GET"]),
        Route("/v1/chat/completions", http.chat_completions, methods=["POST"]),
        Route("/v1/completions", http.completions, methods=["POST"]),
        WebSocketRoute("/v1/ws", ws.websocket_endpoint),
    ], lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    app.state.shutdown_gate = gate
    return app
