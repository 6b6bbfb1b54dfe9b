"""Start ``drivesplat serve`` / ``drivesplat worker`` as child processes (demo, bench, tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from service.client import Client


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _exe() -> list[str]:
    return [sys.executable, "-m", "service.cli"]


class Proc:
    """A child process with its output in a log file; stopped gracefully or killed."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen([*_exe(), *args], env={**os.environ, **env},
                                      stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up (a crash)."""
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=30)
        self._log.close()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=30)
        self._log.close()

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class LocalServer(Proc):
    """``drivesplat serve`` on a free loopback port; ``client`` talks to it."""

    def __init__(self, env: dict[str, str], log_path: Path, port: int | None = None,
                 token: str | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(["serve", "--host", "127.0.0.1", "--port", str(self.port)], env,
                         log_path)
        self.client = Client(self.url, token=token)

    def wait_ready(self, timeout: float = 120.0) -> LocalServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"server exited with {self.popen.returncode}:\n"
                                   f"{self.output()[-4000:]}")
            if self.client.ready():
                return self
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.output()[-4000:]}")


class Worker(Proc):
    """``drivesplat worker`` (Celery)."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        super().__init__(["worker"], env, log_path)
