"""KV-cache blocks between worker groups (disaggregated prefill/decode).

A decode group binds one PULL socket (its KV inbox, on rank 0); a prefill group's rank 0 holds
one PUSH socket per decode group. One transfer is two frames: a msgpack KVHeader, then the
blocks' keys and values as raw bytes: one shard per tensor-parallel rank, each [num_layers, 2,
num_blocks, block_size, num_kv_heads of that rank, head_dim] in the cache dtype. Rank 0 gathers
the shards of its group before sending and scatters them after receiving (torch.distributed),
so groups of equal tensor-parallel size pair rank to rank. The engine core never touches the
bytes: it only tells the prefill group which blocks the decode group already caches, and when
the decode group has them.

Two ways for the bytes (``kv_transport``): in the second ZeroMQ frame ("zmq", through host
memory), or over a torch.distributed point-to-point link between the two groups' rank 0 ("peer",
a 2-rank process group per prefill/decode pair, rendezvous on a TCPStore the decode group hosts:
gloo on CPU, NCCL on CUDA, so GPU memory goes GPU to GPU). The header always goes over ZeroMQ.
"""

from __future__ import annotations

from datetime import timedelta

import msgspec
import torch
import torch.distributed as dist
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
    source_group: int = -1      # the prefill group; with ``via_peer_link``, the bytes come over its link
    via_peer_link: bool = False


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


def _pair_group(store: dist.Store, pair: str, rank: int, device: torch.device,
                timeout_s: float) -> dist.ProcessGroup:
    """The 2-rank process group of one prefill/decode pair (rank 0: decode, rank 1: prefill)."""
    prefixed = dist.PrefixStore(pair, store)
    if device.type == "cuda":
        return dist.ProcessGroupNCCL(prefixed, rank, 2)
    return dist.ProcessGroupGloo(prefixed, rank, 2, timedelta(seconds=timeout_s))


class KVPeerLinks:
    """torch.distributed links from this group's rank 0 to other groups' rank 0, by group id.

    A decode group hosts the TCPStore (``host()``); prefill groups join it (``connect``). Both
    sides make the pairs in increasing group-id order, so that every rendezvous finds its peer."""

    def __init__(self, group_id: int, device: torch.device, timeout_s: float = 60.0) -> None:
        self.group_id = group_id
        self.device = device
        self.timeout_s = timeout_s
        self._store: dist.TCPStore | None = None
        self._links: dict[int, dist.ProcessGroup] = {}
        self._in_flight: list[tuple[object, torch.Tensor]] = []   # sends and the tensors they read

    def host(self, host: str = "127.0.0.1") -> str:
        """Decode side: open the rendezvous store; returns its address for prefill groups."""
        self._store = dist.TCPStore(host, 0, None, True, timeout=timedelta(seconds=self.timeout_s),
                                    wait_for_workers=False)
        return f"tcp://{host}:{self._store.port}"

    def accept(self, prefill_groups: list[int]) -> None:
        """Decode side: make the pair with each prefill group (blocks until each has joined)."""
        for group_id in sorted(prefill_groups):
            self._links[group_id] = _pair_group(self._store, f"{group_id}-{self.group_id}", 0, self.device,
                                                self.timeout_s)

    def connect(self, stores: dict[int, str]) -> None:
        """Prefill side: join each decode group's store and make the pair."""
        for group_id in sorted(stores):
            host, port = stores[group_id].removeprefix("tcp://").rsplit(":", 1)
            store = dist.TCPStore(host, int(port), None, False, timeout=timedelta(seconds=self.timeout_s))
            self._links[group_id] = _pair_group(store, f"{self.group_id}-{group_id}", 1, self.device,
                                                self.timeout_s)

    def send(self, group_id: int, blocks: torch.Tensor) -> None:
        """Start sending; the tensor is kept until the send completes."""
        self._in_flight = [(w, t) for w, t in self._in_flight if not w.is_completed()]
        blocks = blocks.contiguous()
        self._in_flight.append((self._links[group_id].send([blocks], 0, 0), blocks))

    def receive(self, group_id: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        """The next tensor the prefill group sends (it follows its header, so it is on its way)."""
        out = torch.empty(shape, dtype=dtype, device=self.device)
        self._links[group_id].recv([out], 1, 0).wait()
        return out


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
