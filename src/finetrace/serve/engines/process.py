"""One engine process, supervised: started with an argument list, healthy when its ``/health`` answers 200,
restarted on request, killed on stop. Its output goes to a log file whose tail is quoted when it fails.

Used for llama.cpp (``llamacpp_worker``) and vLLM (``vllm serve``) alike; attach mode has no process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ...errors import FinetraceError


class EngineUnavailable(FinetraceError):
    """The engine behind the gateway is not answering (it died, is restarting, or never started)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LaunchedEngine:
    """The lifecycle shared by the backends that launch their engine as an ``EngineProcess`` (llama.cpp, and
    vLLM in launch mode): ``proc`` is None until ``start`` (and stays None when vLLM is attached to)."""

    name: str
    proc: EngineProcess | None

    @property
    def process(self) -> EngineProcess:
        """The engine process (EngineUnavailable before ``start``)."""
        if self.proc is None:
            raise EngineUnavailable(f"the {self.name} engine has not been started")
        return self.proc

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc else None

    def restart(self) -> None:
        self.process.kill()
        self.process.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.process.kill()


class EngineProcess:
    def __init__(self, argv: list[str], port: int, log_path: Path, start_timeout_s: float = 120):
        self.argv, self.port, self.log_path, self.start_timeout_s = argv, port, Path(log_path), start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the process and wait until ``/health`` answers; EngineUnavailable (with its log) if not."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.starts += 1
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EngineUnavailable(
                    f"the engine process exited with status {self.proc.returncode} while starting: {self.tail()}",
                    hint=f"see {self.log_path}",
                )
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise EngineUnavailable(
            f"the engine did not become healthy in {self.start_timeout_s:g} s: {self.tail()}",
            hint=f"see {self.log_path}",
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def kill(self, grace_s: float = 5) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(grace_s)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(grace_s)

    def tail(self, n: int = 1500) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace").strip() or "(no output)"
        except OSError:
            return "(no log)"


def python_module(module: str) -> list[str]:
    """``python -m module`` with this interpreter."""
    return [sys.executable, "-m", module]
