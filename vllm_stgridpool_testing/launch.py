"""Start and stop a real ``vllm serve`` process (demo, benchmarks, tests).

The server runs in its own process group so that stopping it also stops the
engine-core and worker processes vLLM spawns; its log goes to a file that
callers can read (vLLM logs the KV-cache size and errors there).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vllm_command() -> list[str]:
    """The ``vllm`` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("vllm")
    return [str(script)] if script.exists() else [shutil.which("vllm") or "vllm"]


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log_path: Path
    _log_file: object = field(repr=False, default=None)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def get(self, path: str, timeout: float = 10.0) -> str:
        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as response:
            return response.read().decode()

    def post(self, path: str, timeout: float = 600.0) -> str:
        """An empty POST, as vLLM's ``/start_profile`` and ``/stop_profile`` take."""
        request = urllib.request.Request(self.base_url + path, data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read().decode()

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                self.stop()
                raise RuntimeError(f"vllm serve exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/health", timeout=2.0)
                return
            except OSError:  # refused, reset, timed out, or not yet 200 (urllib's errors are OSErrors)
                time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vllm serve not healthy after {timeout:.0f}s:\n{self.log()[-4000:]}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.alive():
            try:
                os.killpg(self.process.pid, signal.SIGINT)
                self.process.wait(timeout=timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        if self._log_file is not None:
            self._log_file.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(
    model: str | os.PathLike,
    *args: str,
    env: dict[str, str] | None = None,
    log_path: str | os.PathLike,
    port: int | None = None,
    timeout: float = 300.0,
) -> Server:
    """Run ``vllm serve MODEL ARGS`` on 127.0.0.1 and wait until ``/health`` answers."""
    port = port or free_port()
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "w")
    command = [*vllm_command(), "serve", str(model), "--host", "127.0.0.1", "--port", str(port), *args]
    process = subprocess.Popen(
        command,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    server = Server(process=process, port=port, log_path=log_path, _log_file=log_file)
    server.wait_healthy(timeout)
    return server
