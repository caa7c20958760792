from __future__ import annotations

from typing import Literal

import msgspec


MAX_COALESCE_MS = 1000.0


class GatewaySettings(msgspec.Struct, kw_only=True):
    """Limits and security of the HTTP + WebSocket front end."""

    api_key: str | None = None
    served_model_name: str | None = None      # the name /v1/models reports and requests use
    max_body_bytes: int = 8 * 2**20
    max_json_depth: int = 64                  # arrays/objects open at once in a body or message
    # Prompts in one /v1/completions call (each becomes n engine requests).
    max_prompts_per_request: int = 32
    ws_max_message_bytes: int = 8 * 2**20
    ws_auth_timeout_s: float = 5.0
    # A chat whose connection dropped keeps running and its deltas are kept this long (and up
    # to this many bytes) for chat.resume; past either, it is cancelled and forgotten.
    resume_window_s: float = 60.0
    resume_buffer_bytes: int = 4 * 2**20
    # Detached chats kept server-wide (the oldest is cancelled and forgotten beyond it): with
    # resume_buffer_bytes this bounds the memory held for clients that went away.
    max_detached_chats: int = 256
    max_chats_per_connection: int = 16        # running at once on one WebSocket
    max_kept_chats_per_connection: int = 64   # running or finished, kept for chat.resume
    ws_idle_timeout_s: float = 300.0          # no chat running and no message: closed
    # Connections (uvicorn protocol level): beyond max_connections a new connection gets a 503
    # and is closed at once; a request head must arrive within header_timeout_s of the
    # connection opening or of the previous response; an idle keep-alive connection is closed
    # after keep_alive_timeout_s.
    max_connections: int = 512
    header_timeout_s: float = 10.0
    keep_alive_timeout_s: float = 5.0
    # On SIGTERM/SIGINT: refuse new work at once, give running requests this long, then abort
    # them and exit. A second signal exits at once.
    shutdown_timeout_s: float = 30.0
    # "none": /metrics is open even with an API key (Prometheus scrapers carry none), as vLLM;
    # "key": it needs the key like every other route.
    metrics_auth: Literal["none", "key"] = "none"
    # Origins a browser may call the API from (CORS); "*" for any. Empty: no CORS headers.
    allowed_origins: list[str] = []
    # A request field the server does not implement is a 400 naming it; this ignores it instead.
    ignore_unknown_fields: bool = False
    # The syntax of tool calls in the model's output: "auto" recognizes it in the chat template.
    tool_call_parser: Literal["auto", "hermes", "llama3"] = "auto"
    # Streamed output (WebSocket chats, SSE) comes at most once per this many milliseconds after
    # the first delta, each delta carrying everything since the previous one: fewer frames and
    # less server CPU per token, for up to this much added latency per token. 0: a delta as soon
    # as there is output. A WebSocket connection can ask for its own with ?coalesce_ms=N.
    stream_coalesce_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.max_kept_chats_per_connection < self.max_chats_per_connection:
            raise ValueError("max_kept_chats_per_connection must be at least "
                             "max_chats_per_connection")
        if not 0 <= self.stream_coalesce_ms <= MAX_COALESCE_MS:
            raise ValueError(f"stream_coalesce_ms must be between 0 and {MAX_COALESCE_MS}")
        if min(self.max_chats_per_connection, self.max_connections, self.max_json_depth,
               self.max_detached_chats, self.max_prompts_per_request) < 1:
            raise ValueError("max_chats_per_connection, max_connections, max_json_depth, "
                             "max_detached_chats and max_prompts_per_request must be positive")


# One line per setting: the CLI's --help and the README's settings table.
GATEWAY_FIELD_HELP: dict[str, str] = {
    "api_key": "require Authorization: Bearer KEY (prefer STREAMVLM_API_KEY or --api-key-file: "
               "a key on the command line shows in ps)",
    "served_model_name": "the model name clients use and /v1/models reports; None: --model",
    "max_body_bytes": "HTTP request body bytes at most",
    "max_json_depth": "arrays/objects open at once in a body or WebSocket message",
    "max_prompts_per_request": "prompts in one /v1/completions call at most",
    "ws_max_message_bytes": "WebSocket message bytes at most",
    "ws_auth_timeout_s": "seconds a WebSocket client has to authenticate",
    "resume_window_s": "seconds a dropped chat keeps running for chat.resume",
    "resume_buffer_bytes": "bytes of a dropped chat's deltas kept for chat.resume",
    "max_detached_chats": "dropped chats kept server-wide (the oldest goes first)",
    "max_chats_per_connection": "chats running at once on one WebSocket",
    "max_kept_chats_per_connection": "chats running or finished kept per WebSocket for resume",
    "ws_idle_timeout_s": "seconds a WebSocket without a running chat or message stays open",
    "max_connections": "open connections at most; beyond it a 503",
    "header_timeout_s": "seconds a request head may take to arrive",
    "keep_alive_timeout_s": "seconds an idle keep-alive connection stays open",
    "shutdown_timeout_s": "seconds running requests get on SIGTERM/SIGINT before they are aborted",
    "metrics_auth": "none: /metrics open (Prometheus scrapers carry no key); key: it needs the API key",
    "allowed_origins": "browser origins allowed by CORS (none: no CORS headers)",
    "ignore_unknown_fields": "accept and ignore request fields the server does not implement",
    "tool_call_parser": "tool-call syntax of the model's output: hermes (<tool_call> JSON; Qwen, "
                        "Hermes), llama3 (Llama 3 JSON), auto: recognized in the chat template",
    "stream_coalesce_ms": "stream deltas at most once per this many ms (fewer frames, less CPU "
                          "per token, more latency); 0: off; WebSocket ?coalesce_ms=N per connection",
}
assert GATEWAY_FIELD_HELP.keys() == set(GatewaySettings.__struct_fields__)
