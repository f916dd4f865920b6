"""The file of calls sent (batcher.sendlog) on a real folder: what a killed run leaves is
read back exactly, a torn last line is skipped, and the file is rewritten small while only the
calls in flight stay in it."""

from __future__ import annotations

import doctest
import os

import batcher.sendlog
from batcher.sendlog import ROTATE_AT, SendLog, lost_answers


def test_doctests() -> None:
    assert doctest.testmod(batcher.sendlog).failed == 0


def test_a_killed_run_s_file_names_the_calls_it_sent_and_a_torn_line_is_skipped(tmp_path):
    path = tmp_path / ".calls-in-flight"
    log = SendLog(path)
    log.sent("产品/一", "tok-1")
    log.sent('odd "id"\nwith a line end', "tok-2")
    log.sent("产品/一", "tok-3")  # retried under a new claim: the last call counts
    # no close(): the process was killed; a write cut short leaves half a line
    with open(path, "ab") as f:
        f.write(b'["half", "to')
    assert sorted(lost_answers(path)) == [
        ('odd "id"\nwith a line end', "tok-2"),
        ("产品/一", "tok-3"),
    ]
    assert lost_answers(tmp_path / "missing") == []


def test_the_file_is_rewritten_with_only_the_calls_in_flight(tmp_path):
    path = tmp_path / ".calls-in-flight"
    log = SendLog(path)
    log.sent("kept", "t-kept")
    i = 0
    while True:  # each call answered in turn until the file passes the size
        log.sent(f"job-{i}", f"t-{i}")
        size = path.stat().st_size
        log.answered(f"job-{i}")  # past the size: rewritten, holding what is in flight
        if path.stat().st_size < size:
            break
        i += 1
    assert ROTATE_AT < size < ROTATE_AT + 100
    assert lost_answers(path) == [("kept", "t-kept")]
    log.sent("after", "t-after")  # later sends go to the new file
    assert sorted(lost_answers(path)) == [("after", "t-after"), ("kept", "t-kept")]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    log.close()
    assert not path.exists()


def test_a_folder_that_refuses_the_write_loses_the_count_not_the_run(tmp_path, caplog):
    path = tmp_path / ".calls-in-flight"
    log = SendLog(path)
    assert log._fd is not None
    os.close(log._fd)
    log._fd = os.open(os.devnull, os.O_RDONLY)  # every write now fails
    log.sent("a", "t")
    log.sent("b", "t")
    assert sum("could not note a sent call" in r.message for r in caplog.records) == 1
    log.close()
