"""Run an HTTP server (``kivi-vllm serve ...`` or any command) as a subprocess.

    with server_process(["kivi-vllm", "serve", "--kv-bits", "2"], log_path="s.log") as url:
        requests.get(f"{url}/v1/models")

The command gets ``--port PORT`` appended (a free port) unless it contains ``{port}``,
which is substituted instead. Its stdout and stderr go to ``log_path``; the context
waits until ``GET /health`` answers 200 (or the process exits, or the timeout passes,
both raising :class:`ServerStartError` with the log's tail), yields the base URL, and on
exit terminates the whole process group (SIGTERM, then SIGKILL after ``stop_timeout_s``).
Pure stdlib.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path


class ServerStartError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def log_tail(path: str | Path, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def wait_healthy(
    url: str, proc: subprocess.Popen | None = None, timeout_s: float = 600.0,
    log_path: str | Path | None = None,
) -> None:
    """Poll ``{url}/health`` until it answers 200; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise ServerStartError(
                f"server exited with code {proc.returncode} before {url}/health answered; "
                f"log {log_path}:\n{log_tail(log_path) if log_path else ''}"
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            raise ServerStartError(
                f"{url}/health did not answer within {timeout_s:.0f} s; log {log_path}:\n"
                f"{log_tail(log_path) if log_path else ''}"
            )
        time.sleep(0.5)


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 30.0) -> int:
    """SIGTERM the process group of ``proc`` (it leads its own group), then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
    # Children (engine core, workers) may outlive the leader: kill what is left.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def kivi_serve_command(*args: str) -> list[str]:
    """``kivi-vllm serve ARGS`` run by this interpreter (works without the script on PATH)."""
    return [sys.executable, "-m", "kivi_vllm.cli", "serve", *args]


@contextlib.contextmanager
def server_process(
    cmd: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    log_path: str | Path | None = None,
    env: dict[str, str] | None = None,
    start_timeout_s: float = 600.0,
    stop_timeout_s: float = 30.0,
    cwd: str | Path | None = None,
) -> Iterator[str]:
    """Start ``cmd`` on a free port, wait for ``/health``, yield ``http://host:port``."""
    port = port or free_port(host)
    argv = [a.replace("{port}", str(port)) for a in cmd]
    if not any("{port}" in a for a in cmd):
        argv += ["--port", str(port)]
    if log_path is None:
        fd, log_name = tempfile.mkstemp(prefix="server-", suffix=".log")
        os.close(fd)
        log_path = log_name
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    url = f"http://{host}:{port}"
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=full_env, cwd=cwd, start_new_session=True,
        )
        try:
            wait_healthy(url, proc, start_timeout_s, log_path)
            yield url
        finally:
            stop_process_group(proc, stop_timeout_s)


def main(argv: list[str] | None = None) -> None:
    """``python benchmarks/server_process.py CMD...``: start, print the URL, stop on Ctrl-C."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise SystemExit("usage: server_process.py COMMAND [ARGS...]  ({port} or --port added)")
    with server_process(argv, log_path="server.log") as url:
        print(f"serving at {url} (log: server.log); Ctrl-C stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    main()


def save_run(args, cmd: Sequence[str], started: str, result: dict, out: str | None) -> dict:
    """The JSON record of one scripted server run (arguments, command, machine, results),
    written to ``out`` when given."""
    record = {"started": started, "args": vars(args), "server_cmd": list(cmd),
              "machine": platform.platform(), "cpus": os.cpu_count(), **result}
    if out:
        with open(out, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
    return record
