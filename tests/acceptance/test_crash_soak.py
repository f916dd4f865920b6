"""The seeded soak (``make soak``; not part of ``make test``).

A few hundred jobs through the real CLI against the emulator with a storm of faults (5xx, quota
and plain 429s, resets, lost answers, hangs past the request timeout, truncated and corrupt
downloads), while the CLI is killed with SIGKILL at random moments and started again; then one
last run to the end. Every job must end terminal and verified (the invariants), and the images
the service billed must stay within the jobs, plus the answers the emulator lost on purpose,
plus the calls that were in flight at each kill (bounded by the jobs left ``running``).

``BATCHER_SOAK_SEED`` picks another storm: the emulator's draws (per request number) and the kill
delays follow it; what each kill interrupts still depends on timing, so counts vary a little
from run to run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from batcher.emulator import EmulatorConfig, EmulatorThread
from tests.support import REPO, batcher_cmd, check_invariants, db_states, run_cli

KEY = "sk-soak-0c1d2e3f"
JOBS = 300
KILLS = 6
WINDOW = 0.05  # an answer this recent at a kill may not have been recorded yet
FAULTS = (
    "500=0.04,503=0.03,429=0.04,reset=0.03,lost=0.03,hang=0.01,"
    "Throttling.RateQuota=0.02,truncate=0.04,corrupt=0.03"
)


def manifest(path: Path) -> Path:
    lines = ["id,prompt,size,seed,category,output"]
    sizes = ["512*512", "768*512", "512*768"]
    for i in range(JOBS):
        cat = ["lamps", "家具", "chairs"][i % 3]
        size = sizes[i % 3]
        lines.append(
            f"soak-{i:04d},product photo {i} of a thing,{size},{i},{cat},{{category}}/{{id}}"
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_args(m: Path, out: Path, url: str, seed: int) -> list[str]:
    return [
        "run",
        str(m),
        "--out",
        str(out),
        "--base-url",
        url,
        "--no-progress",
        "--rps",
        "60",  # above the emulator's quota of 40: real quota 429s too
        "--start-rps",
        "60",  # from the first call (no slow start): the 429s come early, as before
        "--request-timeout",
        "1.5",
        "--max-attempts",
        "8",
        "--backoff-base",
        "0.05",
        "--seed",
        str(seed),
    ]


def answered(stats: dict) -> int:
    """Generation calls the emulator has finished with: answered, or dropped on purpose (its
    count of dropped connections includes the downloads it truncated)."""
    dropped = stats["connections_dropped"] - stats["faults_injected"].get("truncate", 0)
    return sum(stats["by_status"].values()) + dropped


def has_jobs_table(db: Path) -> bool:
    if not db.exists():
        return False
    con = sqlite3.connect(db)
    try:
        found = con.execute("SELECT 1 FROM sqlite_master WHERE name = 'jobs'").fetchone()
    finally:
        con.close()
    return found is not None


def settled_requests(emu: EmulatorThread) -> int:
    """The emulator's count of generation requests, once it has not moved for 0.3 s."""
    last, since = emu.stats()["generate_requests"], time.monotonic()
    while time.monotonic() - since < 0.3:
        time.sleep(0.02)
        now = emu.stats()["generate_requests"]
        if now != last:
            last, since = now, time.monotonic()
    return last


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_seeded_soak_with_random_kills(tmp_path):
    seed = int(os.environ.get("BATCHER_SOAK_SEED", "20251125"))
    rng = random.Random(seed)
    m = manifest(tmp_path / "soak.csv")
    out = tmp_path / "out"
    env = {
        **{k: v for k, v in os.environ.items() if k != "DASHSCOPE_API_KEY"},
        "DASHSCOPE_API_KEY": KEY,
    }
    cfg = EmulatorConfig(
        latency="lognormal:40:0.5", rps=40.0, faults=FAULTS, seed=seed, api_key=KEY
    )
    kills = 0
    in_flight_at_kills: list[int] = []
    running_at_kills: list[int] = []
    with EmulatorThread(cfg) as emu:
        for round_ in range(KILLS):
            proc = subprocess.Popen(
                batcher_cmd(*run_args(m, out, emu.base_url, seed + round_)),
                env=env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                proc.wait(timeout=rng.uniform(0.6, 2.2))  # start-up takes ~0.6 s
            except subprocess.TimeoutExpired:
                answered_before = answered(emu.stats())
                time.sleep(WINDOW)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    proc.communicate(timeout=10)
                    # Calls in flight at the kill: they had arrived once the count stops moving
                    # (a request already in the socket may be read after the kill), and had no
                    # answer WINDOW before it (an answer just received may not be recorded yet).
                    in_flight_at_kills.append(settled_requests(emu) - answered_before)
                    kills += 1
                    if not has_jobs_table(out / "batcher.db"):  # killed while starting up
                        running_at_kills.append(0)
                        continue
                    running_at_kills.append(db_states(out / "batcher.db").get("running", 0))
                    check_invariants(out, after_kill=True)
                    continue
            _, err = proc.communicate()
            pytest.fail(f"the run ended before kill {round_ + 1} (exit {proc.returncode}):\n{err}")

        final = run_cli(
            *run_args(m, out, emu.base_url, seed + KILLS), "--json", env=env, timeout=300
        )
        time.sleep(0.3)  # let abandoned calls on the emulator's side finish billing
        s = emu.stats()
    assert final.returncode in (0, 1), final.stderr
    summary = json.loads(final.stdout)
    counts = check_invariants(out)
    done, failed = counts.get("done", 0), counts.get("failed", 0)
    lost = s["faults_injected"].get("lost", 0)
    extra = s["images_billed"] - done
    print(
        f"\nsoak seed {seed}: jobs {JOBS}, done {done}, failed {failed}, "
        f"lost answers {lost}, extra generations {extra} "
        f"(duplicates billed {s['duplicate_billed']}), kills survived {kills}, "
        f"calls in flight at the kills {in_flight_at_kills}, "
        f"jobs left running at the kills {running_at_kills}, "
        f"ambiguous re-sends recorded {summary['ambiguous']}, "
        f"generation calls {s['generate_requests']}, "
        f"downloads {s['downloads']}, faults {s['faults_injected']}"
    )
    assert done + failed == JOBS  # every job terminal
    assert kills == KILLS
    # failures only for transient causes that outlasted --max-attempts, never the run's
    assert set(summary["errors_by_code"]) <= {
        "InternalError",
        "ModelUnavailable",
        "transport.reset",
        "transport.timeout",
        "Download.truncated",
        "Download.corrupt",
    }, summary["errors_by_code"]
    assert failed <= JOBS // 50
    # billed generations stay within the jobs + the lost answers + the calls in flight at kills:
    # for certain within the jobs left running (each unrecorded call belongs to one) ...
    assert s["images_billed"] <= JOBS + lost + sum(running_at_kills)
    # ... and, tighter, within the calls the emulator had not answered shortly before each kill
    assert s["images_billed"] <= JOBS + lost + sum(in_flight_at_kills)
    assert s["duplicate_billed"] == extra
