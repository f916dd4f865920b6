"""What every benchmark shares: paths, the pinned emulator subprocess and measured children.

Cores: on a machine with more than one core the emulator runs pinned to the last one and the
benchmark process (and so every client it starts: ``batcher``, the SDK baseline, ``curl``) to
the others, so the client's CPU figures are not the emulator's. Every child's CPU time and
peak RSS come from ``wait4`` on that one child (its own rusage, never the emulator's).

Nothing here talks to anything but 127.0.0.1, and every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "_work"
RESULTS = WORK / "results"
# Interim notes, appended as each benchmark finishes (BENCH_NOTES=/some/file.md to move them).
NOTES = Path(os.environ.get("BENCH_NOTES") or WORK / "notes.md")
API_KEY = "sk-bench-0000"
PYTHON = sys.executable

# urllib without any proxy from the environment: every request here is to 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class BenchError(RuntimeError):
    """A benchmark could not measure what it set out to (not a missed goal)."""


# ----------------------------------------------------------------------------- places


def work_dir(name: str, *, fresh: bool = True) -> Path:
    """``bench/_work/NAME``, emptied first unless ``fresh`` is False."""
    path = WORK / name
    if fresh and path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child: no proxies, the repository importable, a bench key."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["DASHSCOPE_API_KEY"] = API_KEY
    env.update(extra)
    return env


def batcher_command(*args: str) -> list[str]:
    """The real ``batcher`` CLI: the console script beside this Python, else ``-m batcher``."""
    script = Path(PYTHON).parent / "batcher"
    head = [str(script)] if script.exists() else [PYTHON, "-m", "batcher"]
    return [*head, *args]


def batcher_run(
    manifest: Path, out: Path, base_url: str, *, rps: str = "1000", json_out: bool = True
) -> list[str]:
    """``batcher run`` of ``manifest`` into ``out`` against ``base_url``, no progress display,
    the JSON summary on stdout unless ``json_out`` is false."""
    extra = ["--json"] if json_out else []
    return batcher_command(
        "run", str(manifest), "--out", str(out), "--base-url", base_url, "--rps", rps,
        *extra, "--no-progress",
    )  # fmt: skip


# ------------------------------------------------------------------------------- cores


def split_cores() -> tuple[set[int], int | None]:
    """(client cores, emulator core); the emulator core is None on a one-core machine."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return set(cores), None
    return set(cores[:-1]), cores[-1]


def pin_self(cores: set[int]) -> None:
    """Pin this process (and so every child started later) to ``cores``."""
    os.sched_setaffinity(0, cores)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a live process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def core_count() -> int:
    return os.cpu_count() or 1


# ---------------------------------------------------------------------------- emulator


class EmulatorProcess:
    """``python -m batcher.emulator`` in a subprocess on 127.0.0.1, pinned to ``core``.

    >>> with EmulatorProcess(latency="0", rps="inf") as emu:  # doctest: +SKIP
    ...     print(emu.base_url, emu.stats()["generate_requests"])
    """

    def __init__(
        self,
        *,
        latency: str = "0",
        rps: str = "inf",
        core: int | None = None,
        extra: Sequence[str] = (),
        start_timeout: float = 30.0,
    ) -> None:
        self.command = [
            PYTHON,
            "-m",
            "batcher.emulator",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--latency",
            latency,
            "--rps",
            rps,
            *extra,
        ]
        self.core = core
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[str] | None = None
        self.root_url = ""

    @property
    def base_url(self) -> str:
        return self.root_url + "/api/v1"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> EmulatorProcess:
        process = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
            env=child_env(),
        )
        self.process = process
        if self.core is not None:
            # Right after exec, before the server starts any thread: they all inherit this.
            os.sched_setaffinity(process.pid, {self.core})
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], self.start_timeout)
        line = process.stdout.readline() if ready else ""
        match = re.search(r"http://127\.0\.0\.1:\d+", line)
        if match is None:
            self.stop()
            raise BenchError(f"the emulator did not print its URL: {line!r}")
        self.root_url = match.group(0)
        return self

    def stats(self) -> dict[str, Any]:
        """``GET /_emulator/stats``."""
        with _OPENER.open(self.root_url + "/_emulator/stats", timeout=10) as reply:
            data: dict[str, Any] = json.loads(reply.read())
        return data

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def __enter__(self) -> EmulatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------- measured children


@dataclass(kw_only=True)
class Measured:
    """A finished child: exit code, wall seconds, its own CPU seconds and peak RSS."""

    command: list[str]
    returncode: int
    wall: float
    user: float
    system: float
    maxrss_mb: float
    stdout: str
    stderr: str

    @property
    def cpu(self) -> float:
        return self.user + self.system

    def json(self) -> dict[str, Any]:
        """The last line of stdout that parses as a JSON object."""
        for line in reversed(self.stdout.splitlines()):
            line = line.strip()
            if line.startswith("{"):
                try:
                    value = json.loads(line)
                except ValueError:
                    continue
                if isinstance(value, dict):
                    return value
        raise BenchError(f"no JSON on stdout of {shown(self.command)}: {self.stderr[-800:]}")

    def check(self, *ok: int) -> Measured:
        if self.returncode not in (ok or (0,)):
            raise BenchError(
                f"{shown(self.command)} exited {self.returncode}: {self.stderr[-1500:]}"
            )
        return self


def shown(command: Sequence[str]) -> str:
    """A command as a user would type it, with this repository's paths made relative."""
    text = " ".join(command)
    return text.replace(str(ROOT) + "/", "").replace(str(Path(PYTHON).parent) + "/", "")


class Child:
    """A started child process whose rusage is collected with ``wait4`` (its own, not ours)."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        cwd: Path,
        env: dict[str, str] | None = None,
        stdout: Path,
        stderr: Path,
    ) -> None:
        self.command = list(command)
        self._stdout_path = stdout
        self._stderr_path = stderr
        self._out = stdout.open("wb")
        self._err = stderr.open("wb")
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            self.command,
            cwd=cwd,
            env=env if env is not None else child_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._err,
        )
        self.result: Measured | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> Measured | None:
        """The result once the child has exited, else None (never blocks)."""
        if self.result is not None:
            return self.result
        pid, status, usage = os.wait4(self.pid, os.WNOHANG)
        if pid == 0:
            return None
        return self._finish(status, usage)

    def _finish(self, status: int, usage: Any) -> Measured:
        wall = time.perf_counter() - self.started
        code = os.waitstatus_to_exitcode(status)
        self.process.returncode = code  # reaped here; Popen must not wait for it again
        self._out.close()
        self._err.close()
        self.result = Measured(
            command=self.command,
            returncode=code,
            wall=wall,
            user=usage.ru_utime,
            system=usage.ru_stime,
            maxrss_mb=usage.ru_maxrss / 1024.0,
            stdout=self._stdout_path.read_text(errors="replace"),
            stderr=self._stderr_path.read_text(errors="replace"),
        )
        return self.result

    def wait(self, timeout: float, *, every: float = 0.005) -> Measured:
        """Wait for the child; kill it and raise :class:`BenchError` after ``timeout``."""
        deadline = self.started + timeout
        while True:
            result = self.poll()
            if result is not None:
                return result
            if time.perf_counter() > deadline:
                self.kill()
                raise BenchError(f"{shown(self.command)} took more than {timeout:.0f} s: killed")
            time.sleep(every)

    def interrupt(self) -> None:
        if self.result is None:
            self.process.send_signal(signal.SIGINT)

    def kill(self) -> None:
        if self.result is None:
            self.process.kill()
            _, status, usage = os.wait4(self.pid, 0)
            self._finish(status, usage)


def run_measured(
    command: Sequence[str],
    *,
    cwd: Path,
    timeout: float,
    logs: Path,
    env: dict[str, str] | None = None,
) -> Measured:
    """Run ``command`` to its end; stdout and stderr go to ``logs``.out / ``logs``.err."""
    logs.parent.mkdir(parents=True, exist_ok=True)
    child = Child(
        command,
        cwd=cwd,
        env=env,
        stdout=logs.with_suffix(".out"),
        stderr=logs.with_suffix(".err"),
    )
    return child.wait(timeout)
