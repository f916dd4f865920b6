"""The benchmarks' manifests and run folders: generated CSVs and planned databases, cached.

Every CSV is deterministic (``id,prompt,size,seed,category``, ~90-character prompts, or with
``short`` ``id,prompt,size,seed`` and ~50-character ones; one prompt in eight in Chinese), so it
is written once into ``bench/_work/manifests`` and reused. A planned run folder (the CSV
imported by ``batcher plan``) is kept in ``bench/_work/cache`` under a hash of batcher's and
jobs' sources, so the million-row folder is built once per version of the code.
"""

from __future__ import annotations

import csv
import hashlib
import shutil
import sqlite3
from pathlib import Path

from .common import ROOT, WORK, batcher_command, run_measured

_ADJECTIVES = (
    "a weathered",
    "a gleaming",
    "a tiny",
    "an enormous",
    "a minimalist",
    "a hand-painted",
    "a vintage",
    "a futuristic",
)
_SUBJECTS = (
    "oak dining chair",
    "ceramic teapot",
    "red fox",
    "lighthouse",
    "leather backpack",
    "bonsai tree",
    "mountain bike",
    "glass perfume bottle",
    "tabby cat",
    "paper lantern",
    "espresso machine",
)
_SCENES = (
    "on a white studio background",
    "in a snowy forest at dawn",
    "on a rainy city street at night",
    "beside a sunlit window",
    "in a misty bamboo grove",
    "on a marble kitchen counter",
    "in a desert at golden hour",
)
_STYLES = (
    "soft natural light, shallow depth of field",
    "flat vector illustration",
    "watercolour, loose brush strokes",
    "35mm film photograph, grainy",
    "isometric 3D render",
)
_CHINESE = (
    "青花瓷茶壶的产品照，柔和的自然光",
    "一只在雪地里奔跑的柴犬，电影感",
    "夜晚霓虹灯下的老街，雨后的倒影",
    "竹林中的古亭，晨雾缭绕，水墨风格",
)
_SHORT_STYLES = (
    "studio light",
    "at dawn",
    "watercolour",
    "flat vector",
    "film photo",
    "isometric 3D",
    "at night",
)
_CATEGORIES = ("furniture", "kitchen", "animals", "outdoor", "fashion", "travel")
MANIFEST_VERSION = 1  # bump when the generated rows change


def prompt_for(i: int) -> str:
    """A varied, realistic prompt (one in eight in Chinese), distinct for every ``i``."""
    if i % 8 == 7:
        return f"{_CHINESE[i // 8 % len(_CHINESE)]}，第{i}号"
    return (
        f"{_ADJECTIVES[i % len(_ADJECTIVES)]} {_SUBJECTS[i // 8 % len(_SUBJECTS)]} "
        f"{_SCENES[i // 88 % len(_SCENES)]}, {_STYLES[i // 616 % len(_STYLES)]}, variant {i}"
    )


def short_prompt_for(i: int) -> str:
    """A shorter prompt (~50 characters; one in eight in Chinese), distinct for every ``i``."""
    if i % 8 == 7:
        return f"{_CHINESE[i // 8 % len(_CHINESE)]}，第{i}号"
    return (
        f"{_ADJECTIVES[i % len(_ADJECTIVES)]} {_SUBJECTS[i // 8 % len(_SUBJECTS)]}, "
        f"{_SHORT_STYLES[i // 88 % len(_SHORT_STYLES)]}, variant {i}"
    )


def write_manifest(
    path: Path, n: int, *, size: str = "512*512", start: int = 0, short: bool = False
) -> Path:
    """A CSV manifest of ``n`` jobs: ``id,prompt,size,seed,category`` (a template variable),
    or with ``short`` ``id,prompt,size,seed`` and shorter prompts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".part")
    with temp.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        if short:
            writer.writerow(["id", "prompt", "size", "seed"])
            writer.writerows(
                (f"job{i:07d}", short_prompt_for(i), size, i) for i in range(start, start + n)
            )
        else:
            writer.writerow(["id", "prompt", "size", "seed", "category"])
            writer.writerows(
                (f"job{i:07d}", prompt_for(i), size, i, _CATEGORIES[i % len(_CATEGORIES)])
                for i in range(start, start + n)
            )
    temp.replace(path)
    return path


def cached_manifest(n: int, *, size: str = "512*512", short: bool = False) -> Path:
    """``write_manifest`` kept in ``bench/_work/manifests`` (the rows are deterministic)."""
    kind = "-short" if short else ""
    name = f"jobs-{n}-{size.replace('*', 'x')}{kind}-v{MANIFEST_VERSION}.csv"
    path = WORK / "manifests" / name
    if not path.exists():
        write_manifest(path, n, size=size, short=short)
    return path


def code_fingerprint() -> str:
    """A short hash of batcher's and jobs' sources: a cached run folder is only reused as is."""
    digest = hashlib.sha1()
    for package in ("jobs", "batcher"):
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(path.relative_to(ROOT).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def planned_folder(n: int, dest: Path, *, timeout: float, size: str = "512*512") -> bool:
    """Make ``dest`` a run folder with ``cached_manifest(n)`` imported (``batcher plan``).

    The planned database is kept in ``bench/_work/cache`` under the sources' fingerprint and
    copied, since several benchmarks need the same million-row folder. True if it was cached.
    """
    manifest = cached_manifest(n, size=size)
    key = f"planned-{n}-{size.replace('*', 'x')}"
    cache = WORK / "cache" / f"{key}-{code_fingerprint()}"
    hit = (cache / "batcher.db").exists()
    if not hit:
        for old in (WORK / "cache").glob(f"{key}-*"):
            shutil.rmtree(old)
        temp = cache.with_name(cache.name + ".part")
        if temp.exists():
            shutil.rmtree(temp)
        run_measured(
            batcher_command("plan", str(manifest), "--out", str(temp), "--json"),
            cwd=WORK,
            timeout=timeout,
            logs=WORK / "cache" / f"plan-{n}.log",
        ).check()
        temp.rename(cache)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copy2(cache / "batcher.db", dest / "batcher.db")
    return hit


def store_planned(n: int, db: Path) -> None:
    """Keep a database just planned from ``cached_manifest(n)`` for :func:`planned_folder`."""
    key = f"planned-{n}-512x512"
    cache = WORK / "cache" / f"{key}-{code_fingerprint()}"
    if (cache / "batcher.db").exists() or db.with_name(db.name + "-wal").exists():
        return
    for old in (WORK / "cache").glob(f"{key}-*"):
        shutil.rmtree(old)
    temp = cache.with_name(cache.name + ".part")
    temp.mkdir(parents=True, exist_ok=True)
    shutil.copy2(db, temp / "batcher.db")
    temp.rename(cache)


def mark_done(db: Path, every: int = 100) -> int:
    """All but one job in ``every`` done, with one UPDATE through sqlite3; the count left."""
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA busy_timeout=10000")
    con.execute(
        "UPDATE jobs SET state = 'done', sha256 = 'x', bytes = 1, finished_at = 1 "
        f"WHERE (rowid - 1) % {every} != 0"
    )
    left: int = con.execute("SELECT count(*) FROM jobs WHERE state = 'pending'").fetchone()[0]
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return left
