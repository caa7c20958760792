"""Tensor parallelism inside a worker group: which rank this process is, and the collectives
the parallel layers use (torch.distributed: NCCL on CUDA, gloo on CPU)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout


@dataclass
class TPSetup:
    """How one rank of a group joins the others (sent to each worker process)."""

    rank: int
    size: int
    # torch.distributed's rendezvous: file://PATH, or tcp://HOST:PORT (port 0 on rank 0: one the
    # OS picks, announced on stderr for the other ranks to join).
    init_method: str
    # Rank 0 publishes each step's plan here (ZeroMQ PUB). A tcp address ending in ":*": rank 0
    # binds a port the OS picks and tells the other ranks over torch.distributed once they joined.
    plan_address: str
    # Ranks on other hosts: rank 0 hands its EngineConfig to the others over torch.distributed.
    share_config: bool = False


_rank, _size = 0, 1
_device = torch.device("cpu")


def tp_rank() -> int:
    return _rank


def tp_size() -> int:
    return _size


def init_tensor_parallel(setup: TPSetup, device: torch.device) -> None:
    global _rank, _size, _device
    backend = "nccl" if device.type == "cuda" else "gloo"
    if setup.init_method.startswith("tcp://"):
        # The store by hand (on every rank alike), so that rank 0 can bind port 0: a port
        # nobody else can take between being picked and being bound.
        host, _, port = setup.init_method.removeprefix("tcp://").rpartition(":")
        store = dist.TCPStore(host, int(port), setup.size, is_master=setup.rank == 0,
                              timeout=default_pg_timeout, wait_for_workers=False)
        if setup.rank == 0 and port == "0":
            print(f"streamvlm worker: tensor-parallel rendezvous at tcp://{host}:{store.port}",
                  file=sys.stderr, flush=True)
        dist.init_process_group(backend, store=store, rank=setup.rank, world_size=setup.size)
    else:
        dist.init_process_group(backend, init_method=setup.init_method, rank=setup.rank,
                                world_size=setup.size)
    _rank, _size, _device = setup.rank, setup.size, device


def broadcast_config_bytes(data: bytes | None) -> bytes:
    """Rank 0's bytes on every rank (the others pass None)."""
    box = [data]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _size > 1:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    if _size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def broadcast_int(value: int) -> int:
    """Rank 0's value on every rank."""
    if _size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_device)
    dist.broadcast(t, src=0)
    return int(t.item())


def gather_to_rank0(x: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's x (same shape) on rank 0, in rank order; [] on the other ranks."""
    if _size == 1:
        return [x]
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_size)] if _rank == 0 else None
    dist.gather(x, parts, dst=0)
    return parts or []


def scatter_from_rank0(parts: list[torch.Tensor] | None, out: torch.Tensor) -> torch.Tensor:
    """Rank r gets rank 0's parts[r] into out (the other ranks pass parts=None)."""
    if _size == 1:
        out.copy_(parts[0])
        return out
    dist.scatter(out, [p.contiguous() for p in parts] if _rank == 0 else None, src=0)
    return out


def broadcast_tensor(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's tensor on every rank (the others pass one of the same shape and dtype)."""
    if _size > 1:
        dist.broadcast(x, src=0)
    return x
