"""Every subcommand, given what a careless or hostile user gives it: bad numbers, missing and odd
paths (a directory, a file, read-only, names that are not UTF-8, symlinks), and a reader that
hangs up on stdout. No Python traceback may reach stderr, and the exit code is the documented
one (README, "Exit codes"): 0 ok, 2 a usage mistake, 3 a run stopped by the service or the
disk, 141 stdout closed early; ``batcher emulate`` exits 1 when it cannot listen.

Read-only cases run the CLI with the folder mounted read-only in a private mount namespace when
the tests run as root (permissions do not stop root), and with its write bits cleared otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.support import REPO, files_under, read_only, run_cli

PY = sys.executable
FAST_RUN = ("--emulate", "--emulate-latency", "0", "--rps", "1000", "--start-rps", "1000")


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "DASHSCOPE_API_KEY"}


def cli(
    *args: str | bytes | os.PathLike[str],
    prefix: Sequence[str] = (),
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    cmd = [
        *prefix,
        PY,
        "-m",
        "batcher",
        *(a if isinstance(a, bytes) else os.fspath(a) for a in args),
    ]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        errors="replace",
        env=env(),
        cwd=REPO,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def assert_clean(r: subprocess.CompletedProcess[str], code: int, *, one_line: bool = True) -> None:
    """The documented exit code; no traceback; a failure says so in one line: ``batcher...``,
    or for a manifest the located ``FILE[:LINE]: ...`` form every manifest problem takes."""
    shown = f"exit {r.returncode}\nstdout: {r.stdout[-500:]}\nstderr: {r.stderr[-1500:]}"
    assert "Traceback" not in r.stderr, shown
    assert "Exception ignored" not in r.stderr, shown
    assert r.returncode == code, shown
    if code not in (0, 141) and one_line:
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, shown
        assert lines[0].startswith(("batcher", "/")) and len(lines[0]) < 400, shown


DRIVER = r"""
import contextlib, io, json, sys, traceback
from batcher.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            traceback.print_exc()
            code = "crashed"
    results.append({"returncode": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()})
print(json.dumps(results))
"""


def in_one_process(
    cases: list[list[str]], *, prefix: Sequence[str] = ()
) -> list[subprocess.CompletedProcess[str]]:
    """Each argv through the CLI's ``main()``, all in one fresh interpreter (a process per case
    would cost more than the cases): real argv parsing, stdout and stderr captured per case.
    A file name that is not UTF-8 travels as its surrogate escapes, as ``sys.argv`` has it."""
    r = subprocess.run(
        [*prefix, PY, "-c", DRIVER, json.dumps(cases)],
        capture_output=True,
        text=True,
        env=env(),
        cwd=REPO,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stderr
    return [
        subprocess.CompletedProcess(argv, d["returncode"], d["stdout"], d["stderr"])
        for argv, d in zip(cases, json.loads(r.stdout.splitlines()[-1]), strict=True)
    ]


def write_manifest(path: Path, n: int) -> Path:
    rows = ["id,prompt,size,seed"] + [f"h{i:03d},a hostile lamp {i},512*512,{i}" for i in range(n)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def area(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run folder ``done/`` of 3 jobs, its manifest ``m.csv``, and ``big/``: 300
    jobs planned (an export of it is larger than a pipe's buffer)."""
    root = tmp_path_factory.mktemp("hostile")
    m = write_manifest(root / "m.csv", 3)
    r = cli("run", m, "--out", root / "done", "--no-progress", *FAST_RUN)
    assert r.returncode == 0, r.stderr
    big = write_manifest(root / "big.csv", 300)
    assert cli("plan", big, "--out", root / "big").returncode == 0
    return root


# ------------------------------------------------------------------------- arguments

USAGE = 2
BAD_RUN_FLAGS = [
    ("--rps", "inf"),
    ("--rps", "nan"),
    ("--rps", "0"),
    ("--rps", "-3"),
    ("--rps", "1e400"),
    ("--rps", "fast"),
    ("--grace", "-1"),
    ("--grace", "inf"),
    ("--concurrency", "0"),
    ("--max-attempts", "-1"),
    ("--limit", "0"),
    ("--request-timeout", "inf"),
    ("--unreachable-timeout", "-5"),
    ("--unreachable-timeout", "nan"),
    ("--budget", "lots"),
    ("--budget", "-1"),
    ("--budget", "inf"),
    ("--base-url", "ftp://127.0.0.1/api/v1"),
    ("--region", "mars"),
]


BAD_ARGUMENTS = [
    [],
    ["frobnicate"],
    ["run"],
    ["status"],
    ["export", "x", "--format", "xml"],
    ["plan", "m.csv", "--region", "moon"],
    ["emulate", "--port", "99999"],
    ["emulate", "--rps", "nan"],
    ["emulate", "--rps", "-1"],
    ["emulate", "--latency", "soon"],
    ["emulate", "--faults", "boom=2"],
    ["emulate", "--port", "eighty"],
]
COMMANDS = ["", "plan", "run", "status", "export", "retry", "emulate"]


@pytest.fixture(scope="module")
def refused(area: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    """The argument cases, run once: keyed by the argv joined with spaces."""
    out = str(area / "never")
    cases = [["run", str(area / "m.csv"), "--out", out, "--emulate", *f] for f in BAD_RUN_FLAGS]
    cases += BAD_ARGUMENTS
    cases += [[c, "--help"] if c else ["--help"] for c in COMMANDS]
    return {" ".join(argv): r for argv, r in zip(cases, in_one_process(cases), strict=True)}


@pytest.mark.parametrize(("flag", "value"), BAD_RUN_FLAGS, ids=[" ".join(f) for f in BAD_RUN_FLAGS])
def test_run_refuses_a_bad_number_or_choice_in_one_line(area, refused, flag, value):
    out = area / "never"
    r = refused[" ".join(["run", str(area / "m.csv"), "--out", str(out), "--emulate", flag, value])]
    assert_clean(r, USAGE, one_line=False)  # argparse: its usage line, then the error
    assert value in r.stderr or flag in r.stderr
    assert not out.exists(), "a refused run left a folder behind"


@pytest.mark.parametrize("args", BAD_ARGUMENTS, ids=lambda a: " ".join(a) or "nothing")
def test_bad_arguments_to_every_subcommand_exit_2(refused, args):
    assert_clean(refused[" ".join(args)], USAGE, one_line=False)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_subcommand(refused, command):
    r = refused[f"{command} --help" if command else "--help"]
    assert_clean(r, 0)
    assert r.stdout.startswith("usage: batcher")


def test_no_key_is_one_line(area, tmp_path):
    r = cli("run", area / "m.csv", "--out", tmp_path / "o")
    assert_clean(r, USAGE)
    assert "DASHSCOPE_API_KEY" in r.stderr
    assert not (tmp_path / "o").exists()


def test_emulate_rps_sets_the_emulated_quota(area, tmp_path):
    """A rehearsal at --rps 5 meets a 5/s quota: told the right rate, nothing is throttled."""
    m = write_manifest(tmp_path / "m.csv", 12)
    r = cli(
        "run", m, "--out", tmp_path / "o", "--emulate", "--emulate-latency", "0",
        "--rps", "5", "--start-rps", "5", "--no-progress", "--json",
    )  # fmt: skip
    assert_clean(r, 0)
    this_run = json.loads(r.stdout)["this_run"]
    assert this_run["throttled"] == 0 and this_run["generated"] == 12
    assert this_run["calls_per_second"] > 3.0


def test_emulate_cannot_listen_on_a_port_in_use():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        r = cli("emulate", "--port", str(held.getsockname()[1]))
    assert_clean(r, 1)
    assert "cannot listen" in r.stderr


# ----------------------------------------------------------------------------- paths


def test_paths_that_are_missing_or_the_wrong_kind(area, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder", encoding="utf-8")
    a_dir = tmp_path / "a-dir"
    a_dir.mkdir()
    cases: list[tuple[list[str | Path], int]] = [
        (["plan", tmp_path / "missing.csv"], USAGE),
        (["plan", a_dir], USAGE),
        (["plan", area / "m.csv", "--out", a_file], USAGE),
        (["run", tmp_path / "missing.csv", *FAST_RUN], USAGE),
        (["run", a_dir, *FAST_RUN], USAGE),
        (["run", area / "m.csv", "--out", a_file, *FAST_RUN], USAGE),
        (["run", area / "m.csv", "--out", a_file / "sub", *FAST_RUN], USAGE),
        (["status", tmp_path / "missing"], USAGE),
        (["status", a_file], USAGE),
        (["status", a_dir], USAGE),
        (["export", tmp_path / "missing"], USAGE),
        (["export", a_dir], USAGE),
        (["retry", tmp_path / "missing"], USAGE),
        (["retry", a_file], USAGE),
    ]
    before = files_under(tmp_path)
    results = in_one_process([[os.fspath(a) for a in args] for args, _ in cases])
    for (_, code), r in zip(cases, results, strict=True):
        assert_clean(r, code)
    assert files_under(tmp_path) == before, "a refused command left something behind"


def test_file_names_that_are_not_utf8(area, tmp_path):
    name = os.fsencode(tmp_path) + b"/lamps-\xff.csv"
    out = os.fsencode(tmp_path) + b"/out-\xfe"
    with open(name, "wb") as fh:
        fh.write((area / "m.csv").read_bytes())
    ran = cli("run", name, "--out", out, "--no-progress", *FAST_RUN)  # stdout as real bytes
    assert_clean(ran, 0)
    n, o = os.fsdecode(name), os.fsdecode(out)
    missing = os.fsdecode(os.fsencode(tmp_path) + b"/missing-\xff.csv")
    cases = [["plan", n, "--out", o], ["status", o], ["status", o, "--json"], ["export", o]]
    cases += [["retry", o], ["plan", missing]]
    for argv, r in zip(cases, in_one_process(cases), strict=True):
        assert_clean(r, USAGE if argv[1] == missing else 0)


def test_symlinks(area, tmp_path):
    link = tmp_path / "link.csv"
    link.symlink_to(area / "m.csv")
    dangling = tmp_path / "dangling.csv"
    dangling.symlink_to(tmp_path / "nowhere.csv")
    folder_link = tmp_path / "run-link"
    folder_link.symlink_to(area / "done", target_is_directory=True)
    cases = [
        ["plan", str(link), "--out", str(tmp_path / "o")],
        ["plan", str(dangling), "--out", str(tmp_path / "o")],
        ["status", str(folder_link)],
        ["export", str(folder_link)],
    ]
    codes = [0, USAGE, 0, 0]
    for code, r in zip(codes, in_one_process(cases), strict=True):
        assert_clean(r, code)
    lock_link = tmp_path / "o" / ".lock"
    lock_link.symlink_to(tmp_path / "elsewhere")
    assert_clean(cli("run", link, "--out", tmp_path / "o", *FAST_RUN), USAGE)
    assert not (tmp_path / "elsewhere").exists()


# ------------------------------------------------------------------------- read-only


def test_a_finished_run_folder_on_read_only_media_can_be_read(area, tmp_path):
    folder = tmp_path / "done"
    shutil.copytree(area / "done", folder)
    before = files_under(folder)
    m, f = str(area / "m.csv"), str(folder)
    cases = [
        ["status", f],
        ["status", f, "--json"],
        ["export", f],
        ["run", m, "--out", f, *FAST_RUN],
        ["run", m, "--out", str(folder / "sub"), *FAST_RUN],
        ["plan", m, "--out", f],
        ["retry", f],
        ["run", f, *FAST_RUN],  # the folder alone: its manifest is read from it, then refused
        ["plan", f],
    ]
    with read_only(folder) as prefix:
        found = in_one_process(cases, prefix=prefix)
    status, as_json, exported, again, sub, plan, retry, resume, plan_dir = found
    assert_clean(status, 0)
    assert "done       3" in status.stdout
    assert_clean(as_json, 0)
    assert json.loads(as_json.stdout)["done"] == 3
    assert_clean(exported, 0)
    assert len(exported.stdout.splitlines()) == 3
    for refused in (again, sub, plan, retry, resume, plan_dir):
        assert_clean(refused, USAGE)
        assert "read-only" in refused.stderr.lower()
    assert files_under(folder) == before


def test_a_read_only_folder_from_an_older_batcher_says_it_cannot_be_upgraded(tmp_path):
    folder = tmp_path / "v1"
    shutil.copytree(REPO / "tests" / "data" / "v1_run" / "run", folder)
    before = files_under(folder)
    with read_only(folder) as prefix:
        status, exported = in_one_process(
            [["status", str(folder)], ["export", str(folder)]], prefix=prefix
        )
    for r in (status, exported):
        assert_clean(r, USAGE)
        assert "read-only" in r.stderr and "cannot be upgraded" in r.stderr
    assert files_under(folder) == before


# ------------------------------------------------------------------------------ pipes


def _closed_stdout(*args: str | Path, after_lines: int) -> tuple[int, str]:
    """Run with stdout a pipe whose reader reads ``after_lines`` lines and hangs up."""
    proc = subprocess.Popen(
        [PY, "-m", "batcher", *map(os.fspath, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env(),
        cwd=REPO,
    )
    assert proc.stdout is not None and proc.stderr is not None
    for _ in range(after_lines):
        proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read().decode("utf-8", "replace")
    proc.stderr.close()
    return proc.wait(timeout=60), stderr


def test_a_reader_that_hangs_up_after_one_line_of_a_long_export(area):
    code, stderr = _closed_stdout("export", area / "big", after_lines=1)
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert code == 141, stderr


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--help"],
        ["plan", "{m}", "--out", "{tmp}/o"],
        ["status", "{done}"],
        ["export", "{done}", "--format", "csv"],
        ["retry", "{done}"],
        ["run", "{m}", "--out", "{tmp}/r", "--json", "--no-progress", *FAST_RUN],
        ["emulate", "--port", "0", "--latency", "0"],
    ],
    ids=lambda a: " ".join(a[:3]),
)
def test_every_command_whose_stdout_is_closed_exits_141_quietly(area, tmp_path, args):
    filled = [a.format(m=area / "m.csv", done=area / "done", tmp=tmp_path) for a in args]
    code, stderr = _closed_stdout(*filled, after_lines=0)
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert code == 141, stderr


# ---------------------------------------------------------------------------- export -o


def test_export_into_a_missing_folder_is_one_line_and_leaves_nothing(area, tmp_path):
    r = cli("export", area / "done", "-o", tmp_path / "missing" / "jobs.jsonl")
    assert_clean(r, USAGE)
    assert files_under(tmp_path) == set()


def test_export_onto_a_folder_is_one_line_and_leaves_no_part_file(area, tmp_path):
    target = tmp_path / "a-folder"
    target.mkdir()
    r = cli("export", area / "done", "-o", target)
    assert_clean(r, USAGE)
    assert files_under(tmp_path) == set(), "a .part file was left behind"


def test_export_takes_the_format_from_the_extension_and_refuses_an_unknown_one(area, tmp_path):
    out = tmp_path / "jobs.csv"
    assert_clean(cli("export", area / "done", "-o", out), 0)
    assert out.read_text(encoding="utf-8").startswith("id,")
    r = cli("export", area / "done", "-o", tmp_path / "jobs.xlsx")
    assert_clean(r, USAGE)
    assert not (tmp_path / "jobs.xlsx").exists()


def test_a_missing_manifest_makes_no_run_folder(tmp_path):
    """``plan``/``run`` of a manifest that is not there say so in one line and write nothing:
    not the default run folder under ``out/``, nor its database."""
    for argv in (["plan", "gone.csv"], ["run", "gone.csv", "--emulate"], ["plan", "gone.yaml"]):
        r = run_cli(*argv, cwd=tmp_path)
        assert r.returncode == USAGE, (argv, r.stderr)
        assert r.stderr.strip() == f"{argv[1]}: no such file", r.stderr
    assert list(tmp_path.iterdir()) == []
