"""Start a real server process on loopback and wait, within a deadline, until it answers (catdog serve, prometheus)."""
import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    "A TCP port free on 127.0.0.1 right now (the OS picks it)."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


@contextmanager
def running(cmd: list, *, ready_url: str, log: Path, env: dict | None = None, cwd: Path | None = None,
            timeout: float = 120.0):
    "Run `cmd` in its own process group until the block ends; enter the block once `ready_url` answers 200."
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{cmd[0]} exited with {proc.returncode} before {ready_url} answered:\n{log_tail(log)}")
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200: break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{ready_url} did not answer 200 within {timeout:.0f} s:\n{log_tail(log)}")
            time.sleep(0.25)
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    "SIGTERM (a graceful shutdown), then SIGKILL to the process group this module created for it."
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # worker processes left behind by the parent, if any
    except ProcessLookupError:
        pass
    proc.wait()
