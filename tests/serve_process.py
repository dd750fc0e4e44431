"""`edgesink serve` in a child process on 127.0.0.1, for the server's tests and benchmark."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

EDGESINK = str(Path(sys.executable).with_name("edgesink"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """``edgesink serve MODEL ARGS`` on a free port; :meth:`request` talks to it with plain http.client."""

    def __init__(self, model_path, *args: str, log_path: Path):
        self.model_path, self.args, self.log_path = str(model_path), list(args), log_path
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 180) -> "ServeProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([EDGESINK, "serve", self.model_path, "--port", str(self.port), *self.args],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"edgesink serve exited with {self.proc.returncode}: {self.log()}")
            try:
                if self.request("GET", "/health")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"edgesink serve did not answer within {timeout} s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def request(self, method: str, path: str, body=None, headers: dict | None = None,
                timeout: float = 300) -> tuple[int, dict, dict]:
        """(status, JSON body (or {"text": ...}), headers in lower case) of one request; ``body`` a dict
        (sent as JSON) or bytes."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if isinstance(body, dict) else body
            given = {k.lower(): v for k, v in (headers or {}).items()}
            connection.request(method, path, body=data, headers={"content-type": "application/json", **given})
            response = connection.getresponse()
            raw = response.read()
            try:
                answer = json.loads(raw) if raw else {}
            except ValueError:  # a CORS preflight's plain "OK"
                answer = {"text": raw.decode(errors="replace")}
            return response.status, answer, {k.lower(): v for k, v in response.getheaders()}
        finally:
            connection.close()

    def health(self) -> dict:
        return self.request("GET", "/health")[1]

    def wait_for(self, condition, timeout: float = 120) -> dict:
        """Poll /health until ``condition(health)``; the last health seen."""
        deadline = time.monotonic() + timeout
        while True:
            health = self.health()
            if condition(health) or time.monotonic() > deadline:
                return health
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no shutdown work at all, as in a crash."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; its exit status."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode if self.proc else 0
