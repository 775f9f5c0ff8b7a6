"""Hostile load against a local ``tiny-random`` server: memory, health latency, overload, slow clients.

    python scripts/hostile_load.py [--queued 80] [--slow 400] [--out hostile.json]

Starts ``bptvlm serve`` on 127.0.0.1 (a free port) and measures, in that one run:
- peak RSS over idle of the server process for each hostile input, sent alone (Linux: the peak is
  reset through /proc/PID/clear_refs before each input and read from VmHWM after it);
- the worst ``/v2/health/live`` latency while ``--queued`` requests wait for the model, and how many
  of them were refused with 503 once the queue (``--max-queue 64``) was full;
- the server's open descriptors while ``--slow`` clients trickle their headers (``--header-timeout 2``).
Bounded: one server, a few hundred requests and connections.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

from bptvlm.launch import free_port, wait_ready
from bptvlm.shared.tensors import encode_request

MB = 2**20


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _peak_over_idle(pid: int, send: Callable[[], httpx.Response]) -> tuple[int, float, int]:
    """(status, seconds, peak RSS over the RSS before it, in bytes) of one request."""
    time.sleep(1.0)  # let the previous request's memory go back first
    idle = _status(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    r = send()
    return r.status_code, time.perf_counter() - start, _status(pid, "VmHWM") - idle


def _post(url: str, path: str, inputs: dict, **kw: object) -> Callable[[], httpx.Response]:
    body, headers = encode_request(inputs, **kw)  # type: ignore[arg-type]
    return lambda: httpx.post(f"{url}/v2/models/clip/{path}", content=body, headers=headers, timeout=120)


def _raw(url: str, body: bytes, headers: dict[str, str]) -> Callable[[], httpx.Response]:
    return lambda: httpx.post(f"{url}/v2/models/clip/infer", content=body, headers=headers, timeout=120)


def _names(n: int, size: int) -> np.ndarray:
    return np.array([(f"{i} " + "x" * size)[:size].encode() for i in range(n)], dtype=object)


def hostile_inputs(url: str) -> dict[str, Callable[[], httpx.Response]]:
    """Each hostile input of issue 13 (refused ones and the largest accepted ones), as a sender."""
    zeros = np.zeros
    ctx = {"text_context": zeros((32, 4, 32), np.float32)}
    up = httpx.post(f"{url}/v2/models/clip/images", timeout=120,
                    content=encode_request({"images": zeros((2048, 32, 32, 3), np.uint8)})[0],
                    headers=encode_request({"images": zeros((2048, 32, 32, 3), np.uint8)})[1]).json()["image_batch"]
    batch = {"image_batch": np.array([up.encode()], dtype=object)}
    bytes_head = json.dumps({"inputs": [{"name": "class_names", "shape": [10**9, 10**9], "datatype": "BYTES",
                                         "parameters": {"binary_data_size": 4}}]}).encode()
    many_head = json.dumps({"inputs": [{"name": "class_names", "shape": [10_000_000], "datatype": "BYTES",
                                        "parameters": {"binary_data_size": 40_000_000}}]}).encode()
    body, headers = encode_request(ctx | {"images": zeros((4, 32, 32, 3), np.uint8), "class_names": _names(2, 4)})
    deep = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ' + b"[" * 100_000 + b"1" \
        + b"]" * 100_000 + b"}]}"
    return {
        "thin image [1, 300000, 1, 3] upload (refused)": _post(url, "images", {"images": zeros((1, 300000, 1, 3), np.uint8)}),
        "thinnest allowed [1, 4096, 256, 3] upload": _post(url, "images", {"images": zeros((1, 4096, 256, 3), np.uint8)}),
        "largest upload [9, 3000, 3000, 3] (243 MB)": _post(url, "images", {"images": zeros((9, 3000, 3000, 3), np.uint8)}),
        "16 class names of 1 MB (refused)": _post(url, "infer", ctx | batch | {"class_names": _names(16, MB)}),
        "1000 class names of 1000 bytes (refused: too many tokens)": _post(
            url, "infer", ctx | batch | {"class_names": _names(1000, 1000)}),
        "logits [32, 4096, 1000] binary (refused)": _post(url, "infer", ctx | batch | {"class_names": _names(1000, 8)},
                                                          outputs=["logits"]),
        "largest JSON logits [32, 2048, 40] (63 MB)": _post(url, "infer", ctx | batch | {"class_names": _names(40, 8)},
                                                            outputs=["logits"], binary=False),
        "BYTES [1e9, 1e9] in 4 bytes (refused)": _raw(url, bytes_head + b"\0" * 4,
                                                     {"Inference-Header-Content-Length": str(len(bytes_head))}),
        "40 MB of empty BYTES elements (refused)": _raw(url, many_head + b"\0" * 40_000_000,
                                                       {"Inference-Header-Content-Length": str(len(many_head))}),
        "JSON nested 100,000 deep (refused)": _raw(url, deep, {"Content-Type": "application/json"}),
        "gzip bomb, 1 GB inflated (refused)": _raw(url, gzip.compress(b"\0" * 2**30, 1),
                                                  {**headers, "Content-Encoding": "gzip"}),
        "text_context 3e38 (refused: non-finite)": _post(
            url, "infer", {"text_context": np.full((32, 4, 32), 3e38, np.float32)} | batch | {"class_names": _names(2, 4)}),
        "small valid request": _raw(url, body, headers),
    }


def queued_health(url: str, queued: int) -> dict[str, object]:
    """``queued`` concurrent joint requests (each timed alone first); health polled meanwhile."""
    rng = np.random.default_rng(0)
    inputs = {"text_context": rng.normal(0, 0.02, (8, 4, 32)).astype(np.float32),
              "visual_prompt": rng.normal(0, 0.02, (8, 2, 32)).astype(np.float32),
              "images": rng.integers(0, 256, (1024, 32, 32, 3), dtype=np.uint8), "labels": np.arange(1024) % 2,
              "class_names": _names(2, 4)}
    send = _post(url, "infer", inputs, outputs=["loss"])
    alone = min(_timed(send) for _ in range(3))
    codes: list[int] = []
    idle = _health_latencies(url, threading.Event(), seconds=3.0)  # the machine's own noise, no load
    busy: list[float] = []
    done = threading.Event()
    poller = threading.Thread(target=lambda: busy.extend(_health_latencies(url, done)))
    poller.start()
    threads = [threading.Thread(target=lambda: codes.append(send().status_code)) for _ in range(queued)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    done.set()
    poller.join()
    pct = lambda xs, q: round(float(np.percentile(xs, q)), 3)  # noqa: E731
    return {"request_alone_s": round(alone, 3), "queued": queued, "wall_s": round(elapsed, 1),
            "status_counts": {str(k): codes.count(k) for k in sorted(set(codes))},
            "health_polls": len(busy), "health_p50_s": pct(busy, 50), "health_p99_s": pct(busy, 99),
            "health_worst_s": round(max(busy), 3), "idle_health_p99_s": pct(idle, 99),
            "idle_health_worst_s": round(max(idle), 3)}


def _health_latencies(url: str, done: threading.Event, seconds: float = 1e9) -> list[float]:
    """``/v2/health/live`` latencies, one poll every 20 ms, until ``done`` or ``seconds``."""
    out: list[float] = []
    end = time.monotonic() + seconds
    with httpx.Client(timeout=60) as c:
        while not done.is_set() and time.monotonic() < end:
            start = time.perf_counter()
            c.get(f"{url}/v2/health/live")
            out.append(time.perf_counter() - start)
            time.sleep(0.02)
    return out


def _timed(send: Callable[[], httpx.Response]) -> float:
    start = time.perf_counter()
    assert send().status_code == 200
    return time.perf_counter() - start


def slow_clients(url: str, pid: int, count: int, seconds: float = 6.0) -> dict[str, int]:
    """``count`` connections sending one header byte a second; the server's descriptors before and after."""
    host, port = url.removeprefix("http://").split(":")
    before = len(os.listdir(f"/proc/{pid}/fd"))
    socks = []
    for _ in range(count):
        s = socket.create_connection((host, int(port)), timeout=5)
        s.setblocking(False)
        socks.append(s)
    peak, deadline = 0, time.monotonic() + seconds
    time.sleep(0.5)  # the server has accepted (and refused past the cap) every connection
    while time.monotonic() < deadline:
        for s in socks:
            try:
                s.send(b"G")
            except OSError:
                pass
        peak = max(peak, len(os.listdir(f"/proc/{pid}/fd")))
        time.sleep(1.0)
    after = len(os.listdir(f"/proc/{pid}/fd"))
    for s in socks:
        s.close()
    return {"connections": count, "fds_idle": before, "fds_peak": peak, "fds_after_s": int(seconds), "fds_after": after}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queued", type=int, default=80)
    parser.add_argument("--slow", type=int, default=400)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    port = free_port()
    cmd = [sys.executable, "-m", "bptvlm.cli", "serve", "--model", "tiny-random", "--port", str(port), "--device", "cpu",
           "--log-level", "ERROR", "--max-queue", "64", "--header-timeout", "2", "--ready-probe-seconds", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        results: dict[str, object] = {"idle_rss_mb": round(_status(proc.pid, "VmRSS") / MB)}
        rows = {}
        for name, send in hostile_inputs(url).items():
            status, seconds, peak = _peak_over_idle(proc.pid, send)
            rows[name] = {"status": status, "seconds": round(seconds, 2), "peak_over_idle_mb": round(peak / MB)}
            print(f"{name:58s} {status}  {seconds:6.2f} s  +{peak / MB:6.0f} MB", flush=True)
        results["inputs"] = rows
        results["queued_health"] = queued_health(url, args.queued)
        print(json.dumps(results["queued_health"]), flush=True)
        results["slow_clients"] = slow_clients(url, proc.pid, args.slow)
        print(json.dumps(results["slow_clients"]), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
