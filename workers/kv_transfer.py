"""KV-cache blocks between worker groups (disaggregated prefill/decode), over ZeroMQ frames.

A decode group binds one PULL socket (its KV inbox); a prefill group holds one PUSH socket per
decode group. One transfer is two frames: a msgpack KVHeader, then the blocks' keys and values
as raw bytes, [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim] in the cache
dtype. The engine core never touches the bytes: it only tells the prefill group which blocks
the decode group already caches, and when the decode group has them.
"""

from __future__ import annotations

import msgspec
import torch
import zmq

from workers.multimodal import TORCH_DTYPES


class KVHeader(msgspec.Struct, kw_only=True):
    request_id: str
    first_token: int            # the token the prefill group sampled after the prompt
    start_block: int            # index in the request's block table of the first block sent
    num_blocks: int
    dtype: str
    shape: list[int]


def pack_blocks(kv_cache: torch.Tensor, block_ids: list[int]) -> tuple[torch.Tensor, bytes]:
    """The blocks' keys and values of every layer, as one host tensor and its bytes."""
    index = torch.tensor(block_ids, dtype=torch.int64, device=kv_cache.device)
    blocks = kv_cache.index_select(2, index).to("cpu").contiguous()
    return blocks, blocks.view(torch.uint8).numpy().tobytes() if blocks.numel() else b""


def unpack_blocks(header: KVHeader, payload: bytes | memoryview) -> torch.Tensor:
    dtype = TORCH_DTYPES.get(header.dtype)
    if dtype is None:
        raise ValueError(f"KV transfer of unsupported dtype {header.dtype!r}")
    expected = dtype.itemsize
    for dim in header.shape:
        expected *= dim
    if len(payload) != expected:
        raise ValueError(f"KV transfer of {len(payload)} bytes, expected {expected} for {header.shape}")
    if expected == 0:
        return torch.empty(header.shape, dtype=dtype)
    return torch.frombuffer(bytearray(payload), dtype=dtype).view(header.shape)


class KVOutbox:
    """The prefill side: PUSH sockets to the decode groups' inboxes, by group id."""

    def __init__(self, ctx: zmq.Context) -> None:
        self._ctx = ctx
        self._peers: dict[int, zmq.Socket] = {}
        self._encoder = msgspec.msgpack.Encoder()

    def connect(self, addresses: dict[int, str]) -> None:
        for group_id, address in addresses.items():
            if group_id not in self._peers:
                sock = self._ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SNDHWM, 0)
                sock.connect(address)
                self._peers[group_id] = sock

    def send(self, group_id: int, header: KVHeader, payload: bytes) -> None:
        sock = self._peers.get(group_id)
        if sock is None:
            raise ValueError(f"no KV connection to decode group {group_id}")
        sock.send_multipart([self._encoder.encode(header), payload], copy=False)

    def close(self) -> None:
        for sock in self._peers.values():
            sock.close(linger=0)
        self._peers.clear()


class KVInbox:
    """The decode side: one PULL socket that every prefill group sends to."""

    def __init__(self, ctx: zmq.Context, address: str) -> None:
        self.socket = ctx.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        if address.startswith("tcp://") and address.rsplit(":", 1)[-1] == "0":
            port = self.socket.bind_to_random_port(address.rsplit(":", 1)[0])
            address = f"{address.rsplit(':', 1)[0]}:{port}"
        else:
            self.socket.bind(address)
        self.address = address
        self._decoder = msgspec.msgpack.Decoder(KVHeader)

    def receive(self) -> tuple[KVHeader, memoryview] | None:
        """One waiting transfer, or None."""
        try:
            header, payload = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        return self._decoder.decode(header.buffer), payload.buffer

    def close(self) -> None:
        self.socket.close(linger=0)
