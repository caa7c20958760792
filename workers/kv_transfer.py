"""KV-cache blocks between worker groups (disaggregated prefill/decode), over ZeroMQ frames.

A decode group binds one PULL socket (its KV inbox, on rank 0); a prefill group's rank 0 holds
one PUSH socket per decode group. One transfer is two frames: a msgpack KVHeader, then the
blocks' keys and values as raw bytes: one shard per tensor-parallel rank, each [num_layers, 2,
num_blocks, block_size, num_kv_heads of that rank, head_dim] in the cache dtype. Rank 0 gathers
the shards of its group before sending and scatters them after receiving (torch.distributed),
so groups of equal tensor-parallel size pair rank to rank. The engine core never touches the
bytes: it only tells the prefill group which blocks the decode group already caches, and when
the decode group has them.
"""

from __future__ import annotations

import msgspec
import torch
import zmq

from workers.multimodal import TORCH_DTYPES


class KVHeader(msgspec.Struct, kw_only=True):
    """One batch of a request's blocks. Full blocks go as soon as a prefill chunk completes them;
    the last batch (the rest, with the partial block) follows the first token."""

    request_id: str
    last: bool                  # the prompt is complete with this batch
    first_token: int            # the token the prefill group sampled after the prompt (last batch)
    start_block: int            # index in the request's block table of the first block sent
    num_blocks: int
    dtype: str
    shape: list[int]            # of one shard
    num_shards: int = 1         # the prefill group's tensor-parallel size


def pack_shards(shards: list[torch.Tensor]) -> bytes:
    """The shards (one per rank, same shape) as one payload."""
    return b"".join(shard.to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
                    for shard in shards if shard.numel())


def unpack_shards(header: KVHeader, payload: bytes | memoryview) -> list[torch.Tensor]:
    dtype = TORCH_DTYPES.get(header.dtype)
    if dtype is None:
        raise ValueError(f"KV transfer of unsupported dtype {header.dtype!r}")
    per_shard = dtype.itemsize
    for dim in header.shape:
        per_shard *= dim
    if len(payload) != per_shard * header.num_shards:
        raise ValueError(f"KV transfer of {len(payload)} bytes, expected {per_shard * header.num_shards} "
                         f"for {header.num_shards} shards of {header.shape}")
    if per_shard == 0:
        return [torch.empty(header.shape, dtype=dtype) for _ in range(header.num_shards)]
    flat = torch.frombuffer(bytearray(payload), dtype=dtype)
    return list(flat.view(header.num_shards, *header.shape).unbind(0))


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
