"""A `vllm-medusa serve` process on 127.0.0.1, for the serving benchmark and the server tests: start it in its
own process group with its output in a file, wait until it answers /health, stop the whole group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


class ServerStartError(RuntimeError):
    """The server exited or did not answer /health during start-up; the message ends with its log's tail."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`vllm-medusa serve ARGS` in a new session (so `stop` reaches the engine core too)."""
    command = [sys.executable, "-m", "vllm_medusa.cli", "serve", *args]
    with log.open("w") as out:  # a file, not a pipe: a full pipe would stall the server
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(process: subprocess.Popen, url: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerStartError(f"server exited with {process.returncode} during start-up:\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise ServerStartError(f"server not ready after {timeout_s} s:\n{tail(log)}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (API server and engine core), SIGKILL what is left after 30 s."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    except ProcessLookupError:
        pass


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
