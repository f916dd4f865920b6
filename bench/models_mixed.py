"""Benchmark: a mixed-model manifest, and kill -9 while tasks are submitted.

Part 1. A 60-job manifest, 20 jobs each of z-image-turbo, qwen-image (both synchronous) and
wan2.2-t2i-flash (an asynchronous task of 3 s), run by ``batcher run`` against the emulator
(each model at its published quota: 2 requests/s; wan2.2-t2i-flash also 2 tasks at once; call
latency 1 s). Measured: every job done; ``tasks_created`` against the async jobs; each model's
rate while it had work, against its quota: requests its quota accepted at the emulator, from the
first to the last ((n - 1) / span); for the task model, how many tasks
were open on average against its limit of 2 (the limit, not the 2/s, binds at 3 s a task).

Part 2. 30 wan2.2-t2i-flash jobs (3 s tasks) and 10 z-image-turbo jobs; the run is killed with
SIGKILL at three random moments while at least one job is ``submitted``, then run to the end.
Measured: ``tasks_created`` == async jobs + the ambiguous creates counted in the job table;
no image billed twice; the run-folder invariants.

    python -m bench.models_mixed [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from batcher.emulator import EmulatorConfig, EmulatorThread

REPO = Path(__file__).resolve().parent.parent
KEY = "sk-bench-models"
QUOTA = 2.0


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "batcher", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["DASHSCOPE_API_KEY"] = KEY
    env["PYTHONPATH"] = str(REPO)
    return env


def _manifest(path: Path, counts: dict[str, int]) -> Path:
    rows = []
    for model, n in counts.items():
        for i in range(n):
            rows.append(
                {"id": f"{model}-{i:03d}", "prompt": f"study {i} of a lantern", "model": model}
            )
    # interleave the models, as a real catalog would
    rows.sort(key=lambda r: (int(r["id"].rsplit("-", 1)[1]), r["model"]))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _rows(db: Path) -> list[sqlite3.Row]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return con.execute("SELECT * FROM jobs").fetchall()
    finally:
        con.close()


def _run_args(manifest: Path, out: Path, base_url: str) -> list[str]:
    return ["run", str(manifest), "--out", str(out), "--base-url", base_url, "--no-progress"]


def part1(work: Path) -> dict[str, object]:
    config = EmulatorConfig(latency="1000", rps=QUOTA, seed=1, task_seconds="3", api_key=KEY)
    counts = {"z-image-turbo": 20, "qwen-image": 20, "wan2.2-t2i-flash": 20}
    manifest = _manifest(work / "mixed.jsonl", counts)
    out = work / "mixed"
    with EmulatorThread(config) as emu:
        started = time.monotonic()
        done = subprocess.run(
            _cmd(*_run_args(manifest, out, emu.base_url)),
            env=_env(), capture_output=True, text=True, cwd=REPO, timeout=600,
        )  # fmt: skip
        wall = time.monotonic() - started
        stats = emu.stats()
    rows = _rows(out / "batcher.db")
    result: dict[str, object] = {
        "exit": done.returncode,
        "wall_s": round(wall, 1),
        "done": sum(r["state"] == "done" for r in rows),
        "tasks_created": stats["tasks_created"],
        "async_jobs": counts["wan2.2-t2i-flash"],
        "throttled": stats["throttled"],
        "duplicate_billed": stats["duplicate_billed"],
        "task_polls": stats["task_polls"],
    }
    for model in counts:
        window = stats["accepted_by_model"][model]
        rate = (window["requests"] - 1) / (window["last"] - window["first"])
        result[f"{model}_requests"] = window["requests"]
        result[f"{model}_rate"] = round(rate, 3)
        result[f"{model}_rate_vs_quota_pct"] = round(100 * rate / QUOTA, 1)
        if model == "wan2.2-t2i-flash":
            mine = [r for r in rows if r["model"] == model]
            # tasks open on average while the model had work: total task time / span
            busy = sum(r["generated_at"] - r["task_submitted_at"] for r in mine)
            span = max(r["generated_at"] for r in mine) - min(r["task_submitted_at"] for r in mine)
            result[f"{model}_tasks_open_avg"] = round(busy / span, 2)
    return result


def _submitted(db: Path) -> int:
    try:
        con = sqlite3.connect(db, timeout=30)
        try:
            return int(
                con.execute("SELECT count(*) FROM jobs WHERE state='submitted'").fetchone()[0]
            )
        finally:
            con.close()
    except sqlite3.OperationalError:
        return 0


def part2(work: Path, rng: random.Random) -> dict[str, object]:
    config = EmulatorConfig(latency="500", rps=QUOTA, seed=2, task_seconds="3", api_key=KEY)
    counts = {"wan2.2-t2i-flash": 30, "z-image-turbo": 10}
    manifest = _manifest(work / "kill.jsonl", counts)
    out = work / "kill"
    kills = []
    with EmulatorThread(config) as emu:
        args = _cmd(*_run_args(manifest, out, emu.base_url))
        for _ in range(3):
            proc = subprocess.Popen(
                args, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            # a random moment while tasks are out, after this run created one of its own
            before = emu.stats()["tasks_created"]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not (
                _submitted(out / "batcher.db") and emu.stats()["tasks_created"] > before
            ):
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 3.0))
            at_kill = _submitted(out / "batcher.db")
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills.append(
                {"submitted_at_kill": at_kill, "tasks_created": emu.stats()["tasks_created"]}
            )
        final = subprocess.run(
            args, env=_env(), capture_output=True, text=True, cwd=REPO, timeout=600
        )
        stats = emu.stats()
    rows = _rows(out / "batcher.db")
    wan = [r for r in rows if r["model"] == "wan2.2-t2i-flash"]
    ambiguous = sum(r["ambiguous"] for r in wan)
    return {
        "kills": kills,
        "final_exit": final.returncode,
        "done": sum(r["state"] == "done" for r in rows),
        "jobs": len(rows),
        "tasks_created": stats["tasks_created"],
        "async_jobs": len(wan),
        "ambiguous_creates": ambiguous,
        "regenerated": sum(r["regenerated"] for r in wan),
        "invariant_holds": stats["tasks_created"] == len(wan) + ambiguous,
        "images_billed": stats["images_billed"],
        "images_billed_by_model": stats["images_billed_by_model"],
        "sync_ambiguous": sum(r["ambiguous"] for r in rows if r["model"] != "wan2.2-t2i-flash"),
        "duplicate_billed": stats["duplicate_billed"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--part", choices=["1", "2", "both"], default="both")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        work = Path(tmp)
        if args.part in ("1", "both"):
            print(json.dumps({"part1": part1(work)}, indent=1))
        if args.part in ("2", "both"):
            print(json.dumps({"part2": part2(work, random.Random(args.seed))}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
