"""Soak driver (prototype of `make bench-soak`, phase 2: `catdog_nb.bench.bench_soak` in nbs/18_bench.ipynb).

10,000 mixed requests at concurrency 16 against a live `catdog serve` on 127.0.0.1: good photos (raw and multipart),
every hostile row of tests/hostile.py, small batches with one hostile file, and clients that hang up mid-upload.
Prints the status counts (5xx must be 0), p50/p99 of the good requests, and the server's resident memory after
warm-up, at its peak and at the end (the end within 10% of after warm-up).

    python scratch/soak.py --model models/catdog [--requests 10000 --concurrency 16]   # starts its own server
    python scratch/soak.py --port 8000 --pid 1234                                     # a server already running
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hostile import ROWS, hostile_bytes  # noqa: E402  (phase 2: the bench module builds its own hostile mix)

from catdog_nb.data import sample_photos  # noqa: E402

STATUS_OF = {"too_large": {413}, "refused": {400, 413}, "valid": {200}, "either": {200, 400}}
HEAVY = {"rgba_png_near_limit", "rgba16_png_near_limit", "gray16_png_near_limit", "many_scans_jpeg", "tall_bmp"}


def memory_mib(pid: int) -> dict[str, float]:
    "Resident memory of `pid` now and at its peak (VmRSS, VmHWM), in MiB."
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss": int(fields["VmRSS"].split()[0]) / 1024, "peak": int(fields["VmHWM"].split()[0]) / 1024}


def multipart(files: list[tuple[str, bytes]], boundary: str = "catdogsoak") -> tuple[bytes, str]:
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
             f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for name, data in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def plan(n: int, photos: list[bytes], hostile_share: float, seed: int = 0) -> list[dict]:
    """The request schedule, fixed by `seed`: `good` photos, one hostile `row`, a `batch` of photos with one hostile
    file, and `hangup` (headers and part of the body, then the client closes)."""
    rng, rows = random.Random(seed), [r for r in ROWS if r not in HEAVY]
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        draw = rng.random()
        if draw < hostile_share:
            name = rng.choice(rows) if i % 50 else rng.choice(sorted(HEAVY))  # the costly rows: 1 in 50 of the hostile
            out.append({"kind": "row", "name": name, "path": "/predict", "body": hostile_bytes(name),
                        "type": "application/octet-stream", "expect": STATUS_OF[ROWS[name][1]] | {503}})
        elif draw < hostile_share + 0.05:
            name = rng.choice(rows)
            body, ctype = multipart([("a.jpg", photo), (f"{name}.bin", hostile_bytes(name)), ("b.jpg", photo)])
            out.append({"kind": "batch", "name": name, "path": "/predict/batch", "body": body, "type": ctype, "expect": {200, 503}})
        elif draw < hostile_share + 0.06:
            out.append({"kind": "hangup", "path": "/predict", "body": photo, "type": "image/jpeg", "expect": set()})
        else:
            out.append({"kind": "good", "path": "/predict", "body": photo, "type": "image/jpeg", "expect": {200, 503}})
    return out


async def send(host: str, port: int, request: dict, conn: list) -> tuple[int, float]:
    "One request on the keep-alive connection `conn` ([reader, writer] or empty); (status, seconds). Status 0: the connection failed."
    head = (f"POST {request['path']} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {request['type']}\r\n"
            f"Content-Length: {len(request['body'])}\r\n\r\n").encode()
    start = time.perf_counter()
    if request["kind"] == "hangup":  # its own connection: part of the body, then gone
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(head + request["body"][:len(request["body"]) // 3]); await writer.drain()
        writer.close()
        return -1, time.perf_counter() - start
    for attempt in (0, 1):
        if not conn: conn[:] = await asyncio.open_connection(host, port)
        reader, writer = conn
        try:
            writer.write(head + request["body"]); await writer.drain()
            answer = await reader.readuntil(b"\r\n\r\n")
            status = int(answer.split(b" ", 2)[1])
            length = next((int(line.split(b":", 1)[1]) for line in answer.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            if b"connection: close" in answer.lower(): writer.close(); conn.clear()
            return status, time.perf_counter() - start
        except (ConnectionError, asyncio.IncompleteReadError):
            writer.close(); conn.clear()
            if attempt: return 0, time.perf_counter() - start
    return 0, 0.0


async def drive(host: str, port: int, requests: list[dict], concurrency: int, on_progress=None) -> list[tuple[dict, int, float]]:
    results, todo = [], iter(enumerate(requests))
    async def client():
        conn: list = []
        for i, request in todo:
            status, seconds = await send(host, port, request, conn)
            results.append((request, status, seconds))
            if on_progress: on_progress(len(results))
        if conn: conn[1].close()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results


def server_5xx(host: str, port: int) -> float:
    "The server's own count of 5xx answers (catdog_requests_total), which includes the clients that hung up."
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(f"http://{host}:{port}/metrics", timeout=30).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "catdog_requests_total" and s.labels.get("status", "").startswith("5"))


def report(results: list, memory: dict) -> dict:
    statuses: dict[int, int] = {}
    for _, status, _ in results: statuses[status] = statuses.get(status, 0) + 1
    good = [s for r, status, s in results if r["kind"] == "good" and status == 200]
    unexpected = [(r["kind"], r.get("name"), status) for r, status, _ in results if r["expect"] and status not in r["expect"]]
    figures = {"requests": len(results), "statuses": dict(sorted(statuses.items())),
               "server_errors": sum(n for s, n in statuses.items() if s >= 500), "unexpected": len(unexpected),
               "good_p50_ms": float(np.percentile(good, 50) * 1000) if good else None,
               "good_p99_ms": float(np.percentile(good, 99) * 1000) if good else None, **memory}
    print(f"{len(results)} requests: statuses {figures['statuses']} (-1: client hung up on purpose, 0: connection failed)")
    print(f"5xx: {figures['server_errors']}; answers not among those expected: {len(unexpected)} {unexpected[:5]}")
    if good: print(f"good requests: p50 {figures['good_p50_ms']:.1f} ms, p99 {figures['good_p99_ms']:.1f} ms")
    print(f"5xx counted by the server (catdog_requests_total): {memory['server_5xx']:.0f}")
    if "rss_warm" in memory:
        drift = memory["rss_end"] / memory["rss_warm"] - 1
        print(f"server resident memory: {memory['rss_warm']:.0f} MiB after warm-up, {memory['peak']:.0f} MiB peak, "
              f"{memory['rss_end']:.0f} MiB at the end ({drift:+.1%})")
    return figures


def soak(port: int, pid: int | None, n_requests: int = 10_000, concurrency: int = 16, hostile_share: float = 0.2,
         warm_up: int = 200, host: str = "127.0.0.1") -> dict:
    "Warm up with good photos, read the memory, run the mixed schedule, read it again; print and return the figures."
    photos = [p.read_bytes() for p in sample_photos(50)]
    warm = [{"kind": "good", "path": "/predict", "body": p, "type": "image/jpeg", "expect": {200}} for p in photos]
    asyncio.run(drive(host, port, (warm * (warm_up // len(warm) + 1))[:warm_up], concurrency))
    memory = {}
    if pid: memory["rss_warm"] = memory_mib(pid)["rss"]
    errors_before = server_5xx(host, port)
    results = asyncio.run(drive(host, port, plan(n_requests, photos, hostile_share), concurrency))
    memory["server_5xx"] = server_5xx(host, port) - errors_before
    if pid:
        time.sleep(2)  # let the last requests finish on the server's side
        now = memory_mib(pid)
        memory |= {"peak": now["peak"], "rss_end": now["rss"]}
    return report(results, memory)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="bundle to serve (starts `catdog serve` on a free loopback port)")
    p.add_argument("--port", type=int); p.add_argument("--pid", type=int)
    p.add_argument("--requests", type=int, default=10_000); p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--hostile-share", type=float, default=0.2)
    args = p.parse_args(argv)
    if not args.model: return soak(args.port, args.pid, args.requests, args.concurrency, args.hostile_share)
    import socket
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    env = {**os.environ, "CATDOG_MODEL_URI": args.model}
    with tempfile.NamedTemporaryFile(suffix=".log") as log:
        server = subprocess.Popen([str(Path(sys.executable).parent / "catdog"), "serve", "--port", str(port),
                                   "--log-level", "warning"], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            import httpx
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                if server.poll() is not None: raise RuntimeError(f"catdog serve exited with {server.returncode}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200: break
                except httpx.TransportError: pass
                time.sleep(0.25)
            figures = soak(port, server.pid, args.requests, args.concurrency, args.hostile_share)
            figures["alive"] = server.poll() is None
            print("server alive at the end:", figures["alive"])
            return figures
        finally:
            server.terminate(); server.wait(30)
            print(Path(log.name).read_text(errors="replace")[-1500:], file=sys.stderr)


if __name__ == "__main__":
    print(json.dumps(main()))
