"""``python -m batcher.emulator`` as a subprocess: URL line, a real request, clean signal exits."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
URL_LINE = re.compile(r"http://127\.0\.0\.1:(\d+)")


def _start(*arguments: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "batcher.emulator", *arguments],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _read_line(process: subprocess.Popen[str], wait: float = 20.0) -> str:
    """The first stdout line, or fail if none comes within ``wait`` seconds."""
    stdout = process.stdout
    assert stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(stdout.readline()))
    reader.start()
    reader.join(wait)
    if not lines:
        process.kill()
        process.communicate()
        pytest.fail("the emulator printed no line")
    return lines[0]


@pytest.fixture
def emulator() -> Iterator[tuple[subprocess.Popen[str], str]]:
    process = _start("--port", "0", "--latency", "0", "--api-key", "sk-cli-secret")
    try:
        line = _read_line(process)
        match = URL_LINE.search(line)
        assert match, line
        yield process, match.group(0)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def _generate(root: str, key: str) -> tuple[int, dict[str, Any]]:
    payload = {
        "model": "z-image-turbo",
        "input": {"messages": [{"role": "user", "content": [{"text": "a paper boat"}]}]},
        "parameters": {"size": "512*512", "seed": 1},
    }
    request = urllib.request.Request(
        root + "/api/v1/services/aigc/multimodal-generation/generation",
        data=json.dumps(payload).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.load(error)


@pytest.mark.parametrize("stop_with", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serves_and_stops_cleanly(
    emulator: tuple[subprocess.Popen[str], str], stop_with: signal.Signals
) -> None:
    process, root = emulator
    status, reply = _generate(root, "sk-cli-secret")
    assert status == 200
    url = reply["output"]["choices"][0]["message"]["content"][0]["image"]
    with urllib.request.urlopen(url, timeout=10) as download:
        assert download.headers["Content-Type"] == "image/png"
        assert download.read(8) == b"\x89PNG\r\n\x1a\n"
    status, reply = _generate(root, "sk-wrong")
    assert (status, reply["code"]) == (401, "InvalidApiKey")

    process.send_signal(stop_with)
    stdout, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr
    assert stdout == ""  # the URL line was the only one
    assert "Traceback" not in stderr
    assert "sk-cli-secret" not in stderr and "sk-wrong" not in stderr
    assert "2 generation requests, 1 image billed, 1 download" in stderr


def test_bad_spec_is_one_line_and_exit_2() -> None:
    process = _start("--port", "0", "--faults", "explode=0.5")
    stdout, stderr = process.communicate(timeout=20)
    assert process.returncode == 2
    assert stdout == ""
    assert stderr.count("\n") == 1
    assert "unknown fault kind 'explode'" in stderr


def test_busy_port_is_one_line_and_exit_1(emulator: tuple[subprocess.Popen[str], str]) -> None:
    _, root = emulator
    port = root.rsplit(":", 1)[1]
    process = _start("--port", port, "--latency", "0")
    stdout, stderr = process.communicate(timeout=20)
    assert process.returncode == 1
    assert stdout == ""
    assert stderr.count("\n") == 1
    assert f"cannot listen on 127.0.0.1:{port}" in stderr
