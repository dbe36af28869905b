"""A real Dask cluster for the tests: `dask scheduler` and `dask worker` processes of this venv on loopback."""
import subprocess
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from distributed import Client

from servers import free_port, running, stop

BIN = Path(sys.executable).parent


@dataclass
class DaskCluster:
    address: str                    # tcp://127.0.0.1:<port>: what DASK_SCHEDULER_ADDRESS is set to
    dashboard: str                  # the scheduler's dashboard URL
    workers: list[subprocess.Popen] = field(default_factory=list)  # one process per worker: a test may kill one


@contextmanager
def dask_cluster(tmp: Path, workers: int = 2, threads: int = 1, env: dict | None = None, timeout: float = 120):
    "A scheduler and `workers` single-process workers of `threads` threads each; entered once all workers joined."
    port, dashboard_port = free_port(), free_port()
    address, dashboard = f"tcp://127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}"
    with ExitStack() as stack:
        stack.enter_context(running(
            [BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", port,
             "--dashboard-address", f"127.0.0.1:{dashboard_port}"],
            ready_url=f"{dashboard}/health", log=tmp / "scheduler.log", env=env, timeout=timeout))
        cluster = DaskCluster(address, f"{dashboard}/status")
        for i in range(workers):
            with open(tmp / f"worker-{i}.log", "wb") as log:
                proc = subprocess.Popen(
                    [BIN / "dask", "worker", address, "--nworkers", "1", "--nthreads", str(threads),
                     "--host", "127.0.0.1", "--no-dashboard", "--name", f"worker-{i}"],
                    stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            stack.callback(stop, proc)
            cluster.workers.append(proc)
        with Client(address, timeout=timeout) as client:
            client.wait_for_workers(workers, timeout=timeout)
        yield cluster
