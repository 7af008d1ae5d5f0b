"""A visdom server on a free loopback port, started as a user starts one (``scripts/visdom_server.sh``):
for the tests and ``scripts/dashboard_screenshot.py``."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests

SERVER_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "visdom_server.sh"


def free_port() -> int:
    """A loopback port nothing listens on now (another process may still take it before we do)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_server(proc: subprocess.Popen) -> None:
    """Stop a server started by ``local_server``: its session, so nothing it started is left behind."""
    if proc.poll() is not None:
        return  # reaped: its id may belong to another process by now
    # Not reaped, so the id is still its own even if it has just exited.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def local_server(env_dir: Path, python: str = sys.executable, start_timeout: float = 60.0,
                 attempts: int = 3) -> Iterator[tuple[int, subprocess.Popen]]:
    """A visdom server on a free loopback port, started as a user starts one, through
    scripts/visdom_server.sh, saving environments in ``env_dir`` (its output goes to
    ``env_dir/server.log``); yields ``(port, process)`` and stops it on exit. The script execs the
    server, so the process is the server. For tests and scripts/dashboard_screenshot.py.
    """
    env_dir.mkdir(parents=True, exist_ok=True)
    log_path = env_dir / "server.log"
    env = {**os.environ, "PYTHON": python, "VISDOM_ENV_PATH": str(env_dir)}
    for _ in range(attempts):
        port = free_port()
        # A saved environment only this server loads tells it apart from another process that
        # took the port between free_port() and the server's bind.
        token = f"starting_{secrets.token_hex(6)}"
        (env_dir / f"{token}.json").write_text('{"jsons": {}, "reload": {}}')
        with open(log_path, "w") as log:
            proc = subprocess.Popen(["bash", str(SERVER_SCRIPT), str(port)], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            ready = _wait_ready(proc, port, token, start_timeout)
            if ready:
                requests.post(f"http://127.0.0.1:{port}/delete_env", data=json.dumps({"eid": token}),
                              timeout=10).raise_for_status()
        except BaseException:
            stop_server(proc)
            raise
        if ready:
            break
        stop_server(proc)
        (env_dir / f"{token}.json").unlink()
    else:
        raise RuntimeError(f"visdom server did not start in {attempts} attempts: {log_path.read_text()[-2000:]}")
    try:
        yield port, proc
    finally:
        stop_server(proc)


def _wait_ready(proc: subprocess.Popen, port: int, token: str, timeout: float) -> bool:
    """True once our server answers on ``port`` (it lists the ``token`` environment), False if it
    exited first (the port was taken); RuntimeError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        try:
            r = requests.post(f"http://127.0.0.1:{port}/env_state", data="{}", timeout=1)
            if r.ok and token in r.json():
                return True
        except (requests.RequestException, ValueError):
            pass  # not listening yet, or another program on the port
        if time.monotonic() > deadline:
            raise RuntimeError(f"the visdom server on port {port} did not answer in {timeout:g} s")
        time.sleep(0.2)
    return False
