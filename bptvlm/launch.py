"""Start ``bptvlm serve`` as a separate process on 127.0.0.1 and wait until it is ready.

Used by ``bptvlm demo``, ``bptvlm perf`` and the end-to-end tests: the server always runs in its own
process, so the HTTP boundary is real.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def local_server(
    model: str = "tiny-random",
    *,
    port: int | None = None,
    args: Sequence[str] = (),
    timeout: float = 120.0,
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Run ``bptvlm serve --model MODEL`` in a subprocess; yield its base URL; stop it on exit."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "bptvlm.cli", "serve", "--model", model, "--port", str(port),
           "--log-level", "WARNING", *args]
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log_path:
            log.close()  # type: ignore[union-attr]


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0) -> None:
    """Poll ``/v2/health/ready`` until it answers 200; fail early if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the server at {url} was not ready within {timeout:.0f} s")
