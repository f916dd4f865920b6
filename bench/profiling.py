"""Profiles for missed goals: ``py-spy record`` around a command, summarised as shares.

The summary names functions (``name (file)``, the line numbers folded away) with two shares
of the samples: *self* (the function was on top of the stack, shown with its line: a thread
waiting in ``queue.get`` and one running SQLite differ only by the line) and *inclusive* (it
was anywhere on it, counted once per sample). Paths are shortened: this repository's files
relative to its root, third-party ones relative to ``site-packages``.

Three ways to sample (``mode``):

* ``gil``: only the thread holding the GIL, i.e. where the Python CPU goes;
* ``wall``: every thread, idle ones included; pair it with ``thread="main"`` (stacks rooted in
  the script's ``<module>``) to see where the main thread's wall-clock time goes, waits
  included, or ``thread="other"`` for the helper threads (aiosqlite's, anyio's workers);
  with ``subprocesses`` (py-spy follows child processes), ``thread="readahead"`` keeps the
  process that reads a big manifest (``jobs.readahead``), which the other two then leave out;
* ``active``: every thread's non-idle samples.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .common import ROOT, BenchError, child_env, shown

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")
_MODES = {
    "gil": "only the thread holding the GIL: where the Python CPU goes",
    "wall": "wall clock, idle samples included",
    "active": "every thread's active samples",
}


def pyspy_binary() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


@dataclass(kw_only=True)
class Profile:
    command: str
    samples: int
    rate: int
    mode: str
    thread: str
    self_share: list[tuple[str, float]]
    inclusive_share: list[tuple[str, float]]
    raw_path: Path

    def markdown(self, title: str, *, top: int = 12) -> str:
        which = {
            "main": ", main thread only",
            "other": ", helper threads only",
            "readahead": ", the manifest-reading process only",
        }.get(self.thread, "")
        seconds = self.samples / self.rate
        lines = [
            f"**Profile: {title}** (py-spy {self.rate} Hz, {self.samples} samples = "
            f"{seconds:.1f} s, {_MODES[self.mode]}{which})",
            "",
            f"    {self.command}",
            "",
            "| inclusive | function |",
            "|---|---|",
        ]
        lines += [f"| {s:5.1%} | `{f}` |" for f, s in self.inclusive_share[:top]]
        lines += ["", "| self | function |", "|---|---|"]
        lines += [f"| {s:5.1%} | `{f}` |" for f, s in self.self_share[: max(6, top // 2)]]
        lines += ["", f"Raw folded stacks: `{self.raw_path.relative_to(ROOT)}`"]
        return "\n".join(lines)

    def share(self, needle: str) -> float:
        """The inclusive share of the first function whose name contains ``needle``."""
        for name, value in self.inclusive_share:
            if needle in name:
                return value
        return 0.0


def _short(file: str) -> str:
    if "site-packages/" in file:
        return file.split("site-packages/", 1)[1]
    root = str(ROOT) + "/"
    if file.startswith(root):
        return file[len(root) :]
    if "/lib/python3" in file:
        return "stdlib/" + file.rsplit("/", 1)[-1]
    return file


def _frame_name(frame: str, *, line: bool = False) -> str:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    where = _short(match.group("file"))
    if line and match.group("line"):
        where += f":{match.group('line')}"
    return f"{match.group('func')} ({where})"


# Frames that only say "this stack is an inner part of the event loop": not useful in a summary.
_NOISE = (
    "<module> (",
    "run (anyio/_core/_eventloop.py)",
    "AsyncIOBackend.run (",
    "Runner.run (asyncio/runners.py)",
    "BaseEventLoop.run_until_complete",
    "BaseEventLoop.run_forever",
    "Thread._bootstrap",
    "Thread.run (threading.py)",
    "main (batcher/cli.py)",
    "_dispatch (batcher/cli.py)",
    "BaseEventLoop._run_once",
    "Handle._run (",
    "AsyncIOBackend.run.<locals>.wrapper",
    "_find_and_load_unlocked",
    "_load_unlocked",
    "_LoaderBasics.exec_module",
    "_call_with_frames_removed",
    "_handle_fromlist",
)


def summarise(raw: Path, *, command: str, rate: int, mode: str, thread: str = "all") -> Profile:
    """Fold a py-spy ``--format raw`` file into self and inclusive shares."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        while stack.startswith("process "):  # the process, then its parent's child, ...
            # py-spy names a process by its command line, which may hold ";" (python -c code)
            stack = stack[stack.find('";') + 2 :] if '";' in stack else ""
        parts = [f for f in stack.split(";") if f and not f.startswith(("thread (", "process "))]
        if not parts:
            continue
        is_main = parts[0].startswith("<module> (")
        is_reader = any("_helper_main (" in f for f in parts)
        if thread == "readahead":
            if not is_reader:
                continue
        elif is_reader or (thread == "main" and not is_main) or (thread == "other" and is_main):
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in parts]
        total += count
        own[_frame_name(parts[-1], line=True)] += count
        for name in set(frames):
            if not name.startswith(_NOISE):
                inclusive[name] += count
    if total == 0:
        raise BenchError(f"py-spy recorded no samples in {raw} ({thread} threads)")

    def shares(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, n / total) for name, n in counter.most_common(60)]

    return Profile(
        command=command,
        samples=total,
        rate=rate,
        mode=mode,
        thread=thread,
        self_share=shares(own),
        inclusive_share=shares(inclusive),
        raw_path=raw,
    )


def start(
    command: Sequence[str],
    *,
    out: Path,
    cwd: Path,
    rate: int = 200,
    mode: str = "gil",
    env: dict[str, str] | None = None,
    subprocesses: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``command`` under ``py-spy record`` (its own process group); see :func:`record`.

    ``subprocesses``: sample the command's child processes too."""
    binary = pyspy_binary()
    if binary is None:
        raise BenchError("py-spy is not installed in this environment")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    spy = [binary, "record", "--rate", str(rate), "--format", "raw", "--output", str(out)]
    if mode == "gil":
        spy.append("--gil")
    elif mode == "wall":
        spy += ["--idle", "--threads"]
    if subprocesses:
        spy.append("--subprocesses")
    spy += ["--", *command]
    return subprocess.Popen(
        spy,
        cwd=cwd,
        env=env if env is not None else child_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # py-spy and the profiled child: one group to stop on timeout
    )


def profiled_pid(spy: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """The pid of the command py-spy started (its child)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{spy.pid}/task/{spy.pid}/children").read_text().split()
        except OSError:
            children = []
        if children:
            return int(children[0])
        time.sleep(0.005)
    raise BenchError("py-spy started no child")


def finish(spy: subprocess.Popen[bytes], out: Path, command: Sequence[str], timeout: float) -> Path:
    """Wait for py-spy to end (killing its group after ``timeout``); the raw stacks."""
    try:
        spy.wait(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        os.killpg(spy.pid, signal.SIGKILL)
        spy.wait(timeout=10)
        raise BenchError(f"profiling {shown(command)} took more than {timeout:.0f} s") from exc
    if not out.exists():
        raise BenchError(f"py-spy wrote no profile for {shown(command)}")
    return out


def record(
    command: Sequence[str],
    *,
    out: Path,
    cwd: Path,
    timeout: float,
    rate: int = 200,
    mode: str = "gil",
    env: dict[str, str] | None = None,
    subprocesses: bool = False,
) -> Path:
    """Run ``command`` under ``py-spy record``; the raw folded stacks (see :func:`summarise`)."""
    spy = start(command, out=out, cwd=cwd, rate=rate, mode=mode, env=env, subprocesses=subprocesses)
    return finish(spy, out, command, timeout)


def profile(
    command: Sequence[str],
    *,
    out: Path,
    cwd: Path,
    timeout: float,
    rate: int = 200,
    mode: str = "gil",
    thread: str = "all",
) -> Profile:
    """:func:`record` then :func:`summarise`."""
    raw = record(command, out=out, cwd=cwd, timeout=timeout, rate=rate, mode=mode)
    return summarise(raw, command=shown(command), rate=rate, mode=mode, thread=thread)
