"""API-key authentication, shared by the HTTP routes and the WebSocket endpoint."""

from __future__ import annotations

import hmac
from collections.abc import Iterable


def key_matches(token: str | bytes, api_key: str) -> bool:
    """Constant-time comparison, so that timing does not reveal how much of a key was right."""
    given = token.encode() if isinstance(token, str) else token
    return hmac.compare_digest(given, api_key.encode())


def check_authorization(headers: Iterable[tuple[bytes, bytes]], api_key: str) -> bool | None:
    """The ``Authorization`` header against the API key: None when there is none, else whether
    it is ``Bearer <key>`` (the scheme case-insensitive, RFC 7235). A repeated Authorization
    header is refused: proxies and servers disagree on which copy counts."""
    values = [value for name, value in headers if name.lower() == b"authorization"]
    if not values:
        return None
    if len(values) > 1:
        return False
    scheme, _, token = values[0].strip().partition(b" ")
    token = token.strip()
    return scheme.lower() == b"bearer" and bool(token) and key_matches(token, api_key)
