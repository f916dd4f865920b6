"""A manifest big enough to be read by a helper process (jobs.readahead), through the real CLI:
an error on its last row, Ctrl-C and kill -9 in the middle of its import. Each time the
database is as it was and no helper process is left running.

The helper is found as the CLI's child in /proc (Linux); these tests skip elsewhere.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from jobs.manifest import HELPER_MIN_BYTES
from tests.support import REPO, batcher_cmd, run_cli, whole_db_jobs

pytestmark = pytest.mark.skipif(
    not any(Path("/proc/self/task").glob("*/children")),
    reason="needs /proc/<pid>/task/*/children",
)

PROMPT = "a studio photo of a hand-thrown ceramic teapot on a linen cloth in soft light: item"


def big_csv(path: Path, *, last: str | None = None, helper: bool = True) -> int:
    """``id,prompt,seed`` rows, just over HELPER_MIN_BYTES (or with ``helper=False``, just
    under: read in process); returns the number of rows."""
    shortest, longest = (len(f"job-0000000,{PROMPT} 0000000,{s}\n") for s in (0, 9_999_999))
    n = HELPER_MIN_BYTES // shortest + 1_000 if helper else HELPER_MIN_BYTES // longest - 1_000
    lines = ["id,prompt,seed"] + [f"job-{i:07d},{PROMPT} {i:07d},{i}" for i in range(n)]
    if last is not None:
        lines[-1] = last
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert (path.stat().st_size >= HELPER_MIN_BYTES) == helper
    return n


def job_count(db: Path) -> int:
    con = sqlite3.connect(db)
    try:
        return int(con.execute("SELECT count(*) FROM jobs").fetchone()[0])
    finally:
        con.close()


def children_of(pid: int) -> set[int]:
    found: set[int] = set()
    for listing in Path(f"/proc/{pid}/task").glob("*/children"):
        found |= {int(child) for child in listing.read_text().split()}
    return found


def gone(pid: int, timeout: float = 10) -> bool:
    """Whether process ``pid`` has ended (or is a zombie nobody needs) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return True
        if status.rsplit(")", 1)[1].split()[0] == "Z":
            return True
        time.sleep(0.01)
    return False


def start_plan(manifest: Path, out: Path) -> subprocess.Popen[str]:
    # its own session: a signal to its process group reaches it and its helper, not pytest
    return subprocess.Popen(
        batcher_cmd("plan", manifest, "--out", out, "--json"),
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def helper_under_way(proc: subprocess.Popen[str], written: Path, *, helper: bool = True) -> int:
    """Wait until the import is well under way (pages spill to ``written``: the WAL, or a first
    import's temporary file) with its helper (or with ``helper=False``, without one); returns
    the helper's pid (or 0)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        helpers = children_of(proc.pid)
        if bool(helpers) == helper and size(written) > 1_000_000:
            [pid] = helpers if helper else [0]
            return pid
        if proc.poll() is not None:
            raise AssertionError(f"plan ended (exit {proc.returncode}): {proc.communicate()}")
        time.sleep(0.003)
    raise AssertionError("the import did not get under way")


def test_an_error_on_the_last_row_exits_2_and_imports_nothing(tmp_path: Path) -> None:
    manifest = tmp_path / "big.csv"
    n = big_csv(manifest, last="job-bad,a teapot,seven")
    out = tmp_path / "out"
    result = run_cli("plan", manifest, "--out", out)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"{manifest}:{n + 1}: seed: 'seven' is not a whole number"
    ]
    assert job_count(out / "batcher.db") == 0


@pytest.mark.parametrize(
    ("to_group", "helper"),
    [(False, True), (True, True), (True, False)],
    ids=["to_batcher", "ctrl_c_to_the_group", "ctrl_c_without_a_helper"],
)
def test_ctrl_c_mid_import_exits_130_and_leaves_the_database_as_it_was(
    tmp_path: Path, to_group: bool, helper: bool
) -> None:
    manifest = tmp_path / "big.csv"
    big_csv(manifest, helper=helper)
    out = tmp_path / "out"
    proc = start_plan(manifest, out)
    pid = helper_under_way(proc, out / "batcher.db.tmp", helper=helper)
    if to_group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not helper or gone(pid)
    assert job_count(out / "batcher.db") == 0
    again = run_cli("plan", manifest, "--out", out, "--json")
    assert again.returncode == 0, again.stderr


def test_kill_9_mid_first_import_leaves_no_database_and_no_helper(tmp_path: Path) -> None:
    """A first import is made in ``batcher.db.tmp`` (no journal, no fsync) and linked into
    place whole: killed in the middle, the folder has no ``batcher.db``, and the next plan
    makes it from nothing, the leftover file gone."""
    manifest = tmp_path / "big.csv"
    n = big_csv(manifest)
    out = tmp_path / "out"
    proc = start_plan(manifest, out)
    helper = helper_under_way(proc, out / "batcher.db.tmp")
    proc.kill()
    proc.communicate(timeout=10)
    assert gone(helper)  # its next write to the closed pipe ends it
    assert not (out / "batcher.db").exists()
    assert size(out / "batcher.db.tmp") > 1_000_000  # left as it was: never opened as the db
    status = run_cli("status", out)
    assert status.returncode != 0
    assert "first import" in status.stderr and "Traceback" not in status.stderr
    again = run_cli("plan", manifest, "--out", out, "--json")
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("batcher.db")) == [
        "batcher.db"
    ]
    assert whole_db_jobs(out / "batcher.db") == n
