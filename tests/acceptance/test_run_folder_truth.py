"""The run folder tells its user the truth, driven through the real CLI in a subprocess:

- a rehearsal (``--emulate``) never stands in for a paid run: its own folder, its money shown
  as emulated, a paid run into a rehearsal folder refused;
- the manifest is the source of truth: rows that left it are *withdrawn* (and come back with
  it), a folder made from one manifest refuses another, ``batcher run DIR`` resumes, a changed
  ``output`` moves the image rather than paying for it again;
- money per currency, a ``--budget`` that means the folder's spend, ``plan`` prints the time.

A "real endpoint" here is the emulator started apart, reached with ``--base-url`` and a key.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from batcher.emulator import EmulatorConfig, EmulatorThread
from tests.support import check_invariants, run_args, run_cli

KEY = "sk-truth-5e1f0a77c3"
ENV = {"DASHSCOPE_API_KEY": KEY}
QUICK_EMULATE = ("--emulate", "--emulate-latency", "0", "--emulate-rps", "1000", "--rps", "1000")


@pytest.fixture
def emulator():
    cfg = EmulatorConfig(latency="0", rps=100_000.0, seed=5, api_key=KEY)
    with EmulatorThread(cfg) as emu:
        yield emu


def write_manifest(path: Path, rows: list[tuple[str, ...]], header: str = "id,prompt,size") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join([header, *(",".join(r) for r in rows)]) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def rows(n: int, start: int = 0) -> list[tuple[str, ...]]:
    return [(f"p{i:02d}", f"a product photo of item {i}", "512*512") for i in range(start, n)]


def db_rows(db: Path, sql: str, *params: object) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("batcher: ") and "Traceback" not in stderr
    return lines[0]


# ------------------------------------------------------------------ 1. rehearsal apart


def test_a_rehearsal_has_its_own_folder_and_never_stands_in_for_the_paid_run(tmp_path, emulator):
    write_manifest(tmp_path / "m.csv", rows(4))
    rehearsal = run_cli("run", "m.csv", *QUICK_EMULATE, "--no-progress", "--json", cwd=tmp_path)
    assert rehearsal.returncode == 0, rehearsal.stderr
    assert check_invariants(tmp_path / "out" / "m.emulated") == {"done": 4}
    assert not (tmp_path / "out" / "m").exists()
    summary = json.loads(rehearsal.stdout)
    assert summary["spent"] == {} and summary["emulated"] == {"USD": "0.06"}
    assert "emulated" in rehearsal.stderr

    paid = run_cli(
        "run", "m.csv", "--base-url", emulator.base_url, "--no-progress", "--json",
        env=ENV, cwd=tmp_path,
    )  # fmt: skip
    assert paid.returncode == 0, paid.stderr
    assert json.loads(paid.stdout)["this_run"]["generated"] == 4
    assert emulator.stats()["generate_requests"] == 4
    assert check_invariants(tmp_path / "out" / "m") == {"done": 4}
    # where each image came from, never the key
    real = db_rows(tmp_path / "out" / "m" / "batcher.db", "SELECT DISTINCT endpoint FROM jobs")
    assert real == [(emulator.base_url,)]
    emulated = tmp_path / "out" / "m.emulated" / "batcher.db"
    assert db_rows(emulated, "SELECT DISTINCT endpoint FROM jobs") == [("emulator",)]
    for p in (tmp_path / "out").rglob("*"):
        if p.is_file():
            assert KEY.encode() not in p.read_bytes(), p


def test_a_paid_run_into_a_folder_of_emulated_images_refuses_clearly(tmp_path, emulator):
    m = write_manifest(tmp_path / "m.csv", rows(3))
    out = tmp_path / "o"
    first = run_cli("run", m, "--out", out, *QUICK_EMULATE, "--no-progress")
    assert first.returncode == 0, first.stderr
    paid = run_cli(*run_args(m, out, emulator.base_url), env=ENV)
    assert paid.returncode == 2
    line = one_error_line(paid.stderr)
    assert "emulator" in line and "--out" in line
    assert emulator.stats()["generate_requests"] == 0
    # and the other way: a rehearsal never overwrites paid images
    out2 = tmp_path / "o2"
    assert run_cli(*run_args(m, out2, emulator.base_url), env=ENV).returncode == 0
    again = run_cli("run", m, "--out", out2, *QUICK_EMULATE, "--no-progress")
    assert again.returncode == 2
    assert "--out" in one_error_line(again.stderr)


def test_a_rehearsal_in_the_paid_default_folder_is_not_told_to_use_that_folder(tmp_path, emulator):
    """Rehearsed with ``--out out/m`` (the paid run's default), then run paid without --out:
    the refusal told the user to run "without --out (into out/<name>)", which is what they
    did. It says to give the paid run a folder of its own instead."""
    m = write_manifest(tmp_path / "m.csv", rows(2))
    first = run_cli("run", m, "--out", "out/m", *QUICK_EMULATE, "--no-progress", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    paid = run_cli(
        "run", m, "--base-url", emulator.base_url, "--no-progress", env=ENV, cwd=tmp_path
    )
    assert paid.returncode == 2
    line = one_error_line(paid.stderr)
    assert "without --out" not in line and "out/<name>" not in line, line
    assert "--emulate" in line and "--out DIR" in line, line
    assert emulator.stats()["generate_requests"] == 0


def test_emulated_money_is_shown_as_emulated_never_as_spent(tmp_path):
    m = write_manifest(tmp_path / "m.csv", rows(2))
    out = tmp_path / "o"
    assert run_cli("run", m, "--out", out, *QUICK_EMULATE, "--no-progress").returncode == 0
    st = run_cli("status", out, "--json")
    data = json.loads(st.stdout)
    assert data["spent"] == {} and data["emulated"] == {"USD": "0.03"}
    assert data["images_billed"] == 0 and data["images_emulated"] == 2
    text = run_cli("status", out).stdout
    assert "US$0.03 emulated" in text and "spent nothing" in text


def test_plan_of_a_rehearsal_folder_prices_what_is_left_as_emulated(tmp_path):
    """``plan out/m.emulated`` without --emulate: the only run that can go on in that folder is
    a rehearsal (a paid one is refused), so what is left is not priced as money to spend."""
    m = write_manifest(tmp_path / "m.csv", rows(4))
    out = tmp_path / "o.emulated"
    r = run_cli("run", m, "--out", out, *QUICK_EMULATE, "--limit", "1", "--no-progress")
    assert r.returncode == 4, r.stderr
    text = run_cli("plan", out)
    assert text.returncode == 0, text.stderr
    assert "a run would generate 3 images for about US$0.045 emulated;" in text.stdout
    data = json.loads(run_cli("plan", out, "--json").stdout)
    assert data["emulated"] is True and data["to_generate"] == 3


# ------------------------------------------------------------ 2. the manifest is the truth


def test_rows_that_leave_the_manifest_are_withdrawn_and_come_back(tmp_path, emulator):
    m = write_manifest(tmp_path / "m.csv", rows(5))
    out = tmp_path / "o"
    assert run_cli(*run_args(m, out, emulator.base_url, "--limit", "2"), env=ENV).returncode == 4
    done = {r[0] for r in db_rows(out / "batcher.db", "SELECT id FROM jobs WHERE state='done'")}
    assert len(done) == 2
    gone_done = sorted(done)[0]
    keep = [r for r in rows(5) if r[0] not in (gone_done, "p04")]
    write_manifest(m, keep)
    plan = run_cli("plan", m, "--out", out)
    assert plan.returncode == 0, plan.stderr
    assert "2 withdrawn" in plan.stdout
    r = run_cli(*run_args(m, out, emulator.base_url, "--json"), env=ENV)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["withdrawn"] == 2
    assert emulator.stats()["generate_requests"] == 4  # p04 was never generated
    states = dict(db_rows(out / "batcher.db", "SELECT id, state FROM jobs"))
    assert states[gone_done] == "withdrawn" and states["p04"] == "withdrawn"
    assert (out / "images" / f"{gone_done}.png").is_file()  # kept with its image
    listed = [
        json.loads(x)["id"]
        for x in (out / "images" / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert sorted(listed) == sorted(r[0] for r in keep)
    # the rows come back: the done one is done again, the other one is generated
    write_manifest(m, rows(5))
    back = run_cli(*run_args(m, out, emulator.base_url, "--json"), env=ENV)
    assert back.returncode == 0, back.stderr
    assert emulator.stats()["generate_requests"] == 5
    assert check_invariants(out) == {"done": 5}


def test_an_edited_prompt_without_id_withdraws_the_old_job(tmp_path, emulator):
    m = tmp_path / "m.csv"
    m.write_text("prompt,size\na red chair,512*512\na blue lamp,512*512\n", encoding="utf-8")
    out = tmp_path / "o"
    assert run_cli("plan", m, "--out", out).returncode == 0
    m.write_text("prompt,size\na red chair,512*512\na green lamp,512*512\n", encoding="utf-8")
    r = run_cli(*run_args(m, out, emulator.base_url), env=ENV)
    assert r.returncode == 0, r.stderr
    assert emulator.stats()["generate_requests"] == 2  # not the blue lamp as well
    assert check_invariants(out) == {"done": 2, "withdrawn": 1}


def test_a_folder_made_from_one_manifest_refuses_another_of_the_same_stem(tmp_path):
    write_manifest(tmp_path / "a" / "data.csv", rows(2))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "data.jsonl").write_text(
        '{"id": "x1", "prompt": "another product", "size": "512*512"}\n', encoding="utf-8"
    )
    assert run_cli("plan", "a/data.csv", cwd=tmp_path).returncode == 0
    clash = run_cli("plan", "b/data.jsonl", cwd=tmp_path)
    assert clash.returncode == 2
    line = one_error_line(clash.stderr)
    assert "a/data.csv" in line and "--out" in line
    assert db_rows(tmp_path / "out" / "data" / "batcher.db", "SELECT count(*) FROM jobs") == [(2,)]
    # the user names the folder: that is asking for it
    chosen = run_cli("plan", "b/data.jsonl", "--out", "out/data", "--json", cwd=tmp_path)
    assert chosen.returncode == 0, chosen.stderr
    assert "follows b/data.jsonl from now on" in chosen.stderr
    plan = json.loads(chosen.stdout)
    assert (plan["new"], plan["withdrawn"], plan["pending"]) == (1, 2, 1)


def test_run_dir_resumes_from_the_run_folder_alone(tmp_path, emulator):
    m = write_manifest(tmp_path / "m.csv", rows(4))
    out = tmp_path / "o"
    assert run_cli(*run_args(m, out, emulator.base_url, "--limit", "1"), env=ENV).returncode == 4
    r = run_cli(
        "run", out, "--base-url", emulator.base_url, "--no-progress", "--rps", "1000", env=ENV
    )
    assert r.returncode == 0, r.stderr
    assert check_invariants(out) == {"done": 4}
    assert emulator.stats()["generate_requests"] == 4


def test_changing_only_the_output_moves_the_image_instead_of_paying_again(tmp_path, emulator):
    header = "id,prompt,size,output"
    m = write_manifest(tmp_path / "m.csv", [(*r, f"old/{r[0]}.png") for r in rows(3)], header)
    out = tmp_path / "o"
    assert run_cli(*run_args(m, out, emulator.base_url), env=ENV).returncode == 0
    before = (out / "images" / "old" / "p01.png").read_bytes()
    moved = [(*r, f"new/{r[0]}.png" if r[0] == "p01" else f"old/{r[0]}.png") for r in rows(3)]
    write_manifest(m, moved, header)
    r = run_cli(*run_args(m, out, emulator.base_url), env=ENV)
    assert r.returncode == 0, r.stderr
    assert emulator.stats()["generate_requests"] == 3  # nothing generated again
    assert (out / "images" / "new" / "p01.png").read_bytes() == before
    assert not (out / "images" / "old" / "p01.png").exists()
    assert check_invariants(out) == {"done": 3}
    meta = (out / "images" / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    names = sorted(json.loads(x)["file_name"] for x in meta)
    assert names == ["new/p01.png", "old/p00.png", "old/p02.png"]


def test_the_run_s_first_line_counts_replaced_and_moved_jobs_too(tmp_path, emulator):
    """It said "0 new jobs, 1 already imported" of 3 jobs: the replaced and the moved ones
    were in no count."""
    header = "id,prompt,size,output"
    m = write_manifest(tmp_path / "m.csv", [(*r, f"{r[0]}.png") for r in rows(3)], header)
    out = tmp_path / "o"
    assert run_cli(*run_args(m, out, emulator.base_url), env=ENV).returncode == 0
    edited = [
        ("p00", "an edited prompt", "512*512", "p00.png"),
        ("p01", "a product photo of item 1", "512*512", "moved/p01.png"),
        ("p02", "a product photo of item 2", "512*512", "p02.png"),
    ]
    write_manifest(m, edited, header)
    r = run_cli(*run_args(m, out, emulator.base_url, "--replace"), env=ENV)
    assert r.returncode == 0, r.stderr
    first = r.stderr.splitlines()[0]
    assert "0 new jobs, 1 already imported, 1 replaced, 1 moved;" in first, first


# ------------------------------------------------------------ 4. money per currency, budget


def test_totals_are_per_currency_never_summed_across(tmp_path, emulator):
    m = write_manifest(tmp_path / "m.csv", rows(5))
    out = tmp_path / "o"
    cn = run_cli(*run_args(m, out, emulator.base_url, "--region", "cn", "--limit", "2"), env=ENV)
    assert cn.returncode == 4, cn.stderr
    intl = run_cli(*run_args(m, out, emulator.base_url, "--json"), env=ENV)
    assert intl.returncode == 0, intl.stderr
    assert json.loads(intl.stdout)["spent"] == {"CNY": "0.20", "USD": "0.045"}
    st = json.loads(run_cli("status", out, "--json").stdout)
    assert st["spent"] == {"CNY": "0.20", "USD": "0.045"}
    text = run_cli("status", out).stdout
    assert "CN¥0.20" in text and "US$0.045" in text and "US$0.245" not in text
    assert "US$0.245" not in intl.stderr and "CN¥0.20" in intl.stderr


def test_budget_is_cumulative_for_the_run_folder(tmp_path, emulator):
    m = write_manifest(tmp_path / "m.csv", rows(10))
    out = tmp_path / "o"
    first = run_cli(*run_args(m, out, emulator.base_url, "--budget", "0.05"), env=ENV)
    assert first.returncode == 4, first.stderr
    assert emulator.stats()["images_billed"] == 3  # 0.045; a 4th would pass 0.05
    again = run_cli(*run_args(m, out, emulator.base_url, "--budget", "0.05"), env=ENV)
    assert again.returncode == 4, again.stderr
    assert "budget" in again.stderr
    assert emulator.stats()["images_billed"] == 3  # the folder already spent it
    more = run_cli(*run_args(m, out, emulator.base_url, "--budget", "0.09USD"), env=ENV)
    assert more.returncode == 4, more.stderr
    assert emulator.stats()["images_billed"] == 6


def test_budget_in_a_named_currency(tmp_path, emulator):
    m = write_manifest(tmp_path / "m.csv", rows(5))
    out = tmp_path / "o"
    r = run_cli(
        *run_args(m, out, emulator.base_url, "--region", "cn", "--budget", "0.3CNY"), env=ENV
    )
    assert r.returncode == 4, r.stderr
    assert emulator.stats()["images_billed"] == 3
    wrong = run_cli(*run_args(m, out, emulator.base_url, "--budget", "1CNY"), env=ENV)
    assert wrong.returncode == 2
    assert "USD" in one_error_line(wrong.stderr)
    assert emulator.stats()["generate_requests"] == 3


def test_a_budget_below_one_image_refuses_before_any_call(tmp_path, emulator):
    m = write_manifest(tmp_path / "m.csv", rows(3))
    r = run_cli(*run_args(m, tmp_path / "o", emulator.base_url, "--budget", "0.01"), env=ENV)
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert "0.01" in line and "US$0.015" in line
    assert emulator.stats()["generate_requests"] == 0


def test_plan_prints_the_time_at_the_quota_beside_the_cost(tmp_path):
    m = write_manifest(tmp_path / "m.csv", rows(200))
    r = run_cli("plan", m, "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    assert "200 images at 2/s: ~1:40" in r.stdout and "US$3.00" in r.stdout
    faster = run_cli("plan", m, "--out", tmp_path / "o", "--rps", "4", "--json")
    assert json.loads(faster.stdout)["seconds_at_quota"] == 50
