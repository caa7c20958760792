from __future__ import annotations

import msgspec


class GatewaySettings(msgspec.Struct, kw_only=True):
    """Limits and security of the HTTP + WebSocket front end."""

    api_key: str | None = None
    served_model_name: str | None = None      # the name /v1/models reports and requests use
    max_body_bytes: int = 8 * 2**20
    ws_max_message_bytes: int = 8 * 2**20
    ws_auth_timeout_s: float = 5.0
    # A chat whose connection dropped keeps running and its deltas are kept this long (and up
    # to this many bytes) for chat.resume; past either, it is cancelled and forgotten.
    resume_window_s: float = 60.0
    resume_buffer_bytes: int = 4 * 2**20
