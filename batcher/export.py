"""``batcher export``: the run folder's jobs as JSONL, CSV, Parquet or WebDataset shards.

- ``jsonl`` / ``csv``: one record per job, or per image of a done job of several
  (:func:`batcher.records.image_records`, :func:`batcher.records.export_row`) to stdout or
  to ``-o FILE`` (written under a temporary name, then renamed);
- ``parquet``: shards in ``-o FOLDER`` named as Hugging Face names them
  (``train-00000-of-00002.parquet``; ``data-...`` for images outside split folders), the image
  in the ``image`` column as the ``datasets`` Image feature stores it (``{bytes, path}``,
  ``path`` alone with ``--no-embed``) and the features in the schema metadata, so
  ``load_dataset("parquet", data_dir=FOLDER)`` gives PIL images with every field;
- ``webdataset``: tar shards (``train-000000.tar``) of samples ``KEY.png``, ``KEY.json``
  (every field) and ``KEY.txt`` (the prompt). ``KEY`` is the sample's number in its split
  and the job id with every character but letters, digits, ``-`` and ``_`` made ``_``
  (``000012_sku-1_2`` for ``sku-1.2``, see :mod:`batcher.shardexport`): webdataset splits a name
  at its first dot.

Parquet and WebDataset exports also write a dataset card, ``README.md`` (:mod:`batcher.card`).
Rows are streamed from the job table in manifest order and images read one at a time, so
memory stays flat whatever the size of the run.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from jobs import State

from .errors import ConfigError
from .layout import RunLayout
from .records import EXPORT_FIELDS, export_row, image_records, variable_keys
from .wording import plural

if TYPE_CHECKING:
    from jobs import JobStore

__all__ = [
    "FORMATS",
    "ExportOptions",
    "ExportResult",
    "check_output",
    "format_for",
    "parse_shard_size",
    "run_export",
    "selected_state",
    "tell_exported",
]

FORMATS = ("jsonl", "csv", "parquet", "webdataset")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*")
DEFAULT_SHARD_SIZE = 500 * 1000**2


@dataclass(frozen=True, kw_only=True, slots=True)
class ExportOptions:
    """What ``batcher export`` was asked for."""

    fmt: str | None = None  # None: from the output's extension, else jsonl
    output: Path | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    state: str | None = None  # done | failed | all; None: done for shards, all for records
    embed: bool = True


@dataclass(frozen=True, kw_only=True, slots=True)
class ExportResult:
    """What an export wrote."""

    fmt: str
    records: int
    files: tuple[Path, ...]
    missing: int  # done jobs whose image file was not found (exported without an image)


def format_for(fmt: str | None, output: Path | None) -> str:
    """The export format: ``fmt`` if given, else from ``output``'s extension (a folder
    without one: jsonl). Raises ConfigError for an extension batcher does not write.

    >>> format_for(None, Path("jobs.csv")), format_for("parquet", Path("ds"))
    ('csv', 'parquet')
    """
    if fmt is not None:
        return fmt
    if output is None or not output.suffix:
        return "jsonl"
    found = _EXTENSIONS.get(output.suffix.lower())
    if found is None:
        raise ConfigError(
            f"-o {output}: cannot tell the format from {output.suffix!r}; name the file "
            ".jsonl or .csv, or pass --format jsonl|csv|parquet|webdataset"
        )
    return found


def parse_shard_size(text: str) -> int:
    """``500MB``, ``1GiB``, ``200k`` or a byte count, as bytes (at least 1 kB)."""
    match = _SIZE.fullmatch(text)
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise ConfigError(f"--shard-size: {text!r} is not a size like 500MB or 1GiB")
    size = int(float(match.group(1)) * unit)
    if size < 1000:
        raise ConfigError(f"--shard-size: {text!r} is under 1 kB")
    return size


def selected_state(opt: ExportOptions, fmt: str) -> str | None:
    """The state of the jobs exported (``done`` by default for shards, every job by default
    for records); None for every job."""
    wanted = opt.state or ("done" if fmt in ("parquet", "webdataset") else "all")
    return None if wanted == "all" else State(wanted).value


def _states(opt: ExportOptions, fmt: str) -> State | None:
    wanted = selected_state(opt, fmt)
    return None if wanted is None else State(wanted)


async def run_export(
    store: JobStore, layout: RunLayout, opt: ExportOptions, stdout: TextIO
) -> ExportResult:
    """Carry out an export; the output path was checked by :func:`check_output`."""
    fmt = format_for(opt.fmt, opt.output)
    keys = variable_keys(list(await store.variables()), EXPORT_FIELDS)
    state = _states(opt, fmt)
    if fmt in ("jsonl", "csv"):
        return await _export_text(store, layout, opt, fmt, keys, state, stdout)
    assert opt.output is not None
    from .shardexport import export_shards  # anyio, pyarrow for Parquet: shards only

    done = await export_shards(
        store,
        layout,
        fmt=fmt,
        folder=opt.output,
        shard_size=opt.shard_size,
        embed=opt.embed,
        keys=keys,
        state=state,
    )
    return ExportResult(fmt=fmt, records=done.records, files=done.files, missing=done.missing)


def tell_exported(result: ExportResult, opt: ExportOptions) -> None:
    """Say on stderr what an export wrote, and how many done images were not found."""
    where = f" to {opt.output}" if opt.output is not None else ""
    records = plural(result.records, "record")
    if result.fmt in ("parquet", "webdataset"):
        shards = plural(len(result.files) - 1, f"{result.fmt} shard")
        print(f"batcher: exported {records} in {shards}{where}", file=sys.stderr)
    else:
        print(f"batcher: exported {records}{where}", file=sys.stderr)
    if result.missing:
        lost = plural(result.missing, "done image")
        print(f"batcher: warning: {lost} not found; exported without", file=sys.stderr)


def check_output(opt: ExportOptions) -> None:
    """Refuse an output that cannot be written, before anything is: one clear line."""
    fmt = format_for(opt.fmt, opt.output)
    out = opt.output
    if out is None:
        if fmt in ("parquet", "webdataset"):
            raise ConfigError(f"--format {fmt} writes a folder of shards: give it with -o FOLDER")
        return
    parent = out.parent
    if not parent.is_dir():
        raise ConfigError(f"-o {out}: the folder {parent} does not exist")
    if fmt in ("jsonl", "csv"):
        if out.is_dir():
            raise ConfigError(f"-o {out} is a folder; give a file name such as {out}/jobs.{fmt}")
    elif out.exists() and not out.is_dir():
        raise ConfigError(f"-o {out} is a file; --format {fmt} writes a folder of shards")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"-o {out}: cannot write in {parent}")


async def _export_text(
    store: JobStore,
    layout: RunLayout,
    opt: ExportOptions,
    fmt: str,
    keys: list[tuple[str, str]],
    state: State | None,
    stdout: TextIO,
) -> ExportResult:
    temp: Path | None = None
    out = stdout
    if opt.output is not None:
        temp = opt.output.with_name(f".{opt.output.name}.part")
        out = temp.open("w", encoding="utf-8", newline="")
    n = 0
    try:
        writer: Any = None
        if fmt == "csv":
            names = [*EXPORT_FIELDS, *(key for _, key in keys)]
            import csv  # here only: the other formats start without it

            writer = csv.writer(out)
            writer.writerow(names)
        async for job in store.iter_records(state=state):
            for rec in image_records(job):
                row = export_row(rec, keys)
                if writer is not None:
                    writer.writerow([_csv_cell(v) for v in row.values()])
                else:
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        out.flush()
        if temp is not None:
            os.fsync(out.fileno())
            out.close()
            assert opt.output is not None
            os.replace(temp, opt.output)
    except BaseException:
        if temp is not None:
            out.close()
            temp.unlink(missing_ok=True)
        raise
    files = (opt.output,) if opt.output is not None else ()
    return ExportResult(fmt=fmt, records=n, files=files, missing=0)


def _csv_cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value
