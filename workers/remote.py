"""A worker group on another host (``streamvlm worker --connect``): join a running engine core,
then run the usual worker loop on the sockets it hands out. A tensor-parallel group spans hosts
too: rank 0 joins the core, the other ranks (``streamvlm worker --follow``) join rank 0 through
torch.distributed's TCP rendezvous, take rank 0's config from it, and hear its step plans on
a port rank 0 picks and tells them over torch.distributed (ZeroMQ PUB/SUB)."""

from __future__ import annotations

import os
import socket
import sys

import msgspec
import zmq

from streamvlm.contract.config import EngineConfig, tcp_host_port
from streamvlm.contract.protocol import JoinAccepted, JoinRefused, JoinReply, JoinRequest


def join_engine(connect: str, timeout_s: float) -> JoinAccepted:
    """Ask the engine core at ``connect`` for a group; RuntimeError if it refuses or is silent."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        # Connecting before the core listens is fine: ZeroMQ keeps retrying until it does.
        sock.connect(connect)
        sock.send(msgspec.msgpack.encode(JoinRequest(hostname=socket.gethostname(),
                                                     pid=os.getpid())))
        if not sock.poll(int(timeout_s * 1000)):
            raise RuntimeError(f"no answer from an engine core at {connect} in {timeout_s:g} s")
        reply = msgspec.msgpack.decode(sock.recv(), type=JoinReply)
    finally:
        sock.close()
        ctx.term()
    if isinstance(reply, JoinRefused):
        raise RuntimeError(f"the engine core at {connect} refused: {reply.reason}")
    return reply


def run_remote_worker(connect: str, model: str | None = None, devices: list[int] | None = None,
                      join_timeout_s: float = 600.0, tensor_parallel_size: int = 1,
                      dist_init_method: str | None = None) -> None:
    """Join, then serve the group until the core says Shutdown or falls silent. With
    tensor_parallel_size > 1 this process is rank 0 and waits for the other ranks at
    dist_init_method (tcp://THIS_HOST:PORT; port 0: one the OS picks, printed on stderr)."""
    from workers.distributed import TPSetup
    from workers.main import ANY_PORT, run_worker

    host, _ = tcp_host_port(connect, "--connect")
    if tensor_parallel_size < 1:
        raise ValueError(f"--tensor-parallel-size must be >= 1, got {tensor_parallel_size}")
    if tensor_parallel_size > 1 and dist_init_method is None:
        raise ValueError("--tensor-parallel-size > 1 needs --dist-init-method tcp://THIS_HOST:PORT, "
                         "where the other ranks join")
    if devices is not None and len(devices) != 1:
        raise ValueError(f"--devices: each worker process runs on one device, got {devices}")
    tp = None
    if tensor_parallel_size > 1:
        tcp_host_port(dist_init_method, "--dist-init-method")
        tp = TPSetup(0, tensor_parallel_size, dist_init_method, f"tcp://*{ANY_PORT}", share_config=True)
    accepted = join_engine(connect, join_timeout_s)
    config = msgspec.msgpack.decode(accepted.config, type=EngineConfig)
    # The checkpoint may live elsewhere on this host; the core's device list is for its own
    # local groups.
    config = config.replace(model=model or config.model.model, devices=None)
    print(f"streamvlm worker: joined {connect} as worker group {accepted.group_id}",
          file=sys.stderr, flush=True)
    # The group's sockets are bound on the core's listen interface: reach them through the
    # host this worker already reached the core at.
    run_worker(msgspec.msgpack.encode(config), f"tcp://{host}:{accepted.input_port}",
               f"tcp://{host}:{accepted.output_port}", None, tp=tp,
               device_index=devices[0] if devices else None)


def run_remote_follower(dist_init_method: str, rank: int, tensor_parallel_size: int,
                        model: str | None = None, device: str = "auto",
                        devices: list[int] | None = None) -> None:
    """Rank ``rank`` of a remote tensor-parallel group whose rank 0 waits at dist_init_method.
    ``device`` must match rank 0's (it picks the collective backend before rank 0's config
    arrives); ``model`` is the checkpoint path on this host."""
    from workers.distributed import TPSetup
    from workers.main import ANY_PORT, RANK0_MODEL, run_follower

    if not 1 <= rank < tensor_parallel_size:
        raise ValueError(f"--rank must be in [1, {tensor_parallel_size}), got {rank}")
    if devices is not None and len(devices) != 1:
        raise ValueError(f"--devices: each worker process runs on one device, got {devices}")
    host, _ = tcp_host_port(dist_init_method, "--follow")
    tp = TPSetup(rank, tensor_parallel_size, dist_init_method, f"tcp://{host}{ANY_PORT}",
                 share_config=True)
    # Only the device and the model path are this host's; the rest comes from rank 0.
    placeholder = EngineConfig(model=model or RANK0_MODEL, device=device)  # type: ignore[arg-type]
    print(f"streamvlm worker: rank {rank} of {tensor_parallel_size}, joining {dist_init_method}",
          file=sys.stderr, flush=True)
    run_follower(msgspec.msgpack.encode(placeholder), tp, None, devices[0] if devices else None)
