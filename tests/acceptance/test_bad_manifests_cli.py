"""Every broken manifest of the corpus in tests/data/bad_manifests/, given to
``batcher plan``: exit code 2, one line per problem naming the file (and the line, where the
problem has one) with the expected message, no traceback, nothing imported.

Starting a Python process per file costs more than the rest of the suite, so the whole corpus goes
through the CLI's ``main()`` in one subprocess (fresh interpreter, real argv, stdout and stderr
captured per file); a few files also go through ``python -m batcher`` as their own process, with
``run`` as well as ``plan``.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO, run_cli

CORPUS = REPO / "tests" / "data" / "bad_manifests"
EXPECTED = CORPUS / "expected.json"

DRIVER = r"""
import contextlib, io, json, sys, traceback
from batcher.cli import main

results = {}
for path, out in json.loads(sys.argv[1]):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main(["plan", path, "--out", out])
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            traceback.print_exc()
            code = "crashed"
    results[path] = {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}
print(json.dumps(results))
"""


def corpus_files() -> list[Path]:
    # dotfiles (.gitattributes) belong to the repository, not the corpus
    names = (p for p in CORPUS.iterdir() if p.is_file() and not p.name.startswith("."))
    return sorted(p for p in names if p != EXPECTED)


def jobs_imported(out: Path) -> int:
    db = out / "batcher.db"
    if not db.exists():
        return 0
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT count(*) FROM jobs").fetchone()[0]
    finally:
        con.close()


def check_report(shown: str, stderr: str, stdout: str, code: object, expect: dict) -> None:
    assert code == 2, (shown, code, stderr)
    assert stdout == "", (shown, stdout)
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert lines, shown
    for line in lines:
        # one clear line per problem: it names the file, and is not a dump of the input
        assert line.startswith(f"{shown}:"), (shown, line)
        assert len(line) < 400, (shown, line[:200])
    assert len(lines) == len(set(lines)), lines
    line, field, words = expect["line"], expect["field"], expect["contains"]
    where = f"{shown}:{line}: " if line is not None else f"{shown}: "
    if field is not None:
        where += f"{field}: "
    matching = [x for x in lines if x.startswith(where) and words in x]
    assert matching, (where, words, lines)


def test_the_corpus_is_complete():
    files = {p.name for p in corpus_files()}
    expected = json.loads(EXPECTED.read_text(encoding="utf-8"))
    assert files == set(expected), files ^ set(expected)
    suffixes = [Path(name).suffix for name in files]
    assert len(files) >= 30
    for kind in (".yaml", ".csv", ".jsonl"):
        assert suffixes.count(kind) >= 5, kind


def test_every_broken_manifest_is_refused_with_located_lines(tmp_path):
    expected = json.loads(EXPECTED.read_text(encoding="utf-8"))
    files = corpus_files()
    pairs = [(str(p.relative_to(REPO)), str(tmp_path / p.name)) for p in files]
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(pairs)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    assert "pwned" not in proc.stdout + proc.stderr  # no YAML tag ran a command
    results = json.loads(proc.stdout.splitlines()[-1])
    problems = []
    for path, out in pairs:
        got = results[path]
        try:
            check_report(path, got["stderr"], got["stdout"], got["code"], expected[Path(path).name])
            assert jobs_imported(Path(out)) == 0, "jobs were imported"
        except AssertionError as exc:
            problems.append(f"{path}: {exc}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "name",
    ["yaml_python_object.yaml", "csv_nul.csv"],
)
def test_plan_as_its_own_process(tmp_path, name):
    shown = str((CORPUS / name).relative_to(REPO))
    r = run_cli("plan", shown, "--out", tmp_path / "out")
    expect = json.loads(EXPECTED.read_text(encoding="utf-8"))[name]
    check_report(shown, r.stderr, r.stdout, r.returncode, expect)
    assert "pwned" not in r.stdout + r.stderr
    assert jobs_imported(tmp_path / "out") == 0


def test_run_refuses_a_broken_manifest_before_any_call(tmp_path):
    shown = str((CORPUS / "yaml_duplicate_id.yaml").relative_to(REPO))
    r = run_cli("run", shown, "--out", tmp_path / "out", "--emulate", "--emulate-latency", "0")
    expect = json.loads(EXPECTED.read_text(encoding="utf-8"))["yaml_duplicate_id.yaml"]
    check_report(shown, r.stderr, r.stdout, r.returncode, expect)
    assert jobs_imported(tmp_path / "out") == 0
