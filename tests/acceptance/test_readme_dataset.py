"""README's "Build a dataset" walkthrough, run exactly as written there.

The CSV, the shell commands and the Python loader are read from the README between its
``<!-- build-a-dataset -->`` markers, so the documentation and this test cannot drift apart.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.support import REPO, batcher_cmd

pytest.importorskip("datasets")
pytest.importorskip("webdataset")

BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)


def walkthrough() -> dict[str, str]:
    text = (REPO / "README.md").read_text("utf-8")
    section = text.split("<!-- build-a-dataset -->")[1].split("<!-- /build-a-dataset -->")[0]
    blocks = {kind: body for kind, body in BLOCK.findall(section)}
    assert set(blocks) == {"csv", "sh", "python"}, "the walkthrough lost a block"
    name = re.search(r"`([\w-]+\.csv)`", section)
    assert name is not None
    blocks["csv_name"] = name.group(1)
    return blocks


def test_the_readme_walkthrough_runs_as_written(tmp_path):
    steps = walkthrough()
    (tmp_path / steps["csv_name"]).write_text(steps["csv"], encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "DASHSCOPE_API_KEY"}
    env.update(
        PYTHONPATH=str(REPO), HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
        NO_PROXY="127.0.0.1,localhost",
    )  # fmt: skip
    commands = [line for line in steps["sh"].splitlines() if line.strip()]
    assert len(commands) == 3
    for line in commands:
        words = shlex.split(line, comments=True)
        assert words[0] == ".venv/bin/batcher"
        r = subprocess.run(
            batcher_cmd(*words[1:]), cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=100,
        )  # fmt: skip
        assert r.returncode == 0, f"{line}\n{r.stderr}"
        assert "Traceback" not in r.stderr
    r = subprocess.run(
        [sys.executable, "-c", steps["python"]], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=100,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    # 4 rows x 2 variants: 4 images in each split, each with its label, seed and prompt
    assert out[0].startswith("4 4 ") and out[0].endswith("(512, 512)")
    label = out[0].split()[2]
    assert label in ("cat", "dog")
    assert re.fullmatch(r"(cat|dog)-2-v[12] .+", out[1])
    assert out[2] == "(512, 512) cat" or out[2] == "(512, 512) dog"
    samples = out[3:]
    assert len(samples) == 4
    assert all("." not in s.split()[0] for s in samples)  # webdataset keys
    assert any("a tabby cat asleep" in s for s in samples)
