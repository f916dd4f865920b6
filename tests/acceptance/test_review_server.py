"""``batcher review`` over raw HTTP: writes need the token, only files under the run folder are
served (no path escapes, no symlink escapes, no other Host), marks land in the job table and
survive a restart, and metadata.jsonl carries them once the server stops."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from batcher.emulator import EmulatorConfig, EmulatorThread
from tests.support import batcher_cmd, run_args, run_cli
from tests.support_review import review_server

KEY = "sk-review-server-tests-9d2"
BASE_ROWS = [
    "id,prompt,size,seed,output",
    *(f"p{i},A photo of lamp {i},512*512,{i},lamps/p{i}.png" for i in range(4)),
    "茶壶,青花瓷茶壶,512*512,9,茶具/茶壶.png",
]


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorThread]:
    """One emulator for the module: a run folder keeps to the endpoint that made its images."""
    cfg = EmulatorConfig(latency="100", rps=100_000.0, seed=2, api_key=KEY)
    with EmulatorThread(cfg) as emu:
        yield emu


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory, emulator: EmulatorThread) -> Path:
    tmp = tmp_path_factory.mktemp("review")
    manifest = tmp / "m.csv"
    manifest.write_text("\n".join(BASE_ROWS) + "\n", encoding="utf-8")
    r = run_cli(*run_args(manifest, tmp / "run", emulator.base_url), env={"DASHSCOPE_API_KEY": KEY})
    assert r.returncode == 0, r.stderr
    return tmp / "run"


@pytest.fixture
def run(base_run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(base_run, dest)
    return dest


def review_of(db: Path, job_id: str) -> tuple[str | None, str | None]:
    con = sqlite3.connect(db)
    try:
        return con.execute(
            "SELECT review, review_note FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
    finally:
        con.close()


def test_writes_without_the_token_are_refused(run: Path) -> None:
    with review_server(run) as server:
        assert server.url.startswith("http://127.0.0.1:") and len(server.token) >= 20
        body = {"id": "p1", "review": "approved"}
        for token in (None, "", "wrong-token", server.token[:-1]):
            status, text = server.request("POST", "/api/review", body, token=token)
            assert status == 403, (token, text)
            assert b"token" in text
        status, _ = server.request("POST", "/api/note", {"id": "p1", "note": "x"})
        assert status == 403
        assert review_of(run / "batcher.db", "p1") == (None, None)
        server.mark("p1", "approved")
        status, _ = server.request(
            "POST", "/api/note", {"id": "p1", "note": "<b>nice</b> 好"}, token=server.token
        )
        assert status == 200
        assert review_of(run / "batcher.db", "p1") == ("approved", "<b>nice</b> 好")
        # bad requests are refused with a reason, not a crash
        status, text = server.request(
            "POST", "/api/review", {"id": "p1", "review": "maybe"}, token=server.token
        )
        assert status == 400 and b"review must be" in text
        status, text = server.request(
            "POST", "/api/review", {"id": "nope", "review": "approved"}, token=server.token
        )
        assert status == 404 and b"nope" in text


def test_only_files_under_the_run_folder_are_served(run: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the browser")
    (run / "images" / "lamps" / "link.png").symlink_to(secret)
    (run / "images" / "outside").symlink_to(tmp_path, target_is_directory=True)
    with review_server(run) as server:
        assert server.request("GET", "/")[0] == 200
        assert server.request("GET", "/images/lamps/p1.png")[0] == 200
        assert server.request("GET", "/images/%E8%8C%B6%E5%85%B7/%E8%8C%B6%E5%A3%B6.png")[0] == 200
        assert server.request("GET", "/data/summary.js")[0] == 200
        for path in (
            "/batcher.db",
            "/../batcher.db",
            "/images/../batcher.db",
            "/images/%2e%2e/batcher.db",
            "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
            "/images/..%2f..%2fbatcher.db",
            "/history/../../secret.txt",
            "/images/lamps/link.png",
            "/images/outside/secret.txt",
            "/..%5c..%5cbatcher.db",
            "/.lock",
            "/images/lamps/",
        ):
            status, body = server.request("GET", path)
            assert status in (400, 403, 404), (path, status)
            assert b"not for the browser" not in body and b"SQLite" not in body, path
        # a page on another host name (DNS rebinding) is not answered
        status, _ = server.request("GET", "/", host="attacker.example:80")
        assert status == 403


def test_marks_survive_a_restart_and_reach_status_export_and_metadata(run: Path) -> None:
    with review_server(run) as server:
        server.mark("p2", "rejected")
        server.mark("茶壶", "approved")
    status = run_cli("status", run)
    assert "reviewed: 1 approved, 1 rejected" in status.stdout
    lines = (run / "images" / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    marks = {json.loads(x)["id"]: json.loads(x)["review"] for x in lines}
    assert marks == {"p0": "", "p1": "", "p2": "rejected", "p3": "", "茶壶": "approved"}
    with review_server(run) as server:
        status_code, body = server.request("GET", "/api/changes?since=0")
        assert status_code == 200
        jobs = {j["id"]: j for j in json.loads(body)["jobs"]}
        assert jobs["p2"]["review"] == "rejected" and jobs["茶壶"]["review"] == "approved"
        server.mark("p2", None)
    exported = run_cli("export", run, "--format", "csv")
    assert exported.returncode == 0
    records = {r["id"]: r for r in csv.DictReader(io.StringIO(exported.stdout))}
    assert (records["p2"]["review"], records["茶壶"]["review"]) == ("", "approved")
    assert review_of(run / "batcher.db", "p2") == (None, None)


def test_a_run_folder_that_is_not_one_is_refused_in_one_line(tmp_path: Path) -> None:
    r = run_cli("review", tmp_path, "--port", "0")
    assert r.returncode == 2
    assert (
        r.stderr.strip()
        == f"batcher: error: {tmp_path} is not a batcher run folder (no batcher.db)"
    )


def test_a_mark_while_a_run_writes_the_same_folder(
    run: Path, tmp_path: Path, emulator: EmulatorThread
) -> None:
    """The server and a run share the database: marks go in between the run's writes, the
    run finishes as usual, and the changes endpoint shows the new images as they land."""
    manifest = tmp_path / "m.csv"  # the folder's manifest with 20 more rows
    rows = BASE_ROWS + [
        f"n{i:02d},A photo of bowl {i},512*512,{i},bowls/n{i:02d}.png" for i in range(20)
    ]
    manifest.write_text("\n".join(rows) + "\n", encoding="utf-8")
    emu = emulator
    with review_server(run) as server:
        _, body = server.request("GET", "/api/changes")
        since = json.loads(body)["since"]
        env = {k: v for k, v in os.environ.items() if k != "DASHSCOPE_API_KEY"}
        with subprocess.Popen(
            batcher_cmd(*run_args(manifest, run, emu.base_url, "--rps", "10")),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**env, "DASHSCOPE_API_KEY": KEY},
        ) as proc:
            try:
                seen: set[str] = set()
                marked = 0
                target = ""
                deadline = time.monotonic() + 60
                while proc.poll() is None and time.monotonic() < deadline:
                    _, body = server.request("GET", f"/api/changes?since={since}")
                    payload = json.loads(body)
                    since = payload["since"]
                    seen |= {j["id"] for j in payload["jobs"] if j["state"] == "done"}
                    if seen and proc.poll() is None:
                        target = target or sorted(seen)[0]
                        server.mark(target, "approved" if marked % 2 else "rejected")
                        marked += 1
                    time.sleep(0.2)
                _, err = proc.communicate(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
        assert proc.returncode == 0, err
        assert marked >= 2, "no mark was made while the run was writing"
        _, body = server.request("GET", f"/api/changes?since={since}")
        seen |= {j["id"] for j in json.loads(body)["jobs"] if j["state"] == "done"}
    assert {f"n{i:02d}" for i in range(20)} <= seen
    con = sqlite3.connect(run / "batcher.db")
    try:
        states = dict(con.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
        (marks,) = con.execute("SELECT count(*) FROM jobs WHERE review IS NOT NULL").fetchone()
    finally:
        con.close()
    assert states == {"done": 25} and marks == 1
