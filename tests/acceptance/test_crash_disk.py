"""The disk fills up, or the output folder is read-only, under the real CLI.

The tests run as root, where permissions do not stop writes, and cannot mount a small file
system; so the CLI subprocess (only it) gets a ``sitecustomize`` on ``PYTHONPATH`` that makes the
run folder's ``images/`` behave like a full or a read-only file system: ``os.write`` writes what
still fits and then fails with ENOSPC (a short write first, as the kernel does), ``os.open``,
``os.mkdir``, ``os.replace`` and ``open()`` for writing fail with EROFS on a read-only folder.

The run must stop cleanly (exit 3, one clear line naming the cause, no traceback), leave nothing
corrupt (the invariants), and the next run, once space is back, must complete without paying
for an image twice.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from batcher.emulator import EmulatorConfig, EmulatorThread
from tests.support import (
    REPO,
    ImageRelay,
    ServerThread,
    check_invariants,
    db_states,
    files_under,
    noise_png,
    run_args,
    run_cli,
)

# measures rates, quotas or elapsed time: run alone (see tests/conftest.py)
pytestmark = pytest.mark.serial

KEY = "sk-crash-disk-93ac"
ENV = {"DASHSCOPE_API_KEY": KEY}

HOOK = textwrap.dedent(
    '''
    """Test hook: the folder in BATCHER_TEST_FS_ROOT acts as a full or read-only file system."""
    import builtins
    import errno
    import io
    import os

    _ROOT = os.path.realpath(os.environ["BATCHER_TEST_FS_ROOT"])
    _MODE = os.environ["BATCHER_TEST_FS_MODE"]  # "full" or "readonly"
    _LEFT = [int(os.environ.get("BATCHER_TEST_FS_BYTES", "0"))]
    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


    def _inside(path):
        try:
            real = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return real == _ROOT or real.startswith(_ROOT + os.sep)


    def _fd_inside(fd):
        try:
            return _inside(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            return False


    def _fail(code, path=None):
        raise OSError(code, os.strerror(code), path)


    _open, _write, _mkdir, _replace = os.open, os.write, os.mkdir, os.replace
    _io_open = io.open


    def open_(path, flags, mode=0o777, *, dir_fd=None):
        if _MODE == "readonly" and flags & _WRITE_FLAGS and _inside(path):
            _fail(errno.EROFS, path)
        return _open(path, flags, mode, dir_fd=dir_fd)


    def write(fd, data):
        if _MODE == "full" and _fd_inside(fd):
            if _LEFT[0] <= 0:
                _fail(errno.ENOSPC)
            fits = min(len(data), _LEFT[0])
            written = _write(fd, memoryview(data)[:fits])
            _LEFT[0] -= written
            return written
        return _write(fd, data)


    def mkdir(path, mode=0o777, *, dir_fd=None):
        if _MODE == "readonly" and _inside(path) and not os.path.lexists(path):
            _fail(errno.EROFS, path)
        return _mkdir(path, mode, dir_fd=dir_fd)


    def replace(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
        if _MODE == "readonly" and (_inside(src) or _inside(dst)):
            _fail(errno.EROFS, dst)
        return _replace(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)


    def io_open(file, mode="r", *args, **kwargs):
        writing = any(c in mode for c in "wax+")
        if writing and not isinstance(file, int) and _inside(file):
            if _MODE == "readonly":
                _fail(errno.EROFS, file)
            if _LEFT[0] <= 0:
                _fail(errno.ENOSPC, file)
        return _io_open(file, mode, *args, **kwargs)


    os.open, os.write, os.mkdir, os.replace = open_, write, mkdir, replace
    io.open = builtins.open = io_open
    '''
)


def hooked(tmp_path: Path, images: Path, mode: str, left: int = 0) -> dict[str, str]:
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK, encoding="utf-8")
    images.mkdir(parents=True, exist_ok=True)
    return {
        **ENV,
        "PYTHONPATH": str(hook),
        "BATCHER_TEST_FS_ROOT": str(images),
        "BATCHER_TEST_FS_MODE": mode,
        "BATCHER_TEST_FS_BYTES": str(left),
    }


def csv_manifest(path: Path, n: int, *, size: str = "512*512", folder: bool = False) -> Path:
    lines = ["id,prompt,size,seed,output"]
    for i in range(n):
        output = f"cat-{i % 3}/{{id}}.png" if folder else "{id}.png"
        lines.append(f"img-{i:03d},a product photo of item {i},{size},{i},{output}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def assert_clean_stop(r, words: str) -> None:
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    stops = [line for line in r.stderr.splitlines() if line.startswith("batcher: stopped:")]
    assert len(stops) == 1, r.stderr
    assert words in stops[0] and "run the same command again" in stops[0], stops[0]


@pytest.fixture
def emulator():
    with EmulatorThread(EmulatorConfig(latency="0", rps=100_000.0, seed=12, api_key=KEY)) as emu:
        yield emu


def test_disk_full_mid_run_stops_cleanly_and_the_next_run_completes(tmp_path, emulator):
    n = 12
    out = tmp_path / "out"
    manifest = csv_manifest(tmp_path / "m.csv", n, folder=True)
    # room for about three of the emulator's small images (each under a kilobyte)
    env = hooked(tmp_path, out / "images", "full", left=2_600)
    r = run_cli(*run_args(manifest, out, emulator.base_url, "--concurrency", "2"), env=env)
    assert_clean_stop(r, "No space left on device")
    states = db_states(out / "batcher.db")
    assert states.get("failed", 0) == 0 and states.get("running", 0) == 0
    assert 1 <= states.get("done", 0) < n
    check_invariants(out)

    again = run_cli(*run_args(manifest, out, emulator.base_url), env=ENV)  # space is back
    assert again.returncode == 0, again.stderr
    s = emulator.stats()
    assert s["images_billed"] == n and s["duplicate_billed"] == 0  # nothing paid twice
    assert check_invariants(out) == {"done": n}
    assert (out / "images" / "metadata.jsonl").read_text().count("\n") == n


def test_disk_full_in_the_last_block_of_a_large_image_leaves_nothing_corrupt(tmp_path, emulator):
    """The last write of a large (spilled) image fits only in part: a short write, no error.
    A downloader that ignores the count would rename a truncated file into place as done."""
    out = tmp_path / "out"
    manifest = csv_manifest(tmp_path / "m.csv", 1, size="2048*2048")
    big = noise_png(2048, 2048, seed=6)
    relay = ImageRelay(emulator.root_url)
    relay.body, relay.mode = big, "body"
    with ServerThread(relay.app()) as server:
        base = server.url + "/api/v1"
        env = hooked(tmp_path, out / "images", "full", left=len(big) - 1_000)
        r = run_cli(*run_args(manifest, out, base), env=env)
        check_invariants(out)  # above all: no done job with a short file
        assert_clean_stop(r, "No space left on device")
        assert db_states(out / "batcher.db") == {"generated": 1}

        again = run_cli(*run_args(manifest, out, base), env=ENV)
        assert again.returncode == 0, again.stderr
    assert emulator.stats()["images_billed"] == 1
    assert check_invariants(out) == {"done": 1}
    (png,) = [p for p in files_under(out / "images") if p.endswith(".png")]
    assert (out / "images" / png).read_bytes() == big


@pytest.mark.parametrize("folder", [False, True], ids=["flat", "with-subfolders"])
def test_a_read_only_images_folder_stops_cleanly_and_the_next_run_completes(
    tmp_path, emulator, folder
):
    n = 6
    out = tmp_path / "out"
    manifest = csv_manifest(tmp_path / "m.csv", n, folder=folder)
    env = hooked(tmp_path, out / "images", "readonly")
    r = run_cli(*run_args(manifest, out, emulator.base_url, "--concurrency", "2"), env=env)
    assert_clean_stop(r, "Read-only file system")
    states = db_states(out / "batcher.db")
    assert states.get("failed", 0) == 0 and states.get("running", 0) == 0
    assert states.get("done", 0) == 0
    billed = emulator.stats()["images_billed"]
    assert billed == states.get("generated", 0)  # what was paid for is kept, to download later
    check_invariants(out)

    again = run_cli(*run_args(manifest, out, emulator.base_url), env=ENV)
    assert again.returncode == 0, again.stderr
    s = emulator.stats()
    assert s["images_billed"] == n and s["duplicate_billed"] == 0
    assert check_invariants(out) == {"done": n}
    assert os.listdir(out / "images")


# A real kernel limit as well: RLIMIT_FSIZE makes every file of the process stop growing at a
# size (a short write at the limit, then EFBIG), the database and its WAL included. Set in a
# small launcher rather than preexec_fn (the emulator's thread is running in this process).
LIMITED = (
    "import os, resource, signal, sys; "
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2); "
    "os.execv(sys.executable, [sys.executable, '-m', 'batcher', *sys.argv[2:]])"
)


def run_limited(limit: int, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DASHSCOPE_API_KEY"}
    return subprocess.run(
        [sys.executable, "-c", LIMITED, str(limit), *args],
        capture_output=True,
        text=True,
        env={**env, **ENV},
        cwd=REPO,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_a_file_size_limit_hit_by_a_large_image_stops_cleanly(tmp_path, emulator):
    out = tmp_path / "out"
    manifest = csv_manifest(tmp_path / "m.csv", 1, size="2048*2048")
    big = noise_png(2048, 2048, seed=7)
    relay = ImageRelay(emulator.root_url)
    relay.body, relay.mode = big, "body"
    with ServerThread(relay.app()) as server:
        base = server.url + "/api/v1"
        r = run_limited(2_000_000, *run_args(manifest, out, base))
        assert_clean_stop(r, "File too large")
        assert db_states(out / "batcher.db") == {"generated": 1}
        check_invariants(out)
        again = run_cli(*run_args(manifest, out, base), env=ENV)
        assert again.returncode == 0, again.stderr
    assert emulator.stats()["images_billed"] == 1
    assert check_invariants(out) == {"done": 1}


def test_the_database_filling_up_mid_run_stops_cleanly_and_the_next_run_completes(
    tmp_path, emulator
):
    n = 60
    out = tmp_path / "out"
    manifest = csv_manifest(tmp_path / "m.csv", n)
    assert run_cli("plan", manifest, "--out", out).returncode == 0
    # room for the database as imported, and a WAL of a few dozen commits: far fewer than a run
    limit = (out / "batcher.db").stat().st_size + 96 * 1024
    r = run_limited(limit, *run_args(manifest, out, emulator.base_url, "--concurrency", "4"))
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "database" in errors[0], r.stderr
    states = db_states(out / "batcher.db")
    assert states.get("done", 0) < n and states.get("failed", 0) == 0
    check_invariants(out)  # integrity_check ok, no done job without its file

    again = run_cli(*run_args(manifest, out, emulator.base_url), env=ENV)
    assert again.returncode == 0, again.stderr
    s = emulator.stats()
    # paid twice at most for the calls in flight when the database failed (--concurrency 4):
    # their answers could not be recorded, or they were cut short and their jobs released
    assert n <= s["images_billed"] <= n + 4
    assert check_invariants(out) == {"done": n}
