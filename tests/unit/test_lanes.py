"""Reading a lanes file: what a good one gives, and each bad one as one located line."""

from __future__ import annotations

from pathlib import Path

import pytest

from batcher.errors import ConfigError, LanesInvalid
from batcher.lanes import Lane, default_lane, lane_keys, load_lanes, rehearsal_keys


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lanes.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_good_file(tmp_path: Path) -> None:
    lanes = load_lanes(
        write(
            tmp_path,
            "lanes:\n"
            "  - name: a\n    key_env: KEY_A\n    quota: 2\n"
            "  - name: b\n    key_env: KEY_B\n    region: cn\n"
            "    base_url: https://example.com/api/v1/\n"
            "    quota: {z-image-turbo: 3, qwen-image-max: 0.5}\n"
            "    models: [z-image-turbo, qwen-image-max]\n    weight: 2\n",
        )
    )
    a, b = lanes
    assert a == Lane(name="a", key_env="KEY_A", quota=2.0)
    assert (b.region, b.base_url, b.weight) == ("cn", "https://example.com/api/v1", 2.0)
    assert b.models == frozenset({"z-image-turbo", "qwen-image-max"})
    assert b.rate_for("z-image-turbo", 9) == 3 and b.rate_for("qwen-image-max", 9) == 0.5
    assert b.serves("qwen-image-max") and not b.serves("wan2.2-t2i-flash")
    assert a.serves("wan2.2-t2i-flash") and a.rate_for("wan2.2-t2i-flash", 9) == 2


def test_a_top_level_list_is_accepted(tmp_path: Path) -> None:
    [lane] = load_lanes(write(tmp_path, "- {name: a, key_env: K, quota: 1}\n"))
    assert lane.name == "a"


def test_a_per_model_quota_paces_other_models_at_their_published_quota() -> None:
    lane = Lane(name="a", key_env="K", model_quota={"z-image-turbo": 4})
    assert lane.rate_for("z-image-turbo", 9) == 4
    assert lane.rate_for("qwen-image-max", 9) == pytest.approx(2 / 60)
    assert default_lane("intl", None).rate_for("z-image-turbo", 7.0) == 7.0


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (
            "lanes:\n  - name: a\n    api_key: sk-zzzzzzzz\n    quota: 2\n",
            "3: api_key: a key never",
        ),
        (
            "lanes:\n  - name: a\n    key_env: Bearer sk-zzzz\n    quota: 2\n",
            "3: key_env: looks like",
        ),
        ("lanes:\n  - name: a\n    key_env: not a name\n    quota: 2\n", "3: key_env: must be the"),
        ("lanes:\n  - name: a\n    key_env: K\n    quota: 0\n", "4: quota: must be a positive"),
        ("lanes:\n  - name: a\n    key_env: K\n    quota: .inf\n", "4: quota: must be a positive"),
        ("lanes:\n  - name: a\n    key_env: K\n    quota: {}\n", "4: quota: an empty mapping"),
        ("lanes:\n  - name: a\n    key_env: K\n    quota: {nope: 1}\n", "4: quota.nope: unknown"),
        ("lanes:\n  - name: a\n    key_env: K\n    quota: 1\n    weight: -1\n", "5: weight: must"),
        ("lanes:\n  - name: a\n    key_env: K\n    quota: 1\n    region: eu\n", "5: region: must"),
        (
            "lanes:\n  - name: a\n    key_env: K\n    quota: 1\n    base_url: ftp://x\n",
            "5: base_url",
        ),
        (
            "lanes:\n  - name: a\n    key_env: K\n    quota: 1\n    colour: red\n",
            "5: colour: unknown",
        ),
        ("lanes:\n  - name: a b\n    key_env: K\n    quota: 1\n", "2: name: 1 to 40"),
        ("lanes:\n  - key_env: K\n    quota: 1\n", "2: name: missing"),
        (
            "lanes:\n  - name: a\n    name: b\n    key_env: K\n    quota: 1\n",
            "3: name: duplicate key",
        ),
        (
            "lanes:\n  - name: !!python/name:os.system a\n    key_env: K\n    quota: 1\n",
            "2: name: tag",
        ),
        ("lanes: []\n", "1: lanes: must be a list of at least one lane"),
        ("other: 1\n", "1: other: unknown field"),
        ("", "1: lanes: the file is empty"),
        (
            "lanes:\n  - name: a\n    key_env: K\n    quota: {qwen-image-max: 1}\n"
            "    models: [z-image-turbo]\n",
            "4: quota: qwen-image-max is not in the lane's models",
        ),
    ],
)
def test_a_bad_file_is_its_first_problem_in_one_line(tmp_path: Path, text: str, line: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(LanesInvalid) as found:
        load_lanes(path)
    message = str(found.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line}"), message
    assert "sk-zzzz" not in message


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LanesInvalid, match="cannot read the lanes file"):
        load_lanes(tmp_path / "nope.yaml")


def test_keys_come_from_the_environment_and_a_missing_one_is_named() -> None:
    lanes = [Lane(name="a", key_env="KA", quota=1), Lane(name="b", key_env="KB", quota=1)]
    assert lane_keys(lanes, {"KA": "sk-a", "KB": " sk-b "}) == {"a": "sk-a", "b": "sk-b"}
    with pytest.raises(ConfigError, match="lane 'b': the environment variable KB is not set"):
        lane_keys(lanes, {"KA": "sk-a", "KB": " "})


def test_a_rehearsal_makes_one_key_per_variable() -> None:
    lanes = [
        Lane(name="a", key_env="KA", quota=1),
        Lane(name="a2", key_env="KA", quota=1),
        Lane(name="b", key_env="KB", quota=1),
    ]
    keys = rehearsal_keys(lanes)
    assert keys["a"] == keys["a2"] != keys["b"]
    assert all(k.startswith("sk-rehearsal-") for k in keys.values())
