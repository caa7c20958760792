"""The prefix-cache block hash that the workers' KV cache keys blocks by and the engine
core's router predicts cache hits with: both must compute the very same bytes.

A full block's hash chains the previous block's hash, its token ids and optional extra keys
(such as the hashes of images whose tokens it holds), so equal hashes mean equal prefixes.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

import msgspec


def hash_block(parent: bytes | None, token_ids: Sequence[int], extra_keys: tuple = ()) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"")
    h.update(array("q", token_ids).tobytes())
    if extra_keys:
        h.update(msgspec.msgpack.encode(extra_keys))
    return h.digest()
