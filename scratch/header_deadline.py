"""Prototype (phase 1) of the request-head deadline for `catdog serve` (nbs/19_cli.ipynb or 17_service).

uvicorn times out idle keep-alive connections, but its timer is cancelled by the first byte a client sends: a client
that sends half a request head and then nothing holds its connection (and a `limit_concurrency` slot) forever. This
subclass of the protocol uvicorn uses closes a connection whose next request head has not arrived within the deadline
after the connection opened or after its last response.

    python scratch/header_deadline.py   # self-check: a stalled head is closed after the deadline, a normal request works
"""
from __future__ import annotations

import os

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def header_timeout_s() -> float:
    "`CATDOG_REQUEST_TIMEOUT_S` (default 30): read per process, since uvicorn workers import this module afresh."
    return float(os.environ.get("CATDOG_REQUEST_TIMEOUT_S", "30"))


class DeadlineHttpToolsProtocol(HttpToolsProtocol):
    "uvicorn's httptools protocol, closing connections whose request head does not arrive in time."
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_deadline()

    def _arm_head_deadline(self) -> None:
        waiting_after = self.cycle  # a new cycle starts when the next request head is complete
        def expire():
            if self.cycle is waiting_after and not self.transport.is_closing(): self.transport.close()
        self.loop.call_later(header_timeout_s(), expire)


if __name__ == "__main__":
    import socket, subprocess, sys, time
    os.environ["CATDOG_REQUEST_TIMEOUT_S"] = "2"
    app = "async def app(scope, receive, send):\n" \
          "    if scope['type'] != 'http': return\n" \
          "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n" \
          "    await send({'type': 'http.response.body', 'body': b'ok'})\n"
    code = (f"import sys; sys.path.insert(0, 'scratch'); exec({app!r}); import uvicorn, header_deadline\n"
            "uvicorn.run(app, host='127.0.0.1', port=int(sys.argv[1]), http=header_deadline.DeadlineHttpToolsProtocol,"
            " limit_concurrency=8, log_level='warning')")
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", code, str(port)])
    try:
        time.sleep(2)
        stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        for s in stalled: s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        closed = []
        for s in stalled:
            s.settimeout(10)
            closed.append(s.recv(100) == b"")
        print(f"stalled heads closed: {sum(closed)}/{len(closed)} after {time.monotonic() - start:.1f} s")
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b"0\r\n\r\n"): answer += s.recv(100)
            print("a normal request:", answer.split(b"\r\n")[0])
            time.sleep(3)  # idle keep-alive past the deadline: closed
            s.settimeout(5); print("idle keep-alive closed:", s.recv(100) == b"")
    finally:
        server.terminate(); server.wait()
