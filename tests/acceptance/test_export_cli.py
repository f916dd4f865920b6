"""``batcher export`` as a dataset builder uses it: records, Parquet and WebDataset shards read
back by the libraries people load them with, and the mistakes that must end in one line."""

from __future__ import annotations

import csv
import gc
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import anyio
import pytest

from batcher.emulator import EmulatorConfig, EmulatorThread
from bench.dataset_fixture import fabricate
from tests.support import REPO, batcher_cmd, run_args, run_cli

KEY = "sk-export-test-0000"

datasets = pytest.importorskip("datasets")
webdataset = pytest.importorskip("webdataset")


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of 6 images (2 splits, a label and a style per row, one prompt in
    Chinese, one id with a dot) and one failed job."""
    tmp = tmp_path_factory.mktemp("export")
    m = tmp / "m.jsonl"
    rows = [
        {"id": f"p.{i}" if i == 0 else f"p-{i}", "prompt": f"a lamp number {i}",
         "size": "512*512", "seed": i, "label": i % 3, "style": "flat",
         "output": ("train" if i < 4 else "test") + "/{id}.png"}
        for i in range(6)
    ]  # fmt: skip
    rows[5]["prompt"] = "一盏台灯"
    rows.append({"id": "bad", "prompt": "a forbidden lamp", "size": "512*512"})
    m.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    out = tmp / "run"
    cfg = EmulatorConfig(latency="0", rps=100_000.0, api_key=KEY, moderate=("forbidden",))
    with EmulatorThread(cfg) as emu:
        r = run_cli(*run_args(m, out, emu.base_url), env={"DASHSCOPE_API_KEY": KEY})
    assert r.returncode == 1, r.stderr  # the moderated job failed
    return out


def _read_wds(shards: list[str]) -> list[dict]:
    """Every sample of ``shards`` as webdataset decodes them. (webdataset leaves its tar files
    to the garbage collector; their ResourceWarning is its own, not ours.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        pipeline = webdataset.WebDataset(shards, shardshuffle=False).decode("pil")
        samples = list(pipeline)
        del pipeline
        gc.collect()
    return samples


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_parquet_loads_as_pil_images_with_every_field_and_is_byte_identical_again(
    run_folder, tmp_path, monkeypatch
):
    out = tmp_path / "pq"
    r = run_cli("export", run_folder, "--format", "parquet", "-o", out, "--shard-size", "2kB")
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in out.iterdir())
    assert "README.md" in names
    assert not [n for n in names if n.startswith(".")]
    train = [n for n in names if n.startswith("train-")]
    assert len(train) > 1 and all(n.endswith(f"-of-{len(train):05d}.parquet") for n in train)
    first = _digest(out)
    r = run_cli("export", run_folder, "--format", "parquet", "-o", out, "--shard-size", "2kB")
    assert r.returncode == 0, r.stderr
    assert _digest(out) == first
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    files = {"train": str(out / "train-*.parquet"), "test": str(out / "test-*.parquet")}
    ds = datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "c"))
    assert (len(ds["train"]), len(ds["test"])) == (4, 2)
    row = {r["id"]: r for r in ds["test"]}["p-5"]
    assert row["image"].size == (512, 512)
    assert (row["prompt"], row["seed"], row["label"], row["style"]) == ("一盏台灯", 5, 2, "flat")
    assert row["created_at"].endswith("Z")
    card = (out / "README.md").read_text("utf-8")
    assert "- zh" in card and "- en" in card and "US$" in card and "Licence" in card


def test_parquet_no_embed_names_the_files(run_folder, tmp_path, monkeypatch):
    out = tmp_path / "pq"
    r = run_cli("export", run_folder, "--format", "parquet", "-o", out, "--no-embed")
    assert r.returncode == 0, r.stderr
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    ds = datasets.load_dataset(
        "parquet", data_files=str(out / "train-*.parquet"), cache_dir=str(tmp_path / "c")
    )
    assert ds["train"][0]["image"].size == (512, 512)
    import pyarrow.parquet as pq

    table = pq.read_table(next(out.glob("train-*.parquet")))
    assert table.column("image")[0].as_py()["bytes"] is None


def test_webdataset_shards_read_back_with_every_field(run_folder, tmp_path):
    out = tmp_path / "wds"
    r = run_cli("export", run_folder, "--format", "webdataset", "-o", out, "--state", "all")
    assert r.returncode == 0, r.stderr
    first = _digest(out)
    shards = sorted(str(p) for p in out.glob("*.tar"))
    assert [Path(s).name for s in shards] == [
        "data-000000.tar",
        "test-000000.tar",
        "train-000000.tar",
    ]
    samples = _read_wds(shards)
    by_id = {s["json"]["id"]: s for s in samples}
    assert set(by_id) == {"p.0", "p-1", "p-2", "p-3", "p-4", "p-5", "bad"}
    assert by_id["p.0"]["png"].size == (512, 512)
    assert by_id["p.0"]["txt"] == "a lamp number 0"
    assert by_id["p-5"]["json"]["label"] == 2
    assert "." not in by_id["p.0"]["__key__"]
    assert "png" not in by_id["bad"] and by_id["bad"]["json"]["state"] == "failed"
    r = run_cli("export", run_folder, "--format", "webdataset", "-o", out, "--state", "all")
    assert _digest(out) == first


def test_records_follow_the_extension_and_keep_every_column(run_folder, tmp_path):
    r = run_cli("export", run_folder, "-o", tmp_path / "jobs.csv")
    assert r.returncode == 0, r.stderr
    with (tmp_path / "jobs.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 7 and rows[0]["label"] == "0" and rows[0]["style"] == "flat"
    r = run_cli("export", run_folder, "--state", "failed")
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["id"] for x in records] == ["bad"]
    r = run_cli("export", run_folder)
    done = [json.loads(line) for line in r.stdout.splitlines() if '"done"' in line]
    meta = [
        json.loads(line)
        for f in ("train", "test")
        for line in (run_folder / "images" / f / "metadata.jsonl").read_text("utf-8").splitlines()
    ]
    assert {x["id"]: x["actual_prompt"] for x in done} == {
        x["id"]: x["actual_prompt"] for x in meta
    }


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["-o", "{tmp}/missing/jobs.csv"], "does not exist"),
        (["-o", "{tmp}"], "is a folder"),
        (["-o", "{tmp}/jobs.txt"], "cannot tell the format"),
        (["--format", "parquet"], "-o FOLDER"),
        (["--format", "parquet", "-o", "{tmp}/file.csv"], "is a file"),
        (["--shard-size", "lots", "--format", "parquet", "-o", "{tmp}/p"], "--shard-size"),
    ],
)
def test_a_bad_output_is_one_line_and_leaves_nothing(run_folder, tmp_path, args, says):
    (tmp_path / "file.csv").write_text("mine\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run_cli("export", run_folder, *[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("batcher: ") and says in r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "file.csv").read_text() == "mine\n"


def test_a_closed_pipe_ends_the_export_quietly(run_folder):
    proc = subprocess.Popen(
        batcher_cmd("export", run_folder), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # what `| head -1` does
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) in (0, 141)
    assert "Traceback" not in err and "BrokenPipe" not in err


@pytest.mark.serial  # a race: killed before it has finished
def test_a_killed_export_leaves_no_shard_under_a_final_name(tmp_path):
    run = tmp_path / "big"
    anyio.run(fabricate, run, 3000)
    out = tmp_path / "wds"
    proc = subprocess.Popen(
        batcher_cmd("export", run, "--format", "webdataset", "-o", out, "--shard-size", "20kB"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if out.is_dir() and any(p.name.endswith(".part") for p in out.iterdir()):
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    names = [p.name for p in out.iterdir()]
    assert any(n.endswith(".part") for n in names)
    assert not [n for n in names if n.endswith(".tar") or n == "README.md"], names
    r = run_cli("export", run, "--format", "webdataset", "-o", out, "--shard-size", "2MB")
    assert r.returncode == 0, r.stderr
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert len(_read_wds(sorted(map(str, out.glob("*.tar"))))) == 3000


def test_large_images_go_into_the_shards_byte_for_byte(tmp_path):
    """Photograph-sized images (120 kB, written past the per-sample join) beside small
    members, over several shards: every member is the file's bytes, tarfile and webdataset
    read them, and an export again writes the same bytes."""
    import tarfile

    run = tmp_path / "run"
    anyio.run(lambda: fabricate(run, 9, side=200, noise=True))
    out = tmp_path / "wds"
    args = ("export", run, "--format", "webdataset", "-o", out, "--shard-size", "300kB")
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    first = _digest(out)
    shards = sorted(str(p) for p in out.glob("*.tar"))
    assert len(shards) >= 4  # two samples a shard at most, in two splits
    pngs = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".png"):
                    pngs[member.name] = tar.extractfile(member).read()  # type: ignore[union-attr]
    samples = _read_wds(shards)
    assert len(samples) == len(pngs) == 9
    for s in samples:
        image = (run / s["json"]["file"]).read_bytes()
        assert len(image) > 100_000
        assert pngs[f"{s['__key__']}.png"] == image and s["png"].size == (200, 200)
    run_cli(*args)
    assert _digest(out) == first


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_a_rehearsal_s_card_says_its_cost_was_emulated(tmp_path, fmt):
    """A folder of emulated images (--emulate) cost nobody anything: its card says so, in
    the lean WebDataset path and the general one alike; a paid folder's card shows no such
    line (the run_folder fixture's, above)."""
    m = tmp_path / "m.csv"
    m.write_text("id,prompt,size\nr1,a red chair,512*512\nr2,一把椅子,512*512\n", "utf-8")
    run = tmp_path / "run"
    r = run_cli("run", m, "--out", run, "--emulate", "--emulate-latency", "0", "--no-progress")
    assert r.returncode == 0, r.stderr
    out = tmp_path / fmt
    assert run_cli("export", run, "--format", fmt, "-o", out).returncode == 0
    card = (out / "README.md").read_text("utf-8")
    assert "- cost: nothing billed; US$0.03 emulated (a rehearsal: not billed)" in card, card


def test_a_paid_folder_s_card_shows_what_was_billed(run_folder, tmp_path):
    out = tmp_path / "wds"
    assert run_cli("export", run_folder, "--format", "webdataset", "-o", out).returncode == 0
    card = (out / "README.md").read_text("utf-8")
    assert "- cost: US$" in card and "emulated" not in card, card


_LIMITED = (
    "import os, resource, signal, sys; "
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2); "
    "os.execv(sys.executable, [sys.executable, '-m', 'batcher', *sys.argv[2:]])"
)


@pytest.mark.parametrize(
    ("fmt", "pure"),
    [("webdataset", "0"), ("webdataset", "1"), ("parquet", "0"), ("jsonl", "0")],
)
def test_a_write_that_fails_half_way_is_one_line_and_leaves_no_temporary_file(tmp_path, fmt, pure):
    """A shard (or the file) grows past what the file system lets it (here a file size limit
    of 200 kB: EFBIG, as a full disk gives ENOSPC) half-way through the export: exit 2 with
    one line, and neither a final nor a temporary file is left to fill the disk (both
    WebDataset loops, both processes; Parquet; JSONL)."""
    run = tmp_path / "run"
    anyio.run(lambda: fabricate(run, 400, side=128, noise=True))  # ~50 kB a sample
    out = tmp_path / ("out.jsonl" if fmt == "jsonl" else "out")
    env = {k: v for k, v in os.environ.items() if k != "DASHSCOPE_API_KEY"}
    r = subprocess.run(
        [sys.executable, "-c", _LIMITED, "200000", "export", str(run), "--format", fmt,
         "-o", str(out)],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        env={**env, "BATCHER_PURE_PYTHON": pure}, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("batcher: error:") and "too large" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
    left = [p.name for p in tmp_path.rglob("*") if p.is_file() and run not in p.parents]
    assert left == [], left
