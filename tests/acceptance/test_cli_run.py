"""The real CLI in a subprocess against the emulator on loopback, as a user would run it."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from batcher.emulator import EmulatorConfig, EmulatorThread
from tests.support import REPO, batcher_cmd, check_invariants, run_args, run_cli

KEY = "sk-acceptance-7f3b9c2e1d"


def manifest(tmp_path: Path, n: int, name: str = "m.csv") -> Path:
    path = tmp_path / name
    lines = ["id,prompt,size,seed,category"]
    for i in range(n):
        cat = "家具" if i % 2 else "lamps"
        lines.append(f"p{i:03d},A product photo of item {i},512*512,{i},{cat}")
    lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@pytest.fixture
def emulator():
    cfg = EmulatorConfig(latency="0", rps=100_000.0, seed=1, api_key=KEY)
    with EmulatorThread(cfg) as emu:
        yield emu


def env() -> dict[str, str]:
    return {"DASHSCOPE_API_KEY": KEY}


def test_clean_run_status_export_and_rerun(tmp_path, emulator):
    m = manifest(tmp_path, 12)
    out = tmp_path / "out"
    r = run_cli(*run_args(m, out, emulator.base_url, "--json"), env=env())
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["done"] == 12 and summary["exit_code"] == 0
    assert summary["this_run"]["generated"] == 12
    assert check_invariants(out) == {"done": 12}
    assert (out / "images" / "家具" / "p001.png").is_file() or any(
        (out / "images").rglob("p001.png")
    )
    lines = (out / "images" / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 12
    first = json.loads(lines[0])
    assert {"file_name", "prompt", "seed", "size", "request_id"} <= set(first)
    assert (out / "images" / first["file_name"]).is_file()

    status = run_cli("status", out, "--json")
    assert status.returncode == 0
    st = json.loads(status.stdout)
    for key in ("total", "pending", "running", "generated", "done", "failed", "images_billed"):
        assert isinstance(st[key], int)
    assert st["total"] == 12 and st["done"] == 12 and st["images_billed"] == 12

    exported = run_cli("export", out)
    recs = [json.loads(x) for x in exported.stdout.splitlines()]
    assert len(recs) == 12
    need = {
        "id",
        "state",
        "prompt",
        "size",
        "seed",
        "file",
        "request_id",
        "width",
        "height",
        "sha256",
        "attempts",
        "error_code",
        "error_message",
        "cost",
    }
    assert need <= set(recs[0])
    assert all((out / rec["file"]).is_file() for rec in recs)
    csv_path = tmp_path / "jobs.csv"
    assert run_cli("export", out, "--format", "csv", "-o", csv_path).returncode == 0
    assert csv_path.read_text(encoding="utf-8").splitlines()[0].startswith("id,state,model,prompt")

    again = run_cli(*run_args(m, out, emulator.base_url), env=env())
    assert again.returncode == 0
    assert emulator.stats()["generate_requests"] == 12  # nothing called twice

    text = "".join([r.stdout, r.stderr, status.stdout, exported.stdout, again.stderr])
    assert KEY not in text
    for p in out.rglob("*"):
        if p.is_file():
            assert KEY.encode() not in p.read_bytes(), p


def test_version_and_help_name_the_release_and_every_command():
    import batcher

    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout == f"batcher {batcher.__version__}\n"
    helped = run_cli("--help")
    assert helped.returncode == 0
    for command in ("plan", "run", "status", "export", "retry", "redo", "report", "review"):
        assert f"    {command} " in helped.stdout, command


def test_emulate_flag_needs_no_key(tmp_path):
    m = manifest(tmp_path, 4)
    r = run_cli(
        "run",
        m,
        "--out",
        tmp_path / "o",
        "--emulate",
        "--emulate-latency",
        "0",
        "--emulate-rps",
        "1000",
        "--rps",
        "1000",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    assert check_invariants(tmp_path / "o") == {"done": 4}


def test_missing_key_is_one_clear_line(tmp_path):
    r = run_cli("run", manifest(tmp_path, 2), "--out", tmp_path / "o")
    assert r.returncode == 2
    assert "DASHSCOPE_API_KEY" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_wrong_key_stops_with_exit_3_and_never_shows_the_key(tmp_path, emulator):
    wrong = "sk-wrong-4c1d9e77aa"
    r = run_cli(
        *run_args(manifest(tmp_path, 5), tmp_path / "o", emulator.base_url),
        env={"DASHSCOPE_API_KEY": wrong},
    )
    assert r.returncode == 3, r.stderr
    assert "InvalidApiKey" in r.stderr and "DASHSCOPE_API_KEY" in r.stderr
    assert wrong not in r.stdout + r.stderr
    assert wrong.encode() not in (tmp_path / "o" / "batcher.log").read_bytes()
    con = sqlite3.connect(tmp_path / "o" / "batcher.db")
    assert con.execute("SELECT count(*) FROM jobs WHERE state='pending'").fetchone()[0] == 5
    dump = "\n".join(con.iterdump())
    con.close()
    assert wrong not in dump


def test_manifest_error_exit_2_nothing_imported(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,prompt,size\na,fine,512*512\nb,too big,4096*4096\n", encoding="utf-8")
    r = run_cli("plan", bad, "--out", tmp_path / "o")
    assert r.returncode == 2
    assert "bad.csv:3: size:" in r.stderr and "Traceback" not in r.stderr
    if (tmp_path / "o" / "batcher.db").exists():
        con = sqlite3.connect(tmp_path / "o" / "batcher.db")
        assert con.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
        con.close()


def test_budget_stop_exits_4_and_rerun_goes_on(tmp_path, emulator):
    m = manifest(tmp_path, 10)
    out = tmp_path / "o"
    r = run_cli(
        *run_args(m, out, emulator.base_url, "--budget", "0.05", "--concurrency", "1"), env=env()
    )
    assert r.returncode == 4, r.stderr
    assert "budget" in r.stderr
    assert emulator.stats()["images_billed"] == 3  # 3 x 0.015 = 0.045; a 4th would pass 0.05
    r2 = run_cli(*run_args(m, out, emulator.base_url), env=env())
    assert r2.returncode == 0
    assert check_invariants(out) == {"done": 10}
    # the second run appended its 7 images to the first run's 3: each listed once
    lines = (out / "images" / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    names = [json.loads(line)["file_name"] for line in lines]
    assert len(names) == 10 and len(set(names)) == 10


def test_a_second_run_on_the_same_folder_refuses(tmp_path):
    m = manifest(tmp_path, 40)
    out = tmp_path / "o"
    cfg = EmulatorConfig(latency="200", rps=100_000.0, api_key=KEY)
    with EmulatorThread(cfg) as emu:
        first = subprocess.Popen(
            batcher_cmd(*run_args(m, out, emu.base_url, "--concurrency", "2", "--rps", "10")),
            env={**os.environ, **env()},
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.time() + 20
            while emu.stats()["generate_requests"] == 0 and time.time() < deadline:
                time.sleep(0.05)
            second = run_cli(*run_args(m, out, emu.base_url), env=env())
            assert second.returncode == 2
            assert "another batcher run" in second.stderr
        finally:
            first.send_signal(signal.SIGINT)
            first.communicate(timeout=30)


def _start(m, out, url, *extra):
    return subprocess.Popen(
        batcher_cmd(*run_args(m, out, url, *extra)),
        env={**os.environ, **env()},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_done(db: Path, at_least: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if db.exists():
            try:
                con = sqlite3.connect(db, timeout=5)
                n = con.execute("SELECT count(*) FROM jobs WHERE state='done'").fetchone()[0]
                con.close()
                if n >= at_least:
                    return
            except sqlite3.OperationalError:
                pass
        time.sleep(0.05)
    raise AssertionError("the run made no progress")


@pytest.mark.serial  # a race against the run's pace / a bound on elapsed time
def test_kill_9_then_resume_loses_nothing_and_pays_little(tmp_path):
    m = manifest(tmp_path, 40)
    out = tmp_path / "o"
    with EmulatorThread(EmulatorConfig(latency="100", rps=100_000.0, api_key=KEY, seed=4)) as emu:
        p = _start(m, out, emu.base_url, "--concurrency", "4", "--rps", "40")
        _wait_done(out / "batcher.db", 8)
        p.kill()
        p.communicate(timeout=10)
        con = sqlite3.connect(out / "batcher.db")
        states = dict(con.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
        con.close()
        assert states.get("done", 0) < 40
        billed_at_kill = emu.stats()["images_billed"]
        r = run_cli(*run_args(m, out, emu.base_url), env=env())
        assert r.returncode == 0, r.stderr
        # extra generations only for calls that were in flight at the kill (at most 4)
        assert emu.stats()["images_billed"] - 40 <= 4
        assert emu.stats()["images_billed"] >= billed_at_kill
    assert check_invariants(out) == {"done": 40}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_releases_everything_and_exits_130(tmp_path, sig):
    m = manifest(tmp_path, 30)
    out = tmp_path / "o"
    with EmulatorThread(EmulatorConfig(latency="300", rps=100_000.0, api_key=KEY)) as emu:
        p = _start(m, out, emu.base_url, "--concurrency", "3", "--rps", "20", "--grace", "5")
        _wait_done(out / "batcher.db", 3)
        p.send_signal(sig)
        _, err = p.communicate(timeout=30)
        assert p.returncode == 130, err
        assert "interrupted" in err and "Traceback" not in err
        con = sqlite3.connect(out / "batcher.db")
        running = con.execute("SELECT count(*) FROM jobs WHERE state='running'").fetchone()[0]
        con.close()
        assert running == 0
        check_invariants(out)
        r = run_cli(*run_args(m, out, emu.base_url), env=env())
        assert r.returncode == 0
    assert check_invariants(out) == {"done": 30}


@pytest.mark.serial  # a race against the run's pace / a bound on elapsed time
def test_second_interrupt_stops_at_once(tmp_path):
    m = manifest(tmp_path, 10)
    out = tmp_path / "o"
    with EmulatorThread(EmulatorConfig(latency="20000", rps=100_000.0, api_key=KEY)) as emu:
        p = _start(m, out, emu.base_url, "--concurrency", "3", "--grace", "60")
        deadline = time.time() + 20
        while emu.stats()["generate_requests"] < 3 and time.time() < deadline:
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        time.sleep(0.5)
        t0 = time.time()
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
        assert time.time() - t0 < 5
        assert p.returncode == 130, err
    con = sqlite3.connect(out / "batcher.db")
    states = dict(con.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
    con.close()
    assert states == {"pending": 10}


def test_reimport_adds_only_new_rows_and_refuses_changed_ones(tmp_path):
    m = manifest(tmp_path, 5)
    out = tmp_path / "o"
    first = run_cli("plan", m, "--out", out, "--json")
    assert json.loads(first.stdout)["new"] == 5
    again = run_cli("plan", m, "--out", out, "--json")  # unchanged file: not read again
    assert json.loads(again.stdout) | {"new": 0} == json.loads(again.stdout)
    assert json.loads(again.stdout)["total"] == 5
    with m.open("a", encoding="utf-8") as fh:
        fh.write("p999,A new row,512*512,9,lamps\n")
    added = run_cli("plan", m, "--out", out, "--json")
    assert json.loads(added.stdout)["new"] == 1 and json.loads(added.stdout)["total"] == 6
    m.write_text(m.read_text(encoding="utf-8").replace("item 2,", "item two,"), encoding="utf-8")
    changed = run_cli("plan", m, "--out", out)
    assert changed.returncode == 2
    assert "p002" in changed.stderr and "--replace" in changed.stderr
    replaced = run_cli("plan", m, "--out", out, "--replace", "--json")
    assert replaced.returncode == 0 and json.loads(replaced.stdout)["replaced"] == 1
