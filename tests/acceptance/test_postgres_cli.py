"""The real CLI with the run's table in a real PostgreSQL (``--db``), against the emulator:
one worker, two workers on one run, one of two killed with SIGKILL, and workers sharing an
account's quota (one lane, then two) through the schedule in the database."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from batcher.emulator import EmulatorConfig, EmulatorThread
from tests.pgsupport import fresh, query
from tests.support import REPO, batcher_cmd, run_args, run_cli
from tests.support_review import review_server

# measures rates, quotas or elapsed time: run alone (see tests/conftest.py)
pytestmark = pytest.mark.serial

KEY = "sk-acceptance-pg-5a1c"


def manifest(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "m.csv"
    rows = ["id,prompt,size,seed"]
    rows += [f"q{i:03d},产品照片 item {i},512*512,{i}" for i in range(n)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def db() -> str:
    return fresh()


def start(m: Path, out: Path, base_url: str, db: str, *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "BATCHER_DATABASE_URL"}
    env["DASHSCOPE_API_KEY"] = KEY
    return subprocess.Popen(
        batcher_cmd(*run_args(m, out, base_url, "--db", db, *extra)),
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def check_done(db: str, out: Path, n: int, *, after_kill: bool = False) -> None:
    """Every job done once, each image in place with the recorded hash; no temporary file
    left over (but a killed worker's, too young for a shared run to sweep)."""
    rows = query(db, "SELECT id, state, output, sha256 FROM jobs ORDER BY seq")
    assert len(rows) == n
    assert {r["state"] for r in rows} == {"done"}, [r for r in rows if r["state"] != "done"]
    for r in rows:
        data = (out / "images" / r["output"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["sha256"]
    assert after_kill or not list((out / "images").rglob("*.part"))
    assert not (out / "batcher.db").exists()  # the table is in PostgreSQL only
    lines = (out / "images" / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == sorted(r["id"] for r in rows)


def test_plan_run_status_export_retry_with_db(tmp_path: Path, db: str) -> None:
    m = manifest(tmp_path, 10)
    out = tmp_path / "out"
    cfg = EmulatorConfig(latency="0", rps=100_000.0, seed=1, api_key=KEY)
    with EmulatorThread(cfg) as emu:
        plan = run_cli("plan", m, "--out", out, "--db", db, "--json")
        assert plan.returncode == 0, plan.stderr
        r = run_cli(
            *run_args(m, out, emu.base_url, "--db", db, "--json"), env={"DASHSCOPE_API_KEY": KEY}
        )
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["done"] == 10
        assert emu.stats()["images_billed"] == 10
    check_done(db, out, 10)
    # the environment variable stands for --db
    status = run_cli("status", out, "--json", env={"BATCHER_DATABASE_URL": db})
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["done"] == 10
    export = run_cli("export", out, "--db", db, "--format", "csv")
    assert export.returncode == 0, export.stderr
    assert len(export.stdout.strip().splitlines()) == 11 and "产品照片 item 3" in export.stdout
    retry = run_cli("retry", out, "--db", db)
    assert retry.returncode == 0 and "0 failed jobs" in retry.stdout, retry.stdout
    # the report, rebuilt from the table (the run wrote one; a new folder shows the rebuild)
    report = run_cli("report", out, "--db", db, "-o", tmp_path / "again")
    assert report.returncode == 0, report.stderr
    again = tmp_path / "again"
    assert "产品照片 item 3" in (again / "data" / "jobs-000.js").read_text(encoding="utf-8")
    assert len(list((again / "thumbs").iterdir())) == 10  # a thumbnail of each image
    # without --db, the URL the folder remembers
    bare = run_cli("status", out, "--json", env={"BATCHER_DATABASE_URL": ""})
    assert bare.returncode == 0 and json.loads(bare.stdout)["done"] == 10, bare.stderr


def test_review_and_redo_with_db(tmp_path: Path, db: str) -> None:
    """A PostgreSQL run reviewed, its rejected image redone and made again, each command
    given --db (the folder holds the images, the table is in the database)."""
    m = manifest(tmp_path, 6)
    out = tmp_path / "out"
    cfg = EmulatorConfig(latency="0", rps=100_000.0, seed=3, api_key=KEY)
    env = {"DASHSCOPE_API_KEY": KEY}
    with EmulatorThread(cfg) as emu:
        r = run_cli(*run_args(m, out, emu.base_url, "--db", db), env=env)
        assert r.returncode == 0, r.stderr
        old = (out / "images" / "q003.png").read_bytes()
        with review_server(out, "--db", db) as review:
            assert review.mark("q003", "rejected")["review"] == "rejected"
            status, page = review.request("GET", "/")
            assert status == 200 and b"<html" in page.lower()
        [row] = query(db, "SELECT review, seed FROM jobs WHERE id = 'q003'")
        assert row["review"] == "rejected"
        lines = (out / "images" / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
        marks = {json.loads(x)["id"]: json.loads(x).get("review") for x in lines}
        assert marks["q003"] == "rejected" and not marks["q002"]
        dry = run_cli("redo", out, "--rejected", "--dry-run", "--db", db)
        assert dry.returncode == 0 and "would redo 1 job" in dry.stdout, dry.stdout + dry.stderr
        redo = run_cli("redo", out, "--rejected", "--db", db)
        assert redo.returncode == 0 and "1 job back to pending" in redo.stdout, redo.stderr
        [after] = query(db, "SELECT state, seed FROM jobs WHERE id = 'q003'")
        assert after["state"] == "pending" and after["seed"] != row["seed"]
        assert not (out / "images" / "q003.png").exists()
        assert [p.read_bytes() for p in (out / "history").rglob("q003*.png")] == [old]
        billed = emu.stats()["images_billed"]
        again = run_cli(*run_args(m, out, emu.base_url, "--db", db), env=env)
        assert again.returncode == 0, again.stderr
        assert emu.stats()["images_billed"] == billed + 1  # the redone job only
    check_done(db, out, 6)
    # a folder with neither batcher.db nor a remembered database: one clear line
    for args in (("redo", tmp_path, "--rejected"), ("review", tmp_path, "--port", "0")):
        bare = run_cli(*args, env={"BATCHER_DATABASE_URL": ""})
        assert bare.returncode == 2 and bare.stderr.count("\n") == 1, bare.stderr


def test_the_folder_remembers_its_database(tmp_path: Path, db: str) -> None:
    """A run made with --db keeps the URL (never its password) in the folder: a later
    command without --db (another host that forgot it) works on the same table instead of
    starting an empty batcher.db beside it and paying for every image again."""
    m = manifest(tmp_path, 4)
    out = tmp_path / "out"
    user, at, rest = db.partition("://")[2].rpartition("@")
    secret = f"postgresql://{user or 'postgres'}:hunter2-secret@{rest}" if at else db
    assert run_cli("plan", m, "--out", out, "--db", secret).returncode == 0
    marker = (out / "batcher.database").read_text(encoding="utf-8")
    assert "hunter2" not in marker and marker.strip().endswith(db.rpartition("/")[2])
    cfg = EmulatorConfig(latency="0", rps=100_000.0, seed=4, api_key=KEY)
    with EmulatorThread(cfg) as emu:
        r = run_cli(
            *run_args(m, out, emu.base_url, "--json"),
            env={"DASHSCOPE_API_KEY": KEY, "BATCHER_DATABASE_URL": ""},
        )
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["done"] == 4 and emu.stats()["images_billed"] == 4
    assert not (out / "batcher.db").exists()
    check_done(db, out, 4)
    status = run_cli("status", out, "--json", env={"BATCHER_DATABASE_URL": ""})
    assert status.returncode == 0 and json.loads(status.stdout)["done"] == 4, status.stderr
    for fmt in ("csv", "webdataset"):  # the lean WebDataset path reads SQLite only
        exported = run_cli("export", out, "--format", fmt, "-o", tmp_path / f"x.{fmt}")
        assert exported.returncode == 0, exported.stderr
    # another database for this folder: refused before anything is opened or written
    other = db.rpartition("/")[0] + "/batcher_no_such_database"
    mixed = run_cli("run", m, "--out", out, "--db", other, env={"DASHSCOPE_API_KEY": KEY})
    assert mixed.returncode == 2 and mixed.stderr.count("\n") == 1, mixed.stderr
    assert "belongs to the run in database" in mixed.stderr
    # a folder with a table of its own is not also given one in PostgreSQL
    own = tmp_path / "own"
    assert run_cli("plan", m, "--out", own).returncode == 0
    refused = run_cli("plan", m, "--out", own, "--db", db)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "batcher.db" in refused.stderr and not (own / "batcher.database").exists()
    # BATCHER_DATABASE_URL is a default: a folder with its own batcher.db keeps to it, and
    # one whose run is in another database is not redirected to the variable's
    own_status = run_cli("status", own, "--json", env={"BATCHER_DATABASE_URL": db})
    assert own_status.returncode == 0, own_status.stderr
    assert json.loads(own_status.stdout)["pending"] == 4
    assert run_cli("plan", m, "--out", own, env={"BATCHER_DATABASE_URL": db}).returncode == 0
    elsewhere = run_cli("status", out, env={"BATCHER_DATABASE_URL": other})
    assert elsewhere.returncode == 2 and elsewhere.stderr.count("\n") == 1, elsewhere.stderr
    assert "BATCHER_DATABASE_URL names database" in elsewhere.stderr
    # a damaged marker: one line naming the file
    (out / "batcher.database").write_text("mysql://x\n", encoding="utf-8")
    bad = run_cli("status", out, env={"BATCHER_DATABASE_URL": ""})
    assert bad.returncode == 2 and "batcher.database, line 1" in bad.stderr, bad.stderr


def test_bad_database_urls_are_one_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    base = os.environ.get("BATCHER_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/x")
    missing = base.rpartition("/")[0] + "/batcher_no_such_database"
    for url, says in (
        ("mysql://u@h/d", "must be a postgresql://"),
        (missing, "create it first"),
        ("postgresql://postgres@127.0.0.1:1/x", "cannot reach the job database"),
    ):
        r = run_cli("status", out, "--db", url)
        assert r.returncode != 0, url
        assert r.stderr.startswith("batcher: ") and r.stderr.count("\n") == 1, r.stderr
        assert says in r.stderr and "Traceback" not in r.stderr


def test_two_workers_share_one_run_and_generate_nothing_twice(tmp_path: Path, db: str) -> None:
    n = 80
    m = manifest(tmp_path, n)
    out = tmp_path / "out"
    cfg = EmulatorConfig(latency="60", rps=100_000.0, seed=2, api_key=KEY)
    with EmulatorThread(cfg) as emu:
        assert run_cli("plan", m, "--out", out, "--db", db).returncode == 0
        workers = [start(m, out, emu.base_url, db, "--concurrency", "4") for _ in range(2)]
        results = [w.communicate(timeout=100) for w in workers]
        for w, (_, err) in zip(workers, results, strict=True):
            assert w.returncode == 0, err
        stats = emu.stats()
    assert stats["images_billed"] == n and stats["duplicate_billed"] == 0, stats
    check_done(db, out, n)
    by_worker = query(db, "SELECT count(DISTINCT worker) AS n FROM jobs")[0]["n"]
    assert by_worker == 2, "both workers should have taken jobs"
    # Both workers wrote the dataset's metadata and the report into the one folder, each
    # under temporary names of its own: every job is listed once, no temporary file is left.
    for r in results:
        assert "could not update" not in r[1], r[1]
    lines = (out / "images" / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == [f"q{i:03d}" for i in range(n)]
    assert not [p for p in out.rglob(".*.part")], list(out.rglob(".*.part"))


def test_a_killed_worker_s_jobs_are_finished_by_the_other_after_its_lease(
    tmp_path: Path, db: str
) -> None:
    n = 40
    m = manifest(tmp_path, n)
    out = tmp_path / "out"
    lease = "3"
    cfg = EmulatorConfig(latency="400", rps=100_000.0, seed=3, api_key=KEY)
    with EmulatorThread(cfg) as emu:
        assert run_cli("plan", m, "--out", out, "--db", db).returncode == 0
        doomed = start(m, out, emu.base_url, db, "--concurrency", "4", "--lease", lease)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until it holds jobs and has finished some
            rows = query(db, "SELECT state, count(*) AS n FROM jobs GROUP BY state")
            counts = {r["state"]: r["n"] for r in rows}
            if counts.get("done", 0) >= 2 and counts.get("running", 0) >= 1:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"the first worker never got going: {counts}")
        doomed.send_signal(signal.SIGKILL)
        doomed.communicate(timeout=30)
        survivor = start(m, out, emu.base_url, db, "--concurrency", "4", "--lease", lease)
        _, err = survivor.communicate(timeout=100)
        assert survivor.returncode == 0, err
        stats = emu.stats()
    check_done(db, out, n, after_kill=True)
    # nothing generated twice beyond the dead worker's calls in flight (--concurrency 4)
    assert stats["duplicate_billed"] <= 4, stats
    assert stats["images_billed"] - stats["duplicate_billed"] == n


def test_three_workers_on_one_account_keep_to_its_quota_together(tmp_path: Path, db: str) -> None:
    """Three workers told the account's quota share one schedule in the database: together
    they send at the quota, not three times it, and are (almost) never throttled."""
    n, quota = 40, 8.0
    args = ("--rps", str(quota), "--concurrency", "8")
    stats, outputs = shared_run(tmp_path, db, n, quota, *args, workers=3, seed=4)
    runs = [json.loads(o)["this_run"] for o in outputs]
    assert sum(r["done"] for r in runs) == n
    assert sum(r["calls"] > 0 for r in runs) >= 2, runs  # (a late starter may find none left)
    # sharing the schedule badly would meet dozens of 429s; one is allowed on a machine
    # loaded to several times its cores (a send held back reaches the emulator in a burst)
    assert stats["throttled"] <= max(1, stats["generate_requests"] // 100), stats
    # together at most the quota (first to last accepted call at the emulator), and well
    # above what one worker pacing alone at a third of it would give; how near the quota
    # they keep is measured by bench/workers_shared.py (a busy machine's late sends are
    # given back, so a test bound near the quota would time the machine, not the schedule)
    accepted = stats["accepted_by_model"]["z-image-turbo"]
    rate = (accepted["requests"] - 1) / (accepted["last"] - accepted["first"])
    assert 0.5 * quota <= rate <= quota * 1.01, (rate, stats)


def test_two_workers_share_each_lane_s_schedule(tmp_path: Path, db: str) -> None:
    """Two lanes (two accounts of quota 4) through two workers: each lane's schedule is shared,
    so together they send near 8 a second, never above either account's quota."""
    n, quota = 32, 4.0
    m = manifest(tmp_path, n)
    out = tmp_path / "out"
    keys = {"LANE_KEY_A": "sk-pg-lane-a-51c0e2", "LANE_KEY_B": "sk-pg-lane-b-9d33f7"}
    accounts = {"a": (keys["LANE_KEY_A"],), "b": (keys["LANE_KEY_B"],)}
    cfg = EmulatorConfig(latency="200", rps=quota, seed=5, accounts=accounts)
    with EmulatorThread(cfg) as emu:
        lanes = tmp_path / "lanes.yaml"
        lanes.write_text(
            "lanes:\n"
            + "".join(
                f"  - name: {x}\n    key_env: LANE_KEY_{x.upper()}\n"
                f"    base_url: {emu.base_url}\n    quota: {quota:g}\n"
                for x in ("a", "b")
            ),
            encoding="utf-8",
        )
        assert run_cli("plan", m, "--out", out, "--db", db).returncode == 0
        env = {k: v for k, v in os.environ.items() if k != "BATCHER_DATABASE_URL"} | keys
        command = batcher_cmd(
            "run", m, "--out", out, "--lanes", lanes, "--db", db, "--no-progress",
            "--concurrency", "8", "--request-timeout", "10", "--backoff-base", "0.01",
            "--start-rps", "1000", "--json",
        )  # fmt: skip
        workers = [
            subprocess.Popen(
                command,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        results = [w.communicate(timeout=100) for w in workers]
        for w, (_, err) in zip(workers, results, strict=True):
            assert w.returncode == 0, err
        stats = emu.stats()
    check_done(db, out, n)
    assert stats["throttled"] <= 1, stats
    lanes_used = query(db, "SELECT lane, count(*) AS n FROM jobs GROUP BY lane ORDER BY lane")
    assert [r["lane"] for r in lanes_used] == ["a", "b"], lanes_used
    accepted = stats["accepted_by_model"]["z-image-turbo"]
    rate = (accepted["requests"] - 1) / (accepted["last"] - accepted["first"])
    assert 0.7 * 2 * quota <= rate <= 2 * quota * 1.01, (rate, stats)


def test_a_worker_that_takes_back_a_dead_worker_s_jobs_sweeps_its_old_temporary_files(
    tmp_path: Path, db: str
) -> None:
    """A shared folder is swept only when a dead worker's expired leases are taken back at
    start, and then only of files nobody has written for two leases: a live worker's own
    temporary file (written a moment ago) stays."""
    n = 6
    m = manifest(tmp_path, n)
    out = tmp_path / "out"
    assert run_cli("plan", m, "--out", out, "--db", db).returncode == 0
    # the dead worker: one job still running under a lease that expired a minute ago
    query(
        db,
        "UPDATE jobs SET state = 'running', claim_token = 'dead', attempts = 1, "
        "lease_expires_at = extract(epoch from clock_timestamp()) - 60 WHERE id = 'q000'",
    )
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    stale, live = images / ".q000.png.0badc0de.part", images / ".q001.png.0fee1e55.part"
    stale.write_bytes(b"half an image")
    live.write_bytes(b"an image being written")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    cfg = EmulatorConfig(latency="0", rps=100_000.0, seed=3, api_key=KEY)
    with EmulatorThread(cfg) as emu:
        worker = start(m, out, emu.base_url, db, "--lease", "30")
        _, err = worker.communicate(timeout=100)
    assert worker.returncode == 0, err
    assert not stale.exists()
    assert live.exists()  # younger than two leases: perhaps a live worker's download
    log = (out / "batcher.log").read_text(encoding="utf-8")
    assert "1 reclaimed (0 with a call sent" in log and "1 partial files removed" in log, log
    assert {r["state"] for r in query(db, "SELECT state FROM jobs")} == {"done"}


def shared_run(
    tmp_path: Path, db: str, n: int, quota: float, *args: str, workers: int = 2, seed: int = 6
) -> tuple[dict[str, Any], list[str]]:
    """``workers`` workers (run with ``args``) on one run of ``n`` jobs against an account
    of ``quota``: the emulator's counters, and each worker's standard output (``--json``)."""
    m = manifest(tmp_path, n)
    out = tmp_path / "out"
    cfg = EmulatorConfig(latency="200", rps=quota, seed=seed, api_key=KEY)
    with EmulatorThread(cfg) as emu:
        assert run_cli("plan", m, "--out", out, "--db", db).returncode == 0
        running = [start(m, out, emu.base_url, db, *args, "--json") for _ in range(workers)]
        results = [w.communicate(timeout=100) for w in running]
        for w, (_, err) in zip(running, results, strict=True):
            assert w.returncode == 0, err
        stats: dict[str, Any] = emu.stats()
    check_done(db, out, n)
    return stats, [o for o, _ in results]


def told(rps: str) -> tuple[str, ...]:
    """A worker told ``--rps rps``, slow start as a user gets it (``--start-rps`` at its
    default)."""
    return ("--rps", rps, "--start-rps", "2")


def test_a_stated_quota_starts_near_it_not_at_the_published_one(tmp_path: Path, db: str) -> None:
    """Told 10/s (a raised quota), the shared schedule starts at its head start (8/s), not at
    the published 2/s: the first second already holds several sends, and none is throttled."""
    stats, _ = shared_run(tmp_path, db, 30, 10.0, *told("10"))
    assert stats["throttled"] <= 1, stats  # a busy machine may send one late
    sends = [r["at"] for r in query(db, "SELECT at FROM quota_sends ORDER BY at")]
    first_second = [t for t in sends if t < sends[0] + 1.0]
    assert len(first_second) >= 6, sends  # slow start from 2/s: 2


def test_a_head_start_over_the_real_quota_costs_a_handful_of_429s(tmp_path: Path, db: str) -> None:
    """Told 1000/s against a 2/s quota: the head start (8/s, unproven) meets the quota at once;
    the first 429 brings the schedule down to the window's estimate, so the run sees a handful
    of 429s, not a storm, and keeps to the quota after."""
    n = 16
    stats, _ = shared_run(tmp_path, db, n, 2.0, *told("1000"))
    assert stats["throttled"] <= 6, stats
    assert stats["images_billed"] == n
    accepted = stats["accepted_by_model"]["z-image-turbo"]
    rate = (accepted["requests"] - 1) / (accepted["last"] - accepted["first"])
    assert rate <= 2 * 1.01, (rate, stats)
