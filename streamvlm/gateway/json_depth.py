"""A bound on JSON nesting, checked on the raw bytes before decoding.

msgspec decodes nested arrays and objects recursively: a body nested tens of thousands deep
raises RecursionError deep inside the decoder. Real requests nest a handful of levels, so the
gateway refuses anything deeper than ``GatewaySettings.max_json_depth`` before decoding it.
"""

from __future__ import annotations

import re
from itertools import accumulate

# A JSON string, escapes included: brackets inside strings do not nest anything.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1


def json_too_deep(data: str | bytes, max_depth: int) -> bool:
    """Whether the JSON text opens more than ``max_depth`` arrays/objects at once.

    Unclosed brackets count as open, as they do for the decoder; an unterminated string's
    brackets are counted too (such a text is malformed anyway).
    """
    raw = data.encode() if isinstance(data, str) else data
    if raw.count(b"[") + raw.count(b"{") <= max_depth:   # the common case: nothing to scan
        return False
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if len(brackets) <= max_depth:
        return False
    # Running depth, computed in C (map + accumulate), no Python loop per byte.
    return max(accumulate(map(_STEP.__getitem__, brackets))) > max_depth
