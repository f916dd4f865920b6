"""``batcher review`` as a user starts it: a subprocess whose first line of output is the URL."""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.support import batcher_cmd


class ReviewProcess:
    """A running ``batcher review DIR --port 0``: its URL, token and port."""

    def __init__(self, proc: subprocess.Popen[str], url: str) -> None:
        self.proc = proc
        self.url = url
        parts = urlsplit(url)
        self.port = parts.port or 80
        self.token = parts.query.removeprefix("token=")

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        host: str | None = None,
    ) -> tuple[int, bytes]:
        """One raw HTTP request (the path is sent exactly as given)."""
        con = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            headers = {"Host": host or f"127.0.0.1:{self.port}"}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            if token is not None:
                headers["X-Batcher-Token"] = token
            con.request(method, path, body=data, headers=headers)
            response = con.getresponse()
            return response.status, response.read()
        finally:
            con.close()

    def mark(self, job_id: str, review: str | None) -> dict[str, Any]:
        status, body = self.request(
            "POST", "/api/review", {"id": job_id, "review": review}, token=self.token
        )
        assert status == 200, body
        return dict(json.loads(body)["job"])


@contextmanager
def review_server(folder: Path, *extra: str, timeout: float = 60) -> Iterator[ReviewProcess]:
    """Start ``batcher review`` on ``folder``; stop it with SIGINT at the end."""
    env = {k: v for k, v in os.environ.items() if k != "DASHSCOPE_API_KEY"}
    proc = subprocess.Popen(
        batcher_cmd("review", folder, "--port", "0", *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline().strip() if ready else ""
        if not line.startswith("http://"):
            proc.kill()
            _, err = proc.communicate(timeout=10)
            raise AssertionError(f"batcher review did not start: {line!r} {err}")
        assert time.monotonic() < deadline
        yield ReviewProcess(proc, line)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
