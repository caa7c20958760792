"""A worker group on another host (``streamvlm worker --connect``): join a running engine core,
then run the usual worker loop on the sockets it hands out."""

from __future__ import annotations

import os
import socket
import sys

import msgspec
import zmq

from streamvlm.config import EngineConfig, tcp_host_port
from streamvlm.protocol import JoinAccepted, JoinRefused, JoinReply, JoinRequest


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
                      join_timeout_s: float = 600.0) -> None:
    """Join, then serve the group until the core says Shutdown or falls silent."""
    from workers.main import run_worker

    host, _ = tcp_host_port(connect, "--connect")
    if devices is not None and len(devices) != 1:
        raise ValueError(f"--devices: a remote worker group runs on one device "
                         f"(tensor_parallel_size 1), got {devices}")
    accepted = join_engine(connect, join_timeout_s)
    config = msgspec.msgpack.decode(accepted.config, type=EngineConfig)
    # The checkpoint may live elsewhere on this host; the core's device list is for its own
    # local groups.
    config = msgspec.structs.replace(config, model=model or config.model, devices=None)
    print(f"streamvlm worker: joined {connect} as worker group {accepted.group_id}",
          file=sys.stderr, flush=True)
    # The group's sockets are bound on the core's listen interface: reach them through the
    # host this worker already reached the core at.
    run_worker(msgspec.msgpack.encode(config), f"tcp://{host}:{accepted.input_port}",
               f"tcp://{host}:{accepted.output_port}", None,
               device_index=devices[0] if devices else None)
