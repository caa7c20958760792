"""`streamvlm serve` as a real process: --port 0, and SIGTERM with clients that never finish
their requests (one never reads its stream, one never sends its whole body)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


class ServeProcess:
    def __init__(self, model: Path, shutdown_timeout_s: float, log: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.log = log
        with log.open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "streamvlm.cli", "serve", "--model", str(model),
                 "--port", "0", "--max-model-len", "256", "--worker-backend", "thread",
                 "--shutdown-timeout-s", str(shutdown_timeout_s), "--log-level", "warning"],
                stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=ROOT)
        self.port = self._read_port(deadline=time.monotonic() + 120)
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._wait_healthy(deadline=time.monotonic() + 120)

    def _read_port(self, deadline: float) -> int:
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stdout], [], [], 1.0)
            if ready:
                line = self.process.stdout.readline()
                assert line, "the server exited before it served"
                if line.startswith("streamvlm: serving on http://"):
                    return int(line.strip().rsplit(":", 1)[1])
        raise AssertionError("the server never said where it serves")

    def _wait_healthy(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):   # not listening yet
                if httpx.get(self.base_url + "/health", timeout=5).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError("the server never became healthy")

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def wait_draining(self, deadline: float) -> None:
        """Until a new request is refused with 503 shutting_down (the listener stays open
        while running requests end)."""
        while time.monotonic() < deadline:
            resp = httpx.get(self.base_url + "/health", timeout=5)
            if resp.status_code == 503:
                assert resp.json()["error"]["type"] == "shutting_down"
                return
            time.sleep(0.05)
        raise AssertionError("the server never refused new work")

    def wait_exit(self, timeout: float) -> float:
        started = time.monotonic()
        self.process.wait(timeout)
        return time.monotonic() - started

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


def _hanging_requests(server: ServeProcess) -> list[socket.socket]:
    """A request whose body never ends, and a streaming request whose client reads only the
    start of the response (so both are surely in the app when this returns) and then nothing."""
    uploader = server.connect()
    uploader.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                     b'{"prompt": "')
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader.connect(("127.0.0.1", server.port))
    body = json.dumps({"messages": [{"role": "user", "content": "Tell me a story."}],
                       "max_tokens": 200, "ignore_eos": True, "stream": True,
                       "logprobs": True, "top_logprobs": 20}).encode()
    reader.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                   b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                   % (len(body), body))
    reader.settimeout(60)
    assert reader.recv(12, socket.MSG_WAITALL) == b"HTTP/1.1 200"
    return [reader, uploader]


@pytest.fixture
def serve(llama_path, tmp_path):
    started: list[ServeProcess] = []

    def start(shutdown_timeout_s: float) -> ServeProcess:
        started.append(ServeProcess(llama_path, shutdown_timeout_s, tmp_path / f"serve{len(started)}.log"))
        return started[-1]

    yield start
    for server in started:
        server.kill()


def test_sigterm_drains_then_aborts_what_is_left(serve):
    server = serve(shutdown_timeout_s=2)
    hanging = _hanging_requests(server)
    try:
        server.process.send_signal(signal.SIGTERM)
        server.wait_draining(deadline=time.monotonic() + 30)
        took = server.wait_exit(timeout=60)
    finally:
        for sock in hanging:
            sock.close()
    assert server.process.returncode == 0
    assert took < 60


def test_second_sigterm_exits_at_once(serve):
    server = serve(shutdown_timeout_s=300)
    hanging = _hanging_requests(server)
    try:
        server.process.send_signal(signal.SIGTERM)
        server.wait_draining(deadline=time.monotonic() + 30)
        server.process.send_signal(signal.SIGTERM)
        took = server.wait_exit(timeout=60)
    finally:
        for sock in hanging:
            sock.close()
    assert took < 60   # far below the 300 s the first signal would have waited
    # The app's shutdown still runs (the engine stops in order), not cancelled with the loop.
    assert server.process.returncode == 0
    assert "Traceback" not in server.log.read_text(), server.log.read_text()[-3000:]
