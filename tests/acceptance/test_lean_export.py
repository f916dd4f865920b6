"""``batcher export --format webdataset`` of a run folder takes the lean path (the standard
library's sqlite3, :mod:`batcher.leanexport`): its shards and card must be the bytes the
general path (:class:`jobs.JobStore`, :mod:`batcher.shardexport`) writes, for Chinese and
long ids, a job of several images, a missing image, a failed job, odd variables; the
webdataset library and ``tar tf`` read them back; it refuses a newer schema and migrates an
older one as the general path does; a killed export leaves no shard and no process behind."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import anyio
import pytest

from batcher import leanexport
from batcher.emulator import EmulatorConfig, EmulatorThread
from batcher.export import ExportOptions, run_export
from batcher.layout import RunLayout
from batcher.leanexport import export_webdataset
from bench.dataset_fixture import fabricate
from jobs import JobStore
from jobs.version import SCHEMA_VERSION
from tests.support import batcher_cmd, read_only, run_args, run_cli

KEY = "sk-lean-export-0000"
LONG_ID = "长" * 60  # 180 bytes: its sample key is past a ustar name's 100 bytes
DATA = Path(__file__).resolve().parent.parent / "data"

webdataset = pytest.importorskip("webdataset")


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run: Chinese ids (one of 180 bytes), a job of two images, a prompt with
    quotes, a backslash and a tab, model parameters, variables with a clash and a ``%`` in a
    name, a float; two splits and images outside them; a failed job; one image deleted."""
    tmp = tmp_path_factory.mktemp("lean")
    rows = [
        {"id": "台灯-一号", "prompt": "一盏台灯", "output": "train/{id}.png", "label": 1},
        {"id": LONG_ID, "prompt": "a long id", "output": "train/{id}.png", "label": 2},
        {"id": "quote", "prompt": 'a "quoted" \\ lamp\twith a tab', "output": "test/{id}.png",
         "label": 3, "state": "kept", "50%": "half", "ratio": 0.30000000000000004},
        {"id": "pair", "prompt": "two lamps", "output": "train/{id}.png", "n": 2,
         "model": "wan2.2-t2i-flash", "negative_prompt": "blurry", "watermark": False},
        {"id": "loose", "prompt": "no split", "output": "{id}.png", "label": 5},
        {"id": "dark", "prompt": "a dark lamp", "output": "test/{id}.png", "prompt_extend": True,
         "model": "wan2.2-t2i-flash",
         "negative_prompt": "bright", "watermark": True, "label": 6},
        {"id": "gone", "prompt": "deleted after the run", "output": "test/{id}.png"},
        {"id": "bad", "prompt": "a forbidden lamp", "output": "test/{id}.png"},
    ]  # fmt: skip
    for row in rows:
        row.setdefault("size", "512*512")
    manifest = tmp / "m.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    out = tmp / "run"
    cfg = EmulatorConfig(
        latency="0", rps=100_000.0, api_key=KEY, moderate=("forbidden",), task_seconds="0.1"
    )
    with EmulatorThread(cfg) as emu:
        r = run_cli(*run_args(manifest, out, emu.base_url), env={"DASHSCOPE_API_KEY": KEY})
    assert r.returncode == 1, r.stderr  # the moderated job failed
    (out / "images" / "test" / "gone.png").unlink()
    return out


@pytest.fixture(params=["c", "python"])
def loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The lean export's row loop: in C (:mod:`batcher._speedups`), or its Python body
    alone (``BATCHER_PURE_PYTHON=1``), in this process and in the CLI's."""
    if request.param == "python":
        monkeypatch.setenv("BATCHER_PURE_PYTHON", "1")
        return "python"
    monkeypatch.delenv("BATCHER_PURE_PYTHON", raising=False)
    if leanexport._speedups() is None:
        if os.environ.get("CI") == "true":  # make test builds it: here it must be there
            pytest.fail("batcher._speedups was not built (pip install -e . with a C compiler)")
        pytest.skip("batcher._speedups is not built here (no C compiler at install)")
    return "c"


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _general(run: Path, out: Path, **options: object) -> None:
    """The general path's export (the job store, the event loop), in this process."""

    async def go() -> None:
        opt = ExportOptions(fmt="webdataset", output=out, **options)  # type: ignore[arg-type]
        async with await JobStore.open(RunLayout(run).db, create=False) as store:
            await run_export(store, RunLayout(run), opt, sys.stdout)

    anyio.run(go)


def _read_wds(shards: list[Path]) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        pipeline = webdataset.WebDataset([str(s) for s in shards], shardshuffle=False)
        samples = list(pipeline.decode("pil"))
        del pipeline
        gc.collect()
    return samples


@pytest.mark.parametrize(
    "args",
    [(), ("--state", "all"), ("--state", "failed"), ("--state", "all", "--shard-size", "3kB")],
)
@pytest.mark.usefixtures("loop")
def test_the_lean_path_writes_the_general_paths_bytes(run_folder, tmp_path, args):
    lean, general = tmp_path / "lean", tmp_path / "general"
    r = run_cli("export", run_folder, "--format", "webdataset", "-o", lean, *args)
    assert r.returncode == 0, r.stderr
    options: dict[str, object] = {}
    if "--state" in args:
        options["state"] = args[args.index("--state") + 1]
    if "--shard-size" in args:
        options["shard_size"] = 3000
    _general(run_folder, general, **options)
    assert _digest(lean) == _digest(general)
    if "--shard-size" in args:
        assert len(list(lean.glob("train-*.tar"))) > 1
    # and again: the same bytes
    r = run_cli("export", run_folder, "--format", "webdataset", "-o", lean, *args)
    assert r.returncode == 0, r.stderr
    assert _digest(lean) == _digest(general)


def test_the_cli_took_the_lean_path(run_folder, tmp_path):
    """In this process: the lean export takes the folder (it does not hand it back)."""
    opt = ExportOptions(fmt="webdataset", output=tmp_path / "wds", state="all")
    result = export_webdataset(RunLayout(run_folder), opt)
    assert result is not None
    assert result.records == 9  # 7 jobs of one image, two of the pair
    assert result.missing == 1


@pytest.mark.usefixtures("loop")
def test_samples_read_back_with_chinese_and_long_keys_and_a_missing_image(run_folder, tmp_path):
    out = tmp_path / "wds"
    r = run_cli("export", run_folder, "--format", "webdataset", "-o", out, "--state", "all")
    assert r.returncode == 0, r.stderr
    assert "exported 9 records in 3 webdataset shards" in r.stderr
    assert "warning: 1 done image not found; exported without" in r.stderr
    shards = sorted(out.glob("*.tar"))
    samples = _read_wds(shards)
    by_id: dict[str, list[dict]] = {}
    for s in samples:
        by_id.setdefault(s["json"]["id"], []).append(s)
    assert set(by_id) == {"台灯-一号", LONG_ID, "quote", "pair", "loose", "dark", "gone", "bad"}
    (dark,) = by_id["dark"]
    assert (dark["json"]["negative_prompt"], dark["json"]["watermark"]) == ("bright", True)
    assert dark["json"]["prompt_extend"] is True
    (lamp,) = by_id["台灯-一号"]
    assert lamp["__key__"] == "000000_台灯-一号" and lamp["txt"] == "一盏台灯"
    assert lamp["png"].size == (512, 512)
    (long,) = by_id[LONG_ID]
    assert len(f"{long['__key__']}.json".encode()) > 100 and "png" in long
    (quote,) = by_id["quote"]
    assert quote["txt"] == 'a "quoted" \\ lamp\twith a tab'
    assert quote["json"]["var_state"] == "kept" and quote["json"]["50%"] == "half"
    assert quote["json"]["ratio"] == 0.30000000000000004
    assert [s["json"]["image_index"] for s in by_id["pair"]] == [1, 2]
    assert all(s["json"]["negative_prompt"] == "blurry" for s in by_id["pair"])
    (gone,) = by_id["gone"]
    assert "png" not in gone and gone["json"]["state"] == "done"
    (bad,) = by_id["bad"]
    assert "png" not in bad and bad["json"]["state"] == "failed"
    # tar(1) lists the members tarfile reads, the long Chinese names whole
    for shard in shards:
        listed = subprocess.run(
            ["tar", "tf", str(shard)], capture_output=True, check=True, env={"LC_ALL": "C.UTF-8"}
        ).stdout.decode("utf-8")
        with tarfile.open(shard) as tar:
            assert listed.splitlines() == tar.getnames()
    with tarfile.open(out / "train-000000.tar") as tar:
        assert any(name.startswith(f"000001_{LONG_ID}") for name in tar.getnames())


def _copy(run: Path, tmp: Path) -> Path:
    copy = tmp / "copy"
    shutil.copytree(run, copy)
    return copy


@pytest.mark.usefixtures("loop")
def test_odd_values_and_no_variables_summary_still_give_the_general_paths_bytes(
    run_folder, tmp_path
):
    """A hand-edited table (text in a number column, an infinite latency, a huge integer)
    and no summary of the variables in meta (the lean path works them out and keeps the
    summary the general path keeps): the same bytes as the general path."""
    run = _copy(run_folder, tmp_path)
    with sqlite3.connect(run / "batcher.db") as db:
        db.execute("UPDATE jobs SET width = 'wide', seed = 2.5 WHERE id = 'quote'")
        db.execute("UPDATE jobs SET latency_ms = 9e999 WHERE id = 'loose'")
        db.execute("UPDATE jobs SET input_tokens = 12345678901234567 WHERE id = 'dark'")
        db.execute("DELETE FROM meta WHERE key = 'variables'")
    other = tmp_path / "other"
    shutil.copytree(run, other)
    lean, general = tmp_path / "lean", tmp_path / "general"
    opt = ExportOptions(fmt="webdataset", output=lean, state="all")
    assert export_webdataset(RunLayout(run), opt) is not None
    _general(other, general, state="all")
    summaries = []
    for folder in (run, other):
        with sqlite3.connect(folder / "batcher.db") as db:
            summaries.append(
                db.execute("SELECT value FROM meta WHERE key = 'variables'").fetchone()
            )
    assert summaries[0] is not None and summaries[0] == summaries[1]
    assert _digest(lean) == _digest(general)
    samples = {s["json"]["id"]: s for s in _read_wds(sorted(lean.glob("*.tar")))}
    assert samples["quote"]["json"]["width"] == "wide"
    assert samples["dark"]["json"]["input_tokens"] == 12345678901234567


@pytest.mark.usefixtures("loop")
def test_strings_and_numbers_sqlite_writes_give_the_general_paths_bytes(run_folder, tmp_path):
    """The records SQLite builds (json_quote for the strings, its own text of the integers and
    the cost) against the general path's encoder: control characters, DEL, U+2028/2029, an
    astral character, quotes and backslashes, a NUL, non-ASCII text; NULLs and set values
    in the optional columns; costs of many digits; a negative cost (built in Python)."""
    run = _copy(run_folder, tmp_path)
    odd = "".join(map(chr, range(0x20))) + '\x7f\u2028\u2029\U0001f600"\\/\u00e9\u4e00%s%%'
    with sqlite3.connect(run / "batcher.db") as db:
        db.execute(
            "UPDATE jobs SET prompt = ?, error_message = ?, review = 'approved', "
            "review_note = ?, reviewed_at = 1795972425.9995, latency_ms = NULL, "
            "cost_micros = 9223372036854775807, shortfall = ?, task_id = ? WHERE id = 'dark'",
            (odd, odd, "a \x00 NUL", "\u2028", "t\\1"),
        )
        db.execute(
            "UPDATE jobs SET cost_micros = 1000000, actual_prompt = ?, lane = ? "
            "WHERE id = '台灯-一号'",
            ("改写 \u2029 prompt", "\x00"),
        )
        db.execute("UPDATE jobs SET cost_micros = -5, currency = '' WHERE id = 'loose'")
        db.execute("UPDATE jobs SET cost_micros = 0, latency_ms = 0.1 WHERE id = 'bad'")
        db.execute("UPDATE jobs SET id = 'a b.c/d', prompt = ? WHERE id = 'quote'", ("\x00zh 一",))
    lean, general = tmp_path / "lean", tmp_path / "general"
    opt = ExportOptions(fmt="webdataset", output=lean, state="all")
    assert export_webdataset(RunLayout(run), opt) is not None
    _general(run, general, state="all")
    assert _digest(lean) == _digest(general)
    samples = {s["json"]["id"]: s for s in _read_wds(sorted(lean.glob("*.tar")))}
    assert samples["dark"]["json"]["prompt"] == odd and samples["dark"]["txt"] == odd
    assert samples["dark"]["json"]["cost"] == "9223372036854.775807"


def test_a_newer_schema_is_refused_in_one_line(run_folder, tmp_path):
    run = _copy(run_folder, tmp_path)
    with sqlite3.connect(run / "batcher.db") as db:
        db.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),)
        )
    out = tmp_path / "wds"
    r = run_cli("export", run, "--format", "webdataset", "-o", out)
    assert r.returncode == 2
    assert r.stderr.startswith("batcher: error: ") and "upgrade batcher" in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() or not [p for p in out.iterdir() if p.suffix == ".tar"]
    opt = ExportOptions(fmt="webdataset", output=out)
    assert export_webdataset(RunLayout(run), opt) is None  # not the lean path's to take


def test_an_older_schema_is_migrated_then_exported(tmp_path):
    """The version-1 run folder: the lean path hands it to the general one, which upgrades
    it (as any command does), and the next export is lean."""
    run = tmp_path / "v1"
    shutil.copytree(DATA / "v1_run" / "run", run)
    out = tmp_path / "wds"
    opt = ExportOptions(fmt="webdataset", output=out, state="all")
    assert export_webdataset(RunLayout(run), opt) is None
    r = run_cli("export", run, "--format", "webdataset", "-o", out, "--state", "all")
    assert r.returncode == 0, r.stderr
    first = _digest(out)
    with sqlite3.connect(run / "batcher.db") as db:
        (version,) = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert int(version) == SCHEMA_VERSION
    assert export_webdataset(RunLayout(run), opt) is not None
    assert _digest(out) == first


def test_a_read_only_folder_is_exported(run_folder, tmp_path):
    run = _copy(run_folder, tmp_path)
    out = tmp_path / "wds"
    lean = out / "lean"
    general = out / "general"
    out.mkdir()
    _general(run, general)
    with read_only(run) as prefix:
        r = subprocess.run(
            [*prefix, *batcher_cmd("export", run, "--format", "webdataset", "-o", lean)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
    assert _digest(lean) == _digest(general)


def _part_sizes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in out.iterdir() if p.name.endswith(".part")}


@pytest.mark.serial  # a race: killed before it has finished
def test_a_killed_export_of_two_splits_leaves_no_shard_and_no_writer(tmp_path):
    """Two splits: a second process writes one of them. SIGKILL to the command: both stop
    (the second is killed with its parent), only temporary files are left, and the next
    export writes every sample."""
    run = tmp_path / "big"
    anyio.run(fabricate, run, 6000)
    out = tmp_path / "wds"
    proc = subprocess.Popen(
        batcher_cmd("export", run, "--format", "webdataset", "-o", out, "--shard-size", "20kB"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            parts = _part_sizes(out) if out.is_dir() else {}
            if any(n.startswith(".train") for n in parts) and any(
                n.startswith(".test") for n in parts
            ):
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    time.sleep(0.3)
    before = _part_sizes(out)
    time.sleep(0.7)
    assert _part_sizes(out) == before  # nothing writes on
    names = [p.name for p in out.iterdir()]
    assert before and not [n for n in names if n.endswith(".tar") or n == "README.md"], names
    r = run_cli("export", run, "--format", "webdataset", "-o", out, "--shard-size", "2MB")
    assert r.returncode == 0, r.stderr
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert len(_read_wds(sorted(out.glob("*.tar")))) == 6000


@pytest.mark.usefixtures("loop")
def test_one_process_or_two_write_the_same_bytes(tmp_path):
    """The split-per-process export against the same export confined to one core."""
    run = tmp_path / "run"
    anyio.run(fabricate, run, 400)
    one, two = tmp_path / "one", tmp_path / "two"
    args = ("--format", "webdataset", "--shard-size", "30kB")
    r = run_cli("export", run, *args, "-o", two)
    assert r.returncode == 0, r.stderr
    pinned = subprocess.run(
        ["taskset", "-c", "0", *batcher_cmd("export", run, *args, "-o", one)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert pinned.returncode == 0, pinned.stderr
    assert _digest(one) == _digest(two)
    assert len(list(two.glob("test-*.tar"))) > 1


def test_a_split_the_weighing_missed_is_written_too(tmp_path, monkeypatch):
    """The split groups of a larger table are weighed on a few rows: a split none of them
    is in goes to the first process, and the bytes are one process's."""
    run = tmp_path / "run"
    anyio.run(fabricate, run, 400)
    with sqlite3.connect(run / "batcher.db") as db:
        db.execute("UPDATE jobs SET output = 'validation/rare.png' WHERE rowid = 1")
    monkeypatch.setattr(leanexport, "_WEIGHED", 2)  # two rows weighed: rowids 248 and 95
    db = sqlite3.connect(run / "batcher.db")
    try:
        groups = leanexport._split_groups(db, None)
    finally:
        db.close()
    assert sorted(groups) == [["test"], ["train"]]  # no validation
    two, one = tmp_path / "two", tmp_path / "one"
    assert export_webdataset(RunLayout(run), ExportOptions(fmt="webdataset", output=two))
    monkeypatch.setattr(leanexport, "_cores", lambda: 1)
    assert export_webdataset(RunLayout(run), ExportOptions(fmt="webdataset", output=one))
    assert _digest(two) == _digest(one)
    assert "validation-000000.tar" in _digest(two)


_PROBE = """
import json, sys
from batcher.cli import main
code = main(sys.argv[1:])
heavy = {"sqlalchemy", "aiosqlite", "anyio", "asyncio", "aiohttp", "pyarrow", "rich"}
print(json.dumps([code, sorted(m for m in sys.modules if m.split(".")[0] in heavy)]))
"""


def test_the_export_starts_without_sqlalchemy_or_an_event_loop(run_folder, tmp_path):
    """What made most of a small export's time: none of it is imported."""
    out = tmp_path / "wds"
    args = ["export", str(run_folder), "--format", "webdataset", "-o", str(out)]
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [0, []]
    assert "exported 8 records" in done.stderr  # the done ones


def test_a_database_url_is_the_general_paths(run_folder, tmp_path):
    """--db names the run's table elsewhere: the folder's batcher.db is not read (here the
    named database does not exist, so the general path says so)."""
    out = tmp_path / "wds"
    url = "postgresql://postgres@127.0.0.1:5432/batcher_test_lean_export_absent"
    r = run_cli("export", run_folder, "--db", url, "--format", "webdataset", "-o", out)
    assert r.returncode != 0 and r.stderr.startswith("batcher: error: "), r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() or not list(out.glob("*.tar"))


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.usefixtures("loop")
def test_an_unreadable_image_in_either_process_is_one_line_and_leaves_nothing(tmp_path, split):
    """A folder where an image should be, in the split of one process or the other: the
    export stops with the error in one line, both processes end, and no shard (final or
    temporary) is left."""
    run = tmp_path / "run"
    anyio.run(fabricate, run, 400)
    image = run / "images" / split / ("img-0000300.png" if split == "train" else "img-0000301.png")
    image.unlink()
    image.mkdir()
    out = tmp_path / "wds"
    r = run_cli("export", run, "--format", "webdataset", "-o", out, "--shard-size", "30kB")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("batcher: error:") and "directory" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1
    assert [p.name for p in out.iterdir()] == []


def test_the_c_loop_writes_the_rows_it_can_and_hands_back_the_others(
    run_folder, tmp_path, monkeypatch
):
    """The C loop writes the jobs of one image with ASCII ids itself (it does not hand every
    row back, which would pass the byte comparisons above as well); the Chinese ids and the
    job of two images go to the Python body."""
    fast = leanexport._speedups()
    if fast is None:
        if os.environ.get("CI") == "true":
            pytest.fail("batcher._speedups was not built (pip install -e . with a C compiler)")
        pytest.skip("batcher._speedups is not built here (no C compiler at install)")
    written: list[int] = []

    class Spy:
        def write_rows(self, *args: object) -> tuple[object, ...]:
            result = fast.write_rows(*args)
            written.append(result[0])
            return result

    monkeypatch.delenv("BATCHER_PURE_PYTHON", raising=False)
    monkeypatch.setattr(leanexport, "_speedups", Spy)
    monkeypatch.setattr(leanexport, "_cores", lambda: 1)  # one process: the spy sees all
    opt = ExportOptions(fmt="webdataset", output=tmp_path / "wds", state="all")
    result = export_webdataset(RunLayout(run_folder), opt)
    assert result is not None and result.records == 9
    # quote, loose, dark, gone and bad in C; 台灯-一号, the long id and the two images of
    # the pair in Python
    assert sum(written) == 5, written


@pytest.mark.parametrize("shard_size", ["30kB", "1MB", "3MB"])
def test_large_samples_with_python_rows_between_them_give_one_set_of_bytes(
    tmp_path, monkeypatch, shard_size
):
    """Samples of ~120 kB (the C loop hands over a megabyte at a time), shards that end after
    each sample or after several, and rows the Python body writes in between (a hand-edited
    number, a Chinese id): the C loop, the Python loop and the general path, byte for byte."""
    if leanexport._speedups() is None and os.environ.get("CI") != "true":
        pytest.skip("batcher._speedups is not built here (no C compiler at install)")
    run = tmp_path / "run"
    anyio.run(lambda: fabricate(run, 60, side=200, noise=True))
    with sqlite3.connect(run / "batcher.db") as db:
        db.execute("UPDATE jobs SET width = 'wide' WHERE rowid IN (7, 23, 41)")
        db.execute("UPDATE jobs SET id = '样品-十二' WHERE rowid = 12")
        db.execute("UPDATE jobs SET id = '样品-十三', output = 'x/13.png' WHERE rowid = 13")
    (run / "images" / "x").mkdir()
    digests = []
    for loop in ("c", "python"):
        if loop == "python":
            monkeypatch.setenv("BATCHER_PURE_PYTHON", "1")
        out = tmp_path / loop
        r = run_cli("export", run, "--format", "webdataset", "-o", out, "--shard-size", shard_size)
        assert r.returncode == 0, r.stderr
        assert "exported 60 records" in r.stderr and "1 done image not found" in r.stderr
        digests.append(_digest(out))
    general = tmp_path / "general"
    _general(run, general, shard_size={"30kB": 30_000, "1MB": 10**6, "3MB": 3 * 10**6}[shard_size])
    assert digests[0] == digests[1] == _digest(general)
    assert len(digests[0]) > 3  # several shards and the card
    samples = _read_wds(sorted((tmp_path / "c").glob("*.tar")))
    assert len(samples) == 60
    assert {s["json"]["id"] for s in samples} >= {"样品-十二", "样品-十三"}


@pytest.mark.usefixtures("loop")
def test_text_that_is_not_utf8_stops_the_export_in_one_line(tmp_path):
    """Bytes that are not UTF-8 in a text column (a table written by another program): the
    export says which column in one line, exits 2 and leaves no shard, whichever loop reads
    the row and whichever process writes its split."""
    run = tmp_path / "run"
    anyio.run(fabricate, run, 400)
    with sqlite3.connect(run / "batcher.db") as db:
        db.execute("UPDATE jobs SET prompt = CAST(X'41ff42' AS TEXT) WHERE rowid = 300")
        db.execute("UPDATE jobs SET error_message = CAST(X'c0af' AS TEXT) WHERE rowid = 301")
    out = tmp_path / "wds"
    r = run_cli("export", run, "--format", "webdataset", "-o", out)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("batcher: error: the job database failed: Could not decode")
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
    assert [p.name for p in out.iterdir()] == []
