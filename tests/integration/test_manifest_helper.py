"""A manifest read by a helper process (jobs.readahead): the same rows, warnings and errors as
in process, imported by a real store into a real SQLite file or PostgreSQL database (there as
CSV the helper writes), and no helper left behind.

The helper is seen as a child of this process in /proc (Linux); tests that need that skip
elsewhere.
"""

from __future__ import annotations

import os
import pickle
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from batcher.modelrules import RULES
from jobs import manifest as manifest_module
from jobs.errors import JobStoreError, ManifestError, ManifestInvalid
from jobs.manifest import open_manifest
from jobs.readahead import CHUNK, EARLY_CHUNKS, HelperRows
from jobs.schema import STAGING_COLUMNS
from jobs.spec import JobRow
from jobs.store import JobStore
from tests.conftest import store_target

from .store_support import T0, FakeClock, specs, table

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
HAVE_CHILDREN = any(Path("/proc/self/task").glob("*/children"))
needs_proc = pytest.mark.skipif(not HAVE_CHILDREN, reason="needs /proc/<pid>/task/*/children")


def children() -> set[int]:
    """This process's child processes (every thread's)."""
    found: set[int] = set()
    for listing in Path("/proc/self/task").glob("*/children"):
        found |= {int(pid) for pid in listing.read_text().split()}
    return found


def big_csv(path: Path, n: int, last: str | None = None) -> Path:
    """``n`` rows (``id,prompt,seed``), the last one replaced by ``last`` when given."""
    lines = ["id,prompt,seed"] + [f"job-{i:07d},a photo of item {i},{i}" for i in range(n)]
    if last is not None:
        lines[-1] = last
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read(path: Path, *, helper: bool) -> tuple[list[object], list[str], int]:
    """Rows, warnings and warning count, or the errors (as lines) in place of the rows."""
    manifest = open_manifest(path, rules=RULES)
    rows: list[object]
    try:
        rows = list(manifest.rows(helper=helper))
    except ManifestInvalid as exc:
        rows = [*(e.format() for e in exc.errors), f"truncated={exc.truncated}"]
    return rows, [w.format() for w in manifest.warnings], manifest.warning_count


CASES = {
    "catalog.yaml": None,
    "dataset.csv": None,
    "small.jsonl": None,
    "warnings.csv": "id,prompt\n" + "".join(f"w{i},{'x' * 900}\n" for i in range(120)),
    "errors.csv": "id,prompt,seed\na,p,1\nb,p,x\na,p,2\nc,,3\nd,p,4\nA,p,5\n",
    "many_errors.jsonl": "".join(f'{{"id": "j{i}", "prompt": ""}}\n' for i in range(40)),
    "bad_encoding.csv": b"id,prompt\na,caf\xe9\n",
}


@pytest.mark.parametrize("name", CASES)
def test_a_helper_reads_what_the_process_reads(tmp_path: Path, name: str) -> None:
    data = CASES[name]
    if data is None:
        path = SAMPLES / name
    else:
        path = tmp_path / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    in_process = read(path, helper=False)
    assert read(path, helper=True) == in_process
    assert in_process[0]  # rows or errors: something was compared


@pytest.mark.anyio
@pytest.mark.parametrize("first", [True, False], ids=["first_import", "later_import"])
@pytest.mark.parametrize(
    ("last", "field"),
    [("job-bad,a photo,seven", "seed"), ("job-0000003,a photo again,3", "id")],
    ids=["bad_seed", "duplicate_id"],
)
async def test_an_error_on_the_last_row_imports_nothing(
    tmp_path: Path, backend: str, first: bool, last: str, field: str
) -> None:
    n = 60_000
    path = big_csv(tmp_path / "m.csv", n, last)
    db = store_target(backend, tmp_path / "run" / "batcher.db")
    async with await JobStore.open(db, clock=FakeClock()) as store:
        if not first:
            await store.import_specs(specs(["keep"]), source=str(path))
        before = table(db)
        with pytest.raises(ManifestInvalid) as info:
            await store.import_rows(
                open_manifest(path, rules=RULES).rows(helper=True), source=str(path)
            )
        assert [(e.path, e.line, e.field) for e in info.value.errors] == [(str(path), n + 1, field)]
        assert table(db) == before
        # and the same file without the bad row imports in full
        big_csv(path, n - 1)
        report = await store.import_rows(
            open_manifest(path, rules=RULES).rows(helper=True), source=str(path)
        )
        assert report.added == n - 1


# Values the rows of a helper carry into either database exactly (PostgreSQL's COPY text is
# escaped by jobs.backends.postgres.copy_text): commas, quotes, tabs, line breaks (a lone CR
# too), backslashes, COPY's end-of-data marker, text that looks like its NULL, empty and blank
# variables, parameters, non-ASCII text, an id with a comma and quotes; and plain rows enough
# for the SQLite import's groups of rows (jobs.readahead.CHUNK, a last shorter group).
ODD_ROWS = [
    'tab,"a\tb",10,,,',
    'a,"hello, ""world""",1,"x,y",,',
    'b,"line one\nline two",2,,qwen-image,"blurry, low"',
    'b1,p,12,,qwen-image,"blurry, ""low"""',
    'b2,p,11,"quote "" and \\N",,',
    'c,"carriage\rreturn",3,,,',
    "d,\\N,4,\\.,,",
    'e,"\\.",5,"",qwen-image,\\N',
    'f,"  trailing space  ",6,  ,,',
    "g,青花瓷茶壶 ,7,第,,",
    '"h,""x""",\\,8,\\,,',
]


TRICKY = (
    "id,prompt,seed,caption,model,negative_prompt\n"
    + "".join(f"plain{i},a plain prompt {i},{i},c{i % 3},,\n" for i in range(CHUNK))
    + "".join(odd + "\n" for odd in ODD_ROWS)
)


@pytest.mark.anyio
async def test_a_helper_imports_exactly_what_is_read_in_process(
    tmp_path: Path, backend: str
) -> None:
    path = tmp_path / "m.csv"
    path.write_text(TRICKY, encoding="utf-8")
    db = store_target(backend, tmp_path / "run" / "batcher.db")

    def expected() -> list[tuple[object, ...]]:
        rows = open_manifest(path, rules=RULES).rows(helper=False)
        return [(*r[:6], int(r[6]), *r[7:]) for r in rows]

    def stored() -> list[tuple[object, ...]]:
        return [tuple(r[c] for c in STAGING_COLUMNS) for r in table(db)]

    async with await JobStore.open(db, clock=FakeClock()) as store:
        first = await store.import_rows(
            open_manifest(path, rules=RULES).rows(helper=True), source=str(path)
        )
        assert first.added == len(expected()) == CHUNK + len(ODD_ROWS)
        assert stored() == expected()
        assert {(r["state"], r["created_at"]) for r in table(db)} == {("pending", T0)}
        # A later import goes through the staging table: new variables update a job, a new
        # row is added after the others, the rest is unchanged.
        edited = TRICKY.replace('"x,y"', '"x,y,z"') + 'i,"new, one",9,"",,\n'
        path.write_text(edited, encoding="utf-8")
        again = await store.import_rows(
            open_manifest(path, rules=RULES).rows(helper=True), source=str(path)
        )
        assert (again.added, again.updated, again.unchanged) == (1, 1, first.added)
        assert stored() == expected()


@needs_proc
def test_closing_the_rows_early_stops_the_helper(tmp_path: Path) -> None:
    path = big_csv(tmp_path / "m.csv", 60_000)
    before = children()
    rows = open_manifest(path, rules=RULES).rows(helper=True)
    assert children() == before  # nothing starts until a row is asked for
    assert len([next(rows) for _ in range(10)]) == 10
    assert len(children() - before) == 1
    rows.close()  # type: ignore[attr-defined]
    assert children() == before


@needs_proc
@pytest.mark.anyio
async def test_a_helper_that_dies_fails_the_import_and_imports_nothing(tmp_path: Path) -> None:
    path = big_csv(tmp_path / "m.csv", 200_000)
    db = tmp_path / "run" / "batcher.db"
    before = children()

    def killed_midway() -> Iterator[JobRow]:
        for n, row in enumerate(open_manifest(path, rules=RULES).rows(helper=True)):
            if n == 5_000:
                for pid in children() - before:
                    os.kill(pid, signal.SIGKILL)
            yield row

    async with await JobStore.open(db, clock=FakeClock()) as store:
        with pytest.raises(JobStoreError, match=r"helper process reading .* stopped") as info:
            await store.import_rows(killed_midway(), source=str(path))
        assert not isinstance(info.value, ManifestInvalid)
        assert table(db) == []
    assert children() == before


@needs_proc
@pytest.mark.parametrize(
    ("name", "data", "helper"),
    [
        ("m.csv", "id,prompt\n" + "".join(f"j{i},p\n" for i in range(500)), True),
        ("m.jsonl", "".join(f'{{"id": "j{i}", "prompt": "p"}}\n' for i in range(500)), True),
        ("m.yaml", "jobs:\n" + "".join(f"  - prompt: p{i}\n" for i in range(500)), False),
    ],
)
def test_big_streamed_files_get_a_helper_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, data: str, helper: bool
) -> None:
    path = tmp_path / name
    path.write_text(data, encoding="utf-8")
    before = children()
    rows = open_manifest(path, rules=RULES).rows()
    next(rows)
    assert children() == before  # a small file is read in process
    monkeypatch.setattr(manifest_module, "HELPER_MIN_BYTES", 1_000)
    rows = open_manifest(path, rules=RULES).rows()
    next(rows)
    assert len(children() - before) == (1 if helper else 0)
    assert len(list(rows)) == 499


def test_manifest_errors_survive_pickling() -> None:
    error = ManifestInvalid([ManifestError("m.csv", 3, "seed", "'x' is not a whole number")])
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is ManifestInvalid and str(clone) == str(error)
    assert [vars(e) for e in clone.errors] == [vars(e) for e in error.errors]
    assert clone.truncated is False


# A helper started before its rows are wanted (HelperRows.start: the import starts it while
# it hashes the manifest) reads ahead, keeps what it read until asked in which form, and then
# hands over exactly the rows, warnings and errors it would have if started on the first row.
EARLY_CASES = {
    "plain": None,  # more chunks than a helper keeps before it waits to be asked
    "errors.csv": CASES["errors.csv"],
    "warnings.csv": CASES["warnings.csv"],
    "many_errors.jsonl": CASES["many_errors.jsonl"],
}


@needs_proc
@pytest.mark.parametrize("form", ["rows", "flat"])
@pytest.mark.parametrize("name", EARLY_CASES)
def test_a_helper_started_early_hands_over_what_it_would_have(
    tmp_path: Path, name: str, form: str
) -> None:
    data = EARLY_CASES[name]
    if data is None:
        path = big_csv(tmp_path / "m.csv", (EARLY_CHUNKS + 20) * CHUNK)
    else:
        path = tmp_path / name
        path.write_text(data, encoding="utf-8")
    in_process = read(path, helper=False)
    width = 4 if form == "flat" else None
    if width is not None and isinstance(in_process[0][-1], tuple):  # rows: as flat groups
        rows = in_process[0]
        groups = [rows[i : i + width] for i in range(0, len(rows), width)]
        in_process = ([tuple(v for r in g for v in r) for g in groups], *in_process[1:])
    before = children()
    manifest = open_manifest(path, rules=RULES)
    rows = manifest.rows(helper=True)
    assert isinstance(rows, HelperRows)
    rows.start()
    assert len(children() - before) == 1
    time.sleep(0.5 if data is not None else 2.0)  # let it read what it may
    taken: list[object]
    try:
        taken = list(rows.flat(width) if width is not None else rows)
    except ManifestInvalid as exc:
        taken = [*(e.format() for e in exc.errors), f"truncated={exc.truncated}"]
    assert (taken, [w.format() for w in manifest.warnings], manifest.warning_count) == in_process
    assert children() == before


@needs_proc
def test_a_helper_started_early_but_not_wanted_ends(tmp_path: Path) -> None:
    path = big_csv(tmp_path / "m.csv", 60_000)
    before = children()
    rows = open_manifest(path, rules=RULES).rows(helper=True)
    assert isinstance(rows, HelperRows)
    rows.start()
    assert len(children() - before) == 1
    rows.close()  # never asked for a row
    assert children() == before
    # The importing process that started it died: its end of the helper's stdin closes
    # without a word, and the helper ends by itself (quietly, status 0).
    rows = open_manifest(path, rules=RULES).rows(helper=True)
    assert isinstance(rows, HelperRows)
    rows.start()
    proc = rows._proc
    assert proc is not None and proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0
    rows.close()
    assert children() == before
