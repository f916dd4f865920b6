"""``batcher run --lanes``: several keys (emulator accounts), each paced on its own; a lane with
a bad key disabled alone; keys never written anywhere. The real CLI in a subprocess against
the emulator on loopback, with one account per lane."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from batcher.emulator import EmulatorConfig, EmulatorThread
from batcher.pricing import price_per_image
from tests.support import REPO, batcher_cmd, run_cli

# measures rates, quotas or elapsed time: run alone (see tests/conftest.py)
pytestmark = pytest.mark.serial

KEY_A = "sk-lane-a-5d1f0c9e77"
KEY_B = "sk-lane-b-93e2aa41c6"
KEY_BAD = "sk-lane-bad-0b7e31d2f4"


def manifest(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "m.csv"
    rows = ["id,prompt,size,seed"] + [f"j{i:03d},A photo of item {i},512*512,{i}" for i in range(n)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def lanes_file(tmp_path: Path, base_url: str, *, quota: float = 2) -> Path:
    path = tmp_path / "lanes.yaml"
    path.write_text(
        "lanes:\n"
        f"  - name: a\n    key_env: LANE_KEY_A\n    base_url: {base_url}\n    quota: {quota}\n"
        f"  - name: b\n    key_env: LANE_KEY_B\n    base_url: {base_url}\n    quota: {quota}\n",
        encoding="utf-8",
    )
    return path


def run_lanes(m: Path, out: Path, lanes: Path, env: dict[str, str], *extra: str):
    return run_cli(
        "run", m, "--out", out, "--lanes", lanes, "--no-progress", "--request-timeout", "10",
        "--backoff-base", "0.01", *extra, env=env,
    )  # fmt: skip


@pytest.fixture
def accounts():
    """Two accounts of one key each, at z-image-turbo's published 2 requests/s."""
    cfg = EmulatorConfig(latency="0", seed=3, accounts={"acct-a": (KEY_A,), "acct-b": (KEY_B,)})
    with EmulatorThread(cfg) as emu:
        yield emu


def jobs(db: Path) -> list[tuple[str, str | None, int]]:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT state, lane, attempts FROM jobs ORDER BY id").fetchall()


def assert_no_key_anywhere(out: Path, *texts: str) -> None:
    for key in (KEY_A, KEY_B, KEY_BAD):
        for text in texts:
            assert key not in text
        for path in out.rglob("*"):
            if path.is_file():
                assert key.encode() not in path.read_bytes(), path


def test_two_lanes_share_the_run_each_under_its_quota(tmp_path, accounts):
    m, out = manifest(tmp_path, 40), tmp_path / "out"
    lanes = lanes_file(tmp_path, accounts.base_url)
    r = run_lanes(m, out, lanes, {"LANE_KEY_A": KEY_A, "LANE_KEY_B": KEY_B}, "--json")
    assert r.returncode == 0, r.stderr
    rows = jobs(out / "batcher.db")
    assert [state for state, _, _ in rows] == ["done"] * 40
    used = {lane: sum(1 for _, got, _ in rows if got == lane) for lane in ("a", "b")}
    assert used["a"] >= 15 and used["b"] >= 15, used
    # Each lane paces itself under its account's 2/s: a lane pacing at the account's rate
    # twice over would meet dozens of 429s. One is allowed: on a machine loaded to several
    # times its cores, a send can be held back and reach the emulator in a burst.
    throttled = accounts.stats()["throttled"]
    assert throttled <= 1
    summary = json.loads(r.stdout)["this_run"]["lanes"]
    assert sum(summary[lane]["throttled"] for lane in ("a", "b")) == throttled
    for lane in ("a", "b"):
        figures = summary[lane]
        rate = figures["models"]["z-image-turbo"]["calls_per_second"]
        assert 1.5 <= rate <= 2.0, (lane, rate)
    assert "lane a:" in r.stderr and "lane b:" in r.stderr

    status = run_cli("status", out)
    assert status.returncode == 0
    assert "by lane (all runs):" in status.stdout
    assert "lane a: " in status.stdout and "of its 2/s" in status.stdout
    state = json.loads(run_cli("status", out, "--json").stdout)
    assert set(state["lanes"]) == {"a", "b"}
    assert sum(state["lanes"][lane]["calls"] for lane in "ab") == 40

    exported = run_cli("export", out, "--format", "csv")
    records = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert {rec["lane"] for rec in records} == {"a", "b"}
    report = (out / "report" / "index.html").read_text(encoding="utf-8")
    assert '<table id="lanes">' in report
    assert_no_key_anywhere(out, r.stdout, r.stderr, status.stdout, exported.stdout)


def test_a_lane_with_a_bad_key_is_disabled_alone(tmp_path, accounts):
    m, out = manifest(tmp_path, 10), tmp_path / "out"
    lanes = lanes_file(tmp_path, accounts.base_url, quota=20)
    accounts.reconfigure(rps=20)
    r = run_lanes(m, out, lanes, {"LANE_KEY_A": KEY_A, "LANE_KEY_B": KEY_BAD})
    assert r.returncode == 0, r.stderr
    disabled = [line for line in r.stderr.splitlines() if "lane b disabled" in line]
    assert len(disabled) == 1, r.stderr
    assert "InvalidApiKey" in disabled[0] and "LANE_KEY_B" in disabled[0]
    rows = jobs(out / "batcher.db")
    # every job done by lane a, each charged its one successful attempt only
    assert rows == [("done", "a", 1)] * 10
    assert_no_key_anywhere(out, r.stdout, r.stderr)


def test_all_lanes_bad_stops_with_every_job_pending_and_no_attempt_charged(tmp_path, accounts):
    m, out = manifest(tmp_path, 6), tmp_path / "out"
    lanes = lanes_file(tmp_path, accounts.base_url)
    r = run_lanes(m, out, lanes, {"LANE_KEY_A": KEY_BAD, "LANE_KEY_B": "sk-also-not-known-42"})
    assert r.returncode == 3, r.stderr
    assert "no lane is left" in r.stderr
    assert jobs(out / "batcher.db") == [("pending", None, 0)] * 6
    assert_no_key_anywhere(out, r.stdout, r.stderr)


def closed_port() -> int:
    """A loopback port nothing listens on: bound, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def two_endpoints(tmp_path: Path, url_a: str, url_b: str) -> Path:
    path = tmp_path / "lanes.yaml"
    path.write_text(
        "lanes:\n"
        f"  - name: a\n    key_env: LANE_KEY_A\n    base_url: {url_a}\n    quota: 20\n"
        f"  - name: b\n    key_env: LANE_KEY_B\n    base_url: {url_b}\n    quota: 20\n",
        encoding="utf-8",
    )
    return path


def test_a_lane_whose_service_cannot_be_reached_pauses_alone_then_is_disabled(tmp_path, accounts):
    """Lanes in two places: the one cut off pauses and probes on its own, the other goes on,
    and past --unreachable-timeout the cut-off lane is disabled with one line."""
    m, out = manifest(tmp_path, 30), tmp_path / "out"
    accounts.reconfigure(rps=20)
    dead = f"http://127.0.0.1:{closed_port()}/api/v1"
    lanes = two_endpoints(tmp_path, accounts.base_url, dead)
    env = {"LANE_KEY_A": KEY_A, "LANE_KEY_B": KEY_B}
    r = run_lanes(m, out, lanes, env, "--unreachable-timeout", "2", "--json")
    assert r.returncode == 0, r.stderr
    disabled = [line for line in r.stderr.splitlines() if "lane b disabled" in line]
    assert len(disabled) == 1, r.stderr
    assert "Unreachable: could not reach the service at" in disabled[0], disabled
    assert "lane a disabled" not in r.stderr
    # every job done on lane a, no attempt charged for the calls that never reached b
    assert jobs(out / "batcher.db") == [("done", "a", 1)] * 30
    summary = json.loads(r.stdout)["this_run"]
    assert summary["unreached"] >= 3 and summary["failed"] == 0, summary


def test_every_lane_unreachable_stops_with_exit_3_and_no_attempt_charged(tmp_path):
    m, out = manifest(tmp_path, 6), tmp_path / "out"
    lanes = two_endpoints(
        tmp_path,
        f"http://127.0.0.1:{closed_port()}/api/v1",
        f"http://127.0.0.1:{closed_port()}/api/v1",
    )
    env = {"LANE_KEY_A": KEY_A, "LANE_KEY_B": KEY_B}
    r = run_lanes(m, out, lanes, env, "--unreachable-timeout", "1")
    assert r.returncode == 3, r.stderr
    assert "lane a disabled: Unreachable" in r.stderr and "lane b disabled: Unreachable" in r.stderr
    assert "no lane is left" in r.stderr.splitlines()[-1] or "no lane is left" in r.stderr
    assert jobs(out / "batcher.db") == [("pending", None, 0)] * 6


@pytest.mark.parametrize(
    ("body", "where"),
    [
        (
            "lanes:\n  - name: a\n    key: sk-pasted-by-mistake-123\n    quota: 2\n",
            "lanes.yaml:3: key: a key never goes in the lanes file",
        ),
        (
            "lanes:\n  - name: a\n    key_env: sk-pasted-by-mistake-123\n    quota: 2\n",
            "lanes.yaml:3: key_env: looks like a key",
        ),
        (
            "lanes:\n  - name: a\n    key_env: K\n    quota: fast\n",
            "lanes.yaml:4: quota: must be a positive number",
        ),
        (
            "lanes:\n  - name: a\n    key_env: K\n    quota: 2\n    models: [no-such-model]\n",
            "lanes.yaml:5: models: unknown model 'no-such-model'",
        ),
        (
            "lanes:\n  - name: a\n    key_env: K\n    quota: 2\n"
            "  - name: a\n    key_env: K2\n    quota: 2\n",
            "lanes.yaml:5: name: lane 'a' is given twice",
        ),
        ("lanes:\n  - name: a\n    key_env: K\n", "lanes.yaml:2: quota: missing"),
        ("lanes: [\n", "lanes.yaml:2: yaml:"),
    ],
)
def test_a_bad_lanes_file_is_one_located_line_and_nothing_is_written(tmp_path, body, where):
    m, out = manifest(tmp_path, 2), tmp_path / "out"
    lanes = tmp_path / "lanes.yaml"
    lanes.write_text(body, encoding="utf-8")
    r = run_lanes(m, out, lanes, {"K": KEY_A, "K2": KEY_B})
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(str(lanes)) and where in lines[0], lines[0]
    assert "sk-pasted-by-mistake-123" not in r.stderr
    assert not out.exists()


def test_a_lane_whose_variable_is_unset_is_named_in_one_line(tmp_path):
    m, out = manifest(tmp_path, 2), tmp_path / "out"
    lanes = lanes_file(tmp_path, "http://127.0.0.1:9/api/v1")
    r = run_lanes(m, out, lanes, {"LANE_KEY_A": KEY_A})
    assert r.returncode == 2
    [line] = r.stderr.splitlines()
    assert "lane 'b'" in line and "LANE_KEY_B" in line and KEY_A not in line
    assert not out.exists()


def test_a_rehearsal_gives_each_lane_its_own_emulated_account(tmp_path):
    """``--emulate --lanes``: no key read (the variables are unset); each lane meets its own
    quota in the in-process emulator, so two lanes of 2/s finish without a 429."""
    m, out = manifest(tmp_path, 12), tmp_path / "out"
    lanes = lanes_file(tmp_path, "http://127.0.0.1:9/api/v1")
    r = run_lanes(m, out, lanes, {}, "--emulate", "--emulate-latency", "0", "--json")
    assert r.returncode == 0, r.stderr
    payload = json.loads(r.stdout)
    assert payload["this_run"]["throttled"] == 0
    assert set(payload["this_run"]["lanes"]) == {"a", "b"}
    assert {lane for _, lane, _ in jobs(out / "batcher.db")} == {"a", "b"}


def test_plan_estimates_with_the_lanes(tmp_path):
    m, out = manifest(tmp_path, 8), tmp_path / "out"
    lanes = lanes_file(tmp_path, "http://127.0.0.1:9/api/v1")
    r = run_cli("plan", m, "--out", out, "--lanes", lanes, "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["lane_rates"]["z-image-turbo"] == 4.0 and plan["seconds_at_quota"] == 2
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(
        "lanes:\n  - {name: a, key_env: KA, quota: 2}\n  - {name: b, key_env: KB, quota: 2, "
        "region: cn}\n",
        encoding="utf-8",
    )
    # lanes in both regions: the 8 jobs go 6 to cn (quota 3) and 2 to intl (quota 1),
    # each priced in its region's currency, never summed
    mixed.write_text(
        "lanes:\n  - {name: a, key_env: KA, quota: 1}\n  - {name: b, key_env: KB, quota: 3, "
        "region: cn}\n",
        encoding="utf-8",
    )
    r = run_cli("plan", m, "--out", tmp_path / "out2", "--lanes", mixed, "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    cny, usd = (
        price_per_image("z-image-turbo", "cn", False),
        price_per_image("z-image-turbo", "intl", False),
    )
    assert plan["estimated_costs"] == {"CNY": str((cny * 6).amount), "USD": str((usd * 2).amount)}
    assert plan["estimated_cost"] is None and plan["currency"] is None
    assert plan["lane_rates"]["z-image-turbo"] == 4.0 and plan["seconds_at_quota"] == 2
    r = run_cli("plan", tmp_path / "out2", "--lanes", mixed)
    assert r.returncode == 0, r.stderr
    assert f"for about {cny * 6} + {usd * 2} (the jobs shared by the lanes' quotas)" in r.stdout
    one = run_cli("plan", tmp_path / "out2", "--json")  # without lanes: --region's prices
    assert json.loads(one.stdout)["estimated_costs"] == {"USD": str((usd * 8).amount)}
    bad = tmp_path / "bad.yaml"
    bad.write_text("lanes:\n  - {name: a, key_env: KA}\n", encoding="utf-8")
    r = run_cli("plan", m, "--out", tmp_path / "out3", "--lanes", bad)
    assert (
        r.returncode == 2
        and r.stderr.strip()
        == f"{bad}:2: quota: missing: the lane's requests/s (e.g. 2), or one per model"
    )
    assert not (tmp_path / "out3").exists()


def wan_manifest(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "wan.jsonl"
    rows = [{"id": f"w{i}", "prompt": f"a lighthouse, study {i}", "model": "wan2.2-t2i-flash"}
            for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    full = {k: v for k, v in os.environ.items() if k != "DASHSCOPE_API_KEY"} | env
    return subprocess.Popen(
        batcher_cmd(*args), cwd=REPO, env=full, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip


def submitted_lanes(db: Path) -> list[str]:
    try:
        with sqlite3.connect(db, timeout=30) as con:
            query = "SELECT lane FROM jobs WHERE state = 'submitted' ORDER BY lane"
            return [lane for (lane,) in con.execute(query)]
    except sqlite3.OperationalError:  # the run has not made its tables yet
        return []


def wait_for(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def task_accounts(task_seconds: str) -> EmulatorConfig:
    accounts = {"acct-a": (KEY_A,), "acct-b": (KEY_B,)}
    return EmulatorConfig(latency="0", rps=math.inf, seed=5, task_seconds=task_seconds,
                          accounts=accounts)  # fmt: skip


def test_kill_9_with_tasks_on_two_lanes_then_each_is_polled_on_its_lane(tmp_path):
    out, env = tmp_path / "out", {"LANE_KEY_A": KEY_A, "LANE_KEY_B": KEY_B}
    with EmulatorThread(task_accounts("3")) as emu:
        lanes = lanes_file(tmp_path, emu.base_url, quota=20)
        args = ["run", str(wan_manifest(tmp_path, 4)), "--out", str(out), "--lanes", str(lanes),
                "--no-progress", "--request-timeout", "10"]  # fmt: skip
        proc = start(args, env)
        try:
            wait_for(lambda: len(submitted_lanes(out / "batcher.db")) == 4)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        assert set(submitted_lanes(out / "batcher.db")) == {"a", "b"}
        done = run_cli(*args, env=env)
        assert done.returncode == 0, done.stderr
        stats = emu.stats()
        assert stats["tasks_created"] == 4  # reattached on their own lanes, none made again
        assert stats["duplicate_billed"] == 0
    assert sorted(lane for _, lane, _ in jobs(out / "batcher.db")) == ["a", "a", "b", "b"]


def test_cancel_with_lanes_uses_each_tasks_lane(tmp_path):
    out, env = tmp_path / "out", {"LANE_KEY_A": KEY_A, "LANE_KEY_B": KEY_B}
    with EmulatorThread(task_accounts("400")) as emu:
        lanes = lanes_file(tmp_path, emu.base_url, quota=20)
        args = ["run", str(wan_manifest(tmp_path, 4)), "--out", str(out), "--lanes", str(lanes),
                "--no-progress", "--request-timeout", "10", "--grace", "0.5"]  # fmt: skip
        proc = start(args, env)
        try:
            wait_for(lambda: len(submitted_lanes(out / "batcher.db")) == 4)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 130
        finally:
            if proc.poll() is None:
                proc.kill()
        cancelled = run_cli("cancel", out, "--lanes", lanes, env=env)
        assert cancelled.returncode == 0, cancelled.stderr
        assert cancelled.stdout.startswith("4 tasks cancelled; 0 already running")
        assert emu.stats()["tasks_cancelled"] == 4


def test_jobs_no_lane_can_take_wait_while_the_other_lanes_finish_then_exit_3(tmp_path):
    """Lane a (the only one for z-image-turbo) has a bad key: lane b still makes every Wan
    image, then the run stops (exit 3) with the z-image jobs pending, no attempt charged."""
    out = tmp_path / "out"
    rows = [{"id": f"z{i}", "prompt": f"item {i}"} for i in range(3)]
    rows += [{"id": f"w{i}", "prompt": f"study {i}", "model": "wan2.2-t2i-flash"} for i in range(2)]
    m = tmp_path / "mixed.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with EmulatorThread(task_accounts("0.3")) as emu:
        lanes = tmp_path / "lanes.yaml"
        lanes.write_text(
            "lanes:\n"
            f"  - {{name: a, key_env: LANE_KEY_A, base_url: {emu.base_url}, quota: 20, "
            "models: [z-image-turbo]}\n"
            f"  - {{name: b, key_env: LANE_KEY_B, base_url: {emu.base_url}, quota: 20, "
            "models: [wan2.2-t2i-flash]}\n",
            encoding="utf-8",
        )
        r = run_lanes(m, out, lanes, {"LANE_KEY_A": KEY_BAD, "LANE_KEY_B": KEY_B})
    assert r.returncode == 3, r.stderr
    assert "lane a disabled: InvalidApiKey" in r.stderr
    assert "no lane is left for z-image-turbo" in r.stderr
    with sqlite3.connect(out / "batcher.db") as con:
        got = dict(con.execute("SELECT id, state || ':' || attempts FROM jobs").fetchall())
    assert got == {"z0": "pending:0", "z1": "pending:0", "z2": "pending:0",
                   "w0": "done:1", "w1": "done:1"}  # fmt: skip


def test_the_lanes_figures_are_saved_as_the_run_goes_and_survive_kill_9(tmp_path, accounts):
    """Killed with SIGKILL some seconds in, the run leaves its lanes' figures up to its last
    save (every 5 s), not nothing until its lease's third (20 s by default)."""
    m, out = manifest(tmp_path, 60), tmp_path / "out"
    env = {"LANE_KEY_A": KEY_A, "LANE_KEY_B": KEY_B}
    lanes = lanes_file(tmp_path, accounts.base_url)
    args = ["run", str(m), "--out", str(out), "--lanes", str(lanes), "--no-progress"]
    proc = start(args, env)

    def saved() -> int:
        if not (out / "batcher.db").exists():
            return 0
        try:
            with sqlite3.connect(out / "batcher.db", timeout=30) as con:
                return int(
                    con.execute("SELECT coalesce(sum(calls), 0) FROM lane_calls").fetchone()[0]
                )
        except sqlite3.OperationalError:  # the table is not made yet
            return 0

    try:
        wait_for(lambda: saved() > 0, seconds=15)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    # two lanes at 2/s each for about 5 s: some 20 calls, all of one save's figures
    assert 5 <= saved() <= accounts.stats()["generate_requests"]
    status = json.loads(run_cli("status", out, "--json").stdout)
    assert sum(status["lanes"][lane]["calls"] for lane in status["lanes"]) == saved()
