"""``batcher redo`` through the real CLI against the emulator: rejected images made again with
new seeds, the old images and records kept, refusals in one line, and the next run making them."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import anyio
import pytest

from batcher.emulator import EmulatorConfig, EmulatorThread
from jobs import JobStore
from tests.support import check_invariants, run_args, run_cli

KEY = "sk-acceptance-redo-5e1a"


@pytest.fixture
def emulator():
    cfg = EmulatorConfig(latency="0", rps=100_000.0, seed=3, api_key=KEY)
    with EmulatorThread(cfg) as emu:
        yield emu


def env() -> dict[str, str]:
    return {"DASHSCOPE_API_KEY": KEY}


def manifest(tmp_path: Path) -> Path:
    path = tmp_path / "m.csv"
    rows = ["id,prompt,size,seed,output"]
    rows += [f"p{i},A photo of product {i},512*512,{100 + i},shop/p{i}.png" for i in range(5)]
    rows.append("茶壶,青花瓷茶壶产品照,512*512,7,厨房/茶壶.png")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def mark(db: Path, **marks: str) -> None:
    async def go() -> None:
        async with await JobStore.open(db, create=False) as store:
            for job_id, review in marks.items():
                await store.set_review(job_id, review)

    anyio.run(go)


def table(db: Path) -> dict[str, dict[str, object]]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return {r["id"]: dict(r) for r in con.execute("SELECT * FROM jobs")}
    finally:
        con.close()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_see_judge_redo(tmp_path: Path, emulator: EmulatorThread) -> None:
    m, out = manifest(tmp_path), tmp_path / "out"
    assert run_cli(*run_args(m, out, emulator.base_url), env=env()).returncode == 0
    db = out / "batcher.db"
    before = table(db)
    mark(db, p1="rejected", 茶壶="rejected", p2="approved")

    status = run_cli("status", out)
    assert "reviewed: 1 approved, 2 rejected" in status.stdout, status.stdout

    dry = run_cli("redo", out, "--rejected", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would redo 2 jobs for about US$0.03" in dry.stdout
    assert "p1" in dry.stdout and "茶壶" in dry.stdout
    assert table(db) == before | {k: table(db)[k] for k in ("p1", "茶壶", "p2")}
    assert not (out / "history").exists()

    r = run_cli("redo", out, "--rejected")
    assert r.returncode == 0, r.stderr
    assert "2 jobs back to pending" in r.stdout
    after = table(db)
    for job_id in ("p1", "茶壶"):
        assert after[job_id]["state"] == "pending"
        assert after[job_id]["seed"] != before[job_id]["seed"]
        assert after[job_id]["review"] is None
        assert not (out / "images" / str(before[job_id]["output"])).exists()
    kept = sorted((out / "history").rglob("*.png"))
    assert [p.parent.name for p in kept] == ["shop", "厨房"]
    assert {sha(p) for p in kept} == {before["p1"]["sha256"], before["茶壶"]["sha256"]}
    con = sqlite3.connect(db)
    hist = con.execute("SELECT job_id, reason, file FROM job_history ORDER BY seq").fetchall()
    con.close()
    assert [(j, reason) for j, reason, _ in hist] == [("p1", "redo"), ("茶壶", "redo")]
    assert all((out / file).is_file() for _, _, file in hist)
    lines = (out / "images" / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    assert {json.loads(line)["id"] for line in lines} == {"p0", "p2", "p3", "p4"}

    # refusals: one line, exit 2, nothing changed
    for args, says in (
        (["--id", "p1"], "job 'p1' is pending and has no image to redo"),
        (["--id", "nope"], "no job has the id 'nope'"),
        (["--id", "p0", "--seed", "-1"], "--seed must be within 0..2147483647"),
        ([], "say which jobs to redo"),
    ):
        bad = run_cli("redo", out, *args)
        assert bad.returncode == 2, (args, bad.stdout, bad.stderr)
        assert bad.stderr.strip() == f"batcher: error: {says}" or says in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert "Traceback" not in bad.stderr
    con = sqlite3.connect(db)
    con.execute("UPDATE jobs SET state = 'running' WHERE id = 'p3'")  # a crashed run's leftover
    con.commit()
    con.close()
    bad = run_cli("redo", out, "--id", "p3")
    assert bad.returncode == 2 and "job 'p3' is running" in bad.stderr

    # the next run makes them again (and puts p3 back as the crash leftover it is)
    again = run_cli(*run_args(m, out, emulator.base_url, "--json"), env=env())
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["this_run"]["generated"] == 3
    assert check_invariants(out) == {"done": 6}
    final = table(db)
    assert final["p1"]["sha256"] != before["p1"]["sha256"]
    assert final["p2"]["review"] == "approved"
    exported = run_cli("export", out)
    records = {json.loads(x)["id"]: json.loads(x) for x in exported.stdout.splitlines()}
    assert records["p2"]["review"] == "approved" and records["p1"]["review"] is None
    meta = (out / "images" / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    assert {json.loads(x)["id"]: json.loads(x)["review"] for x in meta}["p2"] == "approved"

    # a given seed and a new prompt
    r = run_cli("redo", out, "--id", "p0", "--seed", "5", "--prompt", "一张新的产品照")
    assert r.returncode == 0, r.stderr
    assert run_cli(*run_args(m, out, emulator.base_url), env=env()).returncode == 0
    p0 = table(db)["p0"]
    assert (p0["seed"], p0["prompt"], p0["state"]) == (5, "一张新的产品照", "done")
    assert (p0["manifest_seed"], p0["manifest_prompt"]) == (100, "A photo of product 0")
