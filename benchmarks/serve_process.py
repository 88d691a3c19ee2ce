"""A real ``fastgpt serve`` process for tests/test_serve.py and bench_serve.py: started as a user would start it
(``python -m fastgpt serve ...``) on a free loopback port, its log captured, always stopped.

    with ServerProcess("--max-num-seqs", "8") as server:
        httpx.get(server.url + "/health")

The port is the server's own pick (--port 0): it prints "listening on URL" once it serves, so there is no
window in which another process can take a port chosen for it. Start-up and health waits are bounded.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

try:  # the openai client brings its HTTP library: httpx2 in openai 3.x, httpx before
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_S = 180.0


class ServerProcess:
    def __init__(self, *args: str, env: dict | None = None, start_timeout_s: float = START_TIMEOUT_S,
                 launcher: list[str] | None = None):
        """launcher: what runs ``-m fastgpt serve`` (default: this interpreter), e.g. torchrun's command line
        for a tensor-parallel server (rank 0 prints the URL). A launcher gets a session of its own, so that
        a kill reaches its ranks too (SIGKILL to torchrun alone would leave them running)."""
        child_env = {k: v for k, v in os.environ.items() if k != "FASTGPT_API_KEY"}
        # the server runs the engine's plain PyTorch path on CPU, as a user's would (the test suite's
        # TRITON_INTERPRET=1 is for the kernel tests)
        child_env.update(TRITON_INTERPRET="0", PYTHONUNBUFFERED="1",
                         PYTHONPATH=os.pathsep.join([REPO_ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        child_env.update(env or {})
        self.args = list(args)
        self.proc = subprocess.Popen([*(launcher or [sys.executable]), "-m", "fastgpt", "serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env,
                                     cwd=REPO_ROOT, errors="replace", start_new_session=launcher is not None)
        self._own_group = launcher is not None
        self.lines: list[str] = []
        self.url: str | None = None
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self._wait_ready(start_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            m = re.search(r"listening on (http://\S+)", line)
            if m and self.url is None:
                self.url = m.group(1)
                self._listening.set()
        self._listening.set()  # the process ended

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        self._listening.wait(timeout_s)
        if self.url is None:
            raise RuntimeError(f"fastgpt serve did not start within {timeout_s:.0f} s:\n{self.log()}")
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"fastgpt serve never answered /health with 200:\n{self.log()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return "\n".join(self.lines[-200:])

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait for the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                if self._own_group:  # the launcher and every rank it started
                    os.killpg(self.proc.pid, signal.SIGKILL)
                else:
                    self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def metrics(url: str) -> dict[str, float]:
    """/metrics as {'name{labels}': value} (labels as the server writes them) and {'name': value}."""
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (Linux): a server, its engine process, whatever those started."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:  # gone meanwhile
            pass
    return found


def tree_total(pid: int, read_one) -> float | None:
    """read_one(p) summed over pid and its descendants; None when pid itself cannot be read. A descendant
    that is gone meanwhile (or a zombie, with no memory or stat fields left) counts as nothing."""
    total = 0
    for p in process_tree(pid):
        try:
            total += read_one(p)
        except (OSError, ValueError, IndexError, StopIteration):
            if p == pid:
                return None
    return total


def _rss_one(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def rss_bytes(pid: int) -> int:
    """The resident memory of pid and its descendants (the engine process of a server included)."""
    total = tree_total(pid, _rss_one)
    if total is None:
        raise RuntimeError(f"no VmRSS for process {pid}")
    return total
