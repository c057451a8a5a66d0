"""`llavao1-bench serve`: the local server under load, and what HTTP costs on top of the Python API.

A real `llavao1-edge serve` process on a free port answers the questions (OpenAI's chat completions, an
image as a data: URI, not streamed) from 1, 2, 4 and 8 clients at once: latency p50/p95 and throughput for
each. Then, one request at a time, each question through the server and through `Reasoner.ask` in this
process (same engine settings, every image already in both caches, three rounds, which goes first
alternating): the server's overhead per request is the median of the paired differences.
"""

from __future__ import annotations

import base64
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .common import BenchError, BenchItem


@dataclass
class LoadLevel:
    clients: int
    requests: int
    p50_s: float
    p95_s: float
    throughput_rps: float  # requests answered per second, all clients together


@dataclass
class ServeReport:
    model: str
    search: str
    parallel: int
    threads: int
    levels: list[LoadLevel] = field(default_factory=list)
    server_s: list[float] = field(default_factory=list)  # one client: the server's latency per question
    api_s: list[float] = field(default_factory=list)  # the same questions through Reasoner.ask
    provenance: dict = field(default_factory=dict)

    @property
    def overhead_ms(self) -> float:
        return 1000 * statistics.median(s - a for s, a in zip(self.server_s, self.api_s, strict=True))

    def to_json(self) -> dict:
        return {**asdict(self), "overhead_ms": self.overhead_ms}

    def table(self) -> str:
        rows = [f"server: {self.model}, search {self.search}, --parallel {self.parallel}, {self.threads} threads",
                f"{'clients':>8} {'requests':>9} {'p50 s':>8} {'p95 s':>8} {'req/s':>7}"]
        rows += [f"{lv.clients:>8} {lv.requests:>9} {lv.p50_s:>8.3f} {lv.p95_s:>8.3f} {lv.throughput_rps:>7.2f}"
                 for lv in self.levels]
        rows.append(f"overhead per request against the Python API (median of {len(self.api_s)} pairs): "
                    f"{self.overhead_ms:.1f} ms")
        return "\n".join(rows)


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _body(item: BenchItem, spec: dict) -> bytes:
    data = item.image if isinstance(item.image, bytes) else Path(item.image).read_bytes()
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}},
             {"type": "text", "text": item.question}]
    return json.dumps({"model": "bench", "messages": [{"role": "user", "content": parts}], "llavao1": spec}).encode()


def _ask(port: int, body: bytes) -> float:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    if resp.status != 200:
        raise BenchError(f"the server answered {resp.status}: {data[:200]!r}")
    return time.perf_counter() - t0


def _start(model: str, mmproj: str, parallel: int, threads: int) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "llavao1_edge.cli", "serve", "--model", model, "--mmproj", mmproj, "--alias", "bench",
           "--port", "0", "--parallel", str(parallel), "--queue", "64", "--threads", str(threads)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    if "serving" not in line:
        proc.kill()
        raise BenchError(f"the server did not start: {line.strip()} {proc.stderr.read().strip()[-300:]}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    return proc, int(line.split(" on ", 1)[1].split(" ", 1)[0].rsplit(":", 1)[1])


def _load(port: int, bodies: list[bytes], clients: int, requests: int) -> LoadLevel:
    """`requests` requests from `clients` threads at once, each taking the next question as it finishes."""
    latencies: list[float] = []
    lock = threading.Lock()
    todo = list(range(requests))

    def client():
        while True:
            with lock:
                if not todo:
                    return
                k = todo.pop()
            dt = _ask(port, bodies[k % len(bodies)])
            with lock:
                latencies.append(dt)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return LoadLevel(clients, len(latencies), statistics.median(latencies), _percentile(latencies, 0.95),
                     len(latencies) / wall)


def measure_serve(model: str, mmproj: str, items: list[BenchItem], spec: dict, label: str, parallel: int,
                  threads: int, clients: tuple[int, ...], requests: int, engine_config, rounds: int = 3) -> ServeReport:
    from dataclasses import replace

    from llavao1_edge.api import Reasoner
    from llavao1_edge.options import from_mapping
    from llavao1_edge.search import SearchConfig

    report = ServeReport(model, label, parallel, threads)
    bodies = [_body(it, spec) for it in items]
    cfg = from_mapping(SearchConfig, spec)
    proc, port = _start(model, mmproj, parallel, threads)
    try:
        _ask(port, bodies[0])  # warm: the first image encode and the allocator
        for c in clients:
            report.levels.append(_load(port, bodies, c, max(requests, c)))
        with Reasoner(model, mmproj, replace(engine_config, n_threads=max(1, threads // parallel))) as r:
            for it in items:  # warm: every image encoded once and cached, as the server's are by now
                r.ask(it.image, it.question, cfg)
            for k in range(rounds):  # one at a time, the idle server waiting; the order alternates by round
                for it, body in zip(items, bodies, strict=True):
                    first_server = k % 2 == 0
                    if first_server:
                        report.server_s.append(_ask(port, body))
                    t0 = time.perf_counter()
                    r.ask(it.image, it.question, cfg)
                    report.api_s.append(time.perf_counter() - t0)
                    if not first_server:
                        report.server_s.append(_ask(port, body))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return report
