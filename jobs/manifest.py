"""Manifests: a YAML, CSV or JSONL file of prompts, read as a stream of validated ``JobSpec``.

    >>> manifest = open_manifest("samples/catalog.yaml", rules=RULES)  # file problems raise here
    >>> report = await store.import_rows(manifest.rows(), source="samples/catalog.yaml")

Iterating a manifest gives ``JobSpec`` values; ``rows()`` gives the same jobs as ``JobRow``
tuples, the cheaper form a bulk import takes (see ``jobs.spec``), and reads a big CSV or JSONL
file in a helper process so the import parses and inserts on two cores (``jobs.readahead``).

The format comes from the extension (``.yaml``/``.yml``, ``.csv``, ``.jsonl``, any case). File
problems (unknown extension, missing or empty file, wrong encoding, YAML syntax) raise
``ManifestInvalid`` on open or on the first ``next``. Row problems do not stop the stream: each
valid job is yielded as soon as it is checked, every problem is collected as a one-line
``ManifestError`` (``file:line: field: message``), and exhausting the stream raises
``ManifestInvalid`` if there were any -- early, with ``truncated=True``, once more than
``max_errors`` are known. The caller imports in one transaction and rolls back on it.

Duplicate ids and colliding output paths are found without holding the manifest: only sets of
60-bit hashes are kept (about 64 bytes a job per set; one set when every output follows from
the id alone, as in a CSV without an output column). A repeated hash withholds that job; before
``ManifestInvalid`` is raised, a second read of the file finds the earlier job, so the message
names both lines, and a hash that merely collided releases the withheld job after all.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NoReturn

from jobs.builder import JobBuilder
from jobs.csvfile import iter_csv
from jobs.errors import ManifestError, ManifestInvalid
from jobs.jsonlfile import iter_jsonl
from jobs.naming import DEFAULT_OUTPUT, compile_output, image_output
from jobs.params import ModelRules
from jobs.readahead import helper_rows
from jobs.spec import JobRow, JobSpec

if TYPE_CHECKING:
    from jobs.yamlfile import YamlManifest

__all__ = ["Format", "Manifest", "open_manifest"]

Format = Literal["yaml", "csv", "jsonl"]
_FORMATS: dict[str, Format] = {".yaml": "yaml", ".yml": "yaml", ".csv": "csv", ".jsonl": "jsonl"}
MAX_WARNINGS = 100
# From this size on, rows() reads a CSV or JSONL file in a helper process. Starting one takes
# ~0.06 s; importing 20,000 rows of the benchmark's CSV (2.6 MB) took 0.16 s with one and
# 0.14 s without, 50,000 rows (6.5 MB) 0.29 s and 0.33 s, 1,000,000 rows 4.6 s and 6.8 s.
HELPER_MIN_BYTES = 8 << 20
_MASK = (1 << 60) - 1  # 60-bit ints take 32 bytes, full 64-bit ones 48


def open_manifest(
    path: str | os.PathLike[str], *, rules: ModelRules, max_errors: int = 20
) -> Manifest:
    """Open a manifest for reading; raises ``ManifestInvalid`` for a file-level problem.

    ``path`` is shown in messages as given. ``rules`` answer every per-model question (which
    models exist, their sizes and parameters; see ``jobs.params``). A YAML manifest is read and
    its top level (model, defaults, output, matrix) checked here; CSV and JSONL are only
    streamed later.
    """
    shown = os.fspath(path)
    location = Path(shown)
    suffix = location.suffix
    fmt = _FORMATS.get(suffix.lower())
    if fmt is None:
        what = f"unknown extension {suffix!r}" if suffix else "no extension"
        _fail(shown, f"{what}; a manifest is .yaml, .yml, .csv or .jsonl")
    try:
        size = location.stat().st_size
        if not location.is_file():
            _fail(shown, "not a file")
    except FileNotFoundError:
        _fail(shown, "no such file")
    except OSError as exc:
        _fail(shown, f"cannot read: {exc.strerror or exc}")
    if size == 0:
        _fail(shown, "empty file: no jobs")
    doc = None
    if fmt == "yaml":  # PyYAML only for a YAML manifest: a CSV's import starts without it
        from jobs.yamlfile import load_yaml

        doc = load_yaml(location, shown, rules, max_errors=max_errors)
    return Manifest(
        path=location,
        shown=shown,
        fmt=fmt,
        doc=doc,
        rules=rules,
        max_errors=max_errors,
        size=size,
    )


def _fail(shown: str, message: str) -> NoReturn:
    raise ManifestInvalid([ManifestError(shown, None, None, message)])


def _file_keys(row: JobRow) -> list[str]:
    """The collision keys of the files a job writes: its output key, or for a job of several
    images (``n > 1``) each image's (``cat-1.png`` ..), which no other job may write."""
    key, n = row[8], row[9]
    return [key] if n <= 1 else [image_output(key, k, n) for k in range(1, n + 1)]


@dataclass(slots=True)
class _Withheld:
    """A job whose id or output key hash was seen before, held until that is settled."""

    seq: int
    row: JobRow
    id_seen: bool
    key_seen: bool

    @property
    def spec(self) -> JobSpec:
        return JobSpec.from_row(self.row)


class Manifest:
    """An opened manifest; iterate it for its jobs (each iteration reads the file again).

    ``warnings`` fills while iterating (e.g. a prompt over 800 characters, which the service
    cuts); it keeps the first 100, and ``warning_count`` counts them all.
    """

    path: Path
    format: Format
    model: str
    warnings: list[ManifestError]
    warning_count: int

    def __init__(
        self,
        *,
        path: Path,
        shown: str,
        fmt: Format,
        doc: YamlManifest | None,
        rules: ModelRules,
        max_errors: int,
        size: int = 0,
    ) -> None:
        self.path = path
        self.format = fmt
        self.model = doc.model if doc is not None else rules.default_model
        self.rules = rules
        self.warnings = []
        self.warning_count = 0
        self._shown = shown
        self._doc = doc
        self._max_errors = max(1, max_errors)
        self._size = size

    def __repr__(self) -> str:
        return f"Manifest({self._shown!r}, format={self.format!r})"

    def __iter__(self) -> Iterator[JobSpec]:
        return map(JobSpec.from_row, self._stream())

    def rows(self, *, helper: bool | None = None) -> Iterator[JobRow]:
        """The jobs as ``JobRow`` tuples (what ``JobStore.import_rows`` takes), checked alike.

        ``helper``: read and check the file in a helper process (``jobs.readahead``), so that
        the caller's work on the rows (a bulk insert) runs on another core; by default for a
        CSV or JSONL file of ``HELPER_MIN_BYTES`` or more.
        """
        if helper is None:
            # (no sys.executable: an embedded interpreter, which cannot start one)
            helper = (
                self._doc is None
                and self._size >= HELPER_MIN_BYTES
                and bool(sys.executable)
                and self.rules.reference is not None
            )
        if helper:
            reference = self.rules.reference
            if reference is None:
                raise ValueError("these model rules cannot be loaded in a helper process")
            return helper_rows(self._shown, self._max_errors, self._took_warnings, reference)
        return self._stream()

    def _took_warnings(self, warnings: list[ManifestError], count: int) -> None:
        """The warnings of a manifest that a helper process read."""
        self.warnings = warnings
        self.warning_count = count

    def _builder(self, warnings: list[ManifestError]) -> JobBuilder:
        output = self._doc.output if self._doc is not None else compile_output(DEFAULT_OUTPUT)
        return JobBuilder(
            path=self._shown,
            model=self.model,
            rules=self.rules,
            output=output,
            warnings=warnings,
            max_warnings=MAX_WARNINGS,
            output_given=self._doc is not None and self._doc.output_given,
        )

    def _rows(self, builder: JobBuilder, errors: list[ManifestError]) -> Iterator[JobRow | None]:
        if self._doc is not None:
            from jobs.yamlfile import iter_yaml

            return iter_yaml(self._doc, self._shown, builder, errors)
        if self.format == "csv":
            return iter_csv(self.path, self._shown, builder, errors)
        return iter_jsonl(self.path, self._shown, builder, errors)

    def _stream(self) -> Iterator[JobRow]:
        self.warnings = []
        builder = self._builder(self.warnings)
        errors: list[ManifestError] = []
        withheld: list[_Withheld] = []
        ids: set[int] = set()
        keys: set[int] = set()
        files: set[int] = set()  # the files of jobs of several images
        limit = self._max_errors
        seq = 0
        outputs_from_id = False
        mask = _MASK
        add_id, add_key = ids.add, keys.add
        try:
            for row in self._rows(builder, errors):
                seq += 1
                if seq == 1:  # the reader decides this before its first job
                    outputs_from_id = builder.outputs_from_id
                if row is not None:
                    # Equal ids imply equal output keys when outputs are a function of the id,
                    # so one set of hashes then finds both kinds of duplicate. (A hash seen
                    # before leaves its set as long as it was: one lookup instead of two.)
                    id_seen = False
                    if not outputs_from_id:
                        known = len(ids)
                        add_id(hash(row[0]) & mask)  # the id
                        id_seen = len(ids) == known
                    key_hash = hash(row[8]) & mask  # the output key
                    known = len(keys)
                    add_key(key_hash)
                    key_seen = len(keys) == known
                    if row[9] > 1:  # n: a job of several images writes <stem>-k.png files
                        for file_key in _file_keys(row):
                            file_hash = hash(file_key) & mask
                            key_seen = key_seen or file_hash in keys
                            files.add(file_hash)
                    elif files:
                        key_seen = key_seen or key_hash in files
                    if not (id_seen or key_seen):
                        yield row
                        continue
                    withheld.append(_Withheld(seq, row, id_seen or outputs_from_id, key_seen))
                if len(errors) + len(withheld) > limit:
                    yield from self._settle(withheld, errors)
                    if len(errors) > limit:
                        raise self._invalid(errors)
        except ManifestError as exc:
            errors.append(exc)
        except OSError as exc:
            errors.append(ManifestError(self._shown, None, None, f"cannot read: {exc}"))
        finally:
            self.warning_count = builder.warning_count
        yield from self._settle(withheld, errors)
        if not errors and seq == 0:
            errors.append(ManifestError(self._shown, None, None, "empty manifest: no jobs"))
        if errors:
            raise self._invalid(errors)

    def _invalid(self, errors: list[ManifestError]) -> ManifestInvalid:
        ordered = sorted(errors, key=lambda e: e.line or 0)
        return ManifestInvalid(
            ordered[: self._max_errors], truncated=len(errors) > self._max_errors
        )

    def _settle(self, withheld: list[_Withheld], errors: list[ManifestError]) -> Iterator[JobRow]:
        """Read the file again up to the last withheld job to find what each one repeats."""
        if not withheld:
            return
        last = withheld[-1].seq
        want_ids = {w.spec.id for w in withheld if w.id_seen}
        want_keys = {w.spec.output_key for w in withheld if w.key_seen}
        want_keys.update(k for w in withheld if w.key_seen for k in _file_keys(w.row))
        first_id: dict[str, tuple[int, JobSpec]] = {}
        first_key: dict[str, tuple[int, JobSpec]] = {}
        first_file: dict[str, tuple[int, JobSpec]] = {}  # files of jobs of several images
        seq = 0
        try:
            for row in self._rows(self._builder([]), []):
                seq += 1
                if seq >= last:
                    break
                if row is None:
                    continue
                job_id, key = row[0], row[8]
                if job_id in want_ids and job_id not in first_id:
                    first_id[job_id] = (seq, JobSpec.from_row(row))
                if key in want_keys and key not in first_key:
                    first_key[key] = (seq, JobSpec.from_row(row))
                if row[9] > 1:
                    for file_key in _file_keys(row):
                        if file_key in want_keys and file_key not in first_file:
                            first_file[file_key] = (seq, JobSpec.from_row(row))
        except (ManifestError, OSError):
            pass  # the file changed under us; what was found so far still stands
        for held in withheld:
            spec = held.spec
            earlier = first_id.get(spec.id) if held.id_seen else None
            if earlier is not None and earlier[0] < held.seq:
                message = f"duplicate id {_show(spec.id)}; also on line {earlier[1].line}"
                errors.append(ManifestError(self._shown, spec.line, "id", message))
                continue
            earlier = first_key.get(spec.output_key) if held.key_seen else None
            if held.key_seen and (earlier is None or earlier[0] >= held.seq):
                # a file of a job of several images: this one's, written by an earlier job of
                # one image, or this job's one file, written by an earlier job of several
                if spec.n > 1:
                    candidates = [(k, first_key.get(k)) for k in _file_keys(held.row)]
                else:
                    candidates = [(spec.output_key, first_file.get(spec.output_key))]
                for file_key, found in candidates:
                    if found is not None and found[0] < held.seq and 1 in (found[1].n, spec.n):
                        other = found[1]
                        message = (
                            f"{_show(spec.output)} collides with line {other.line}: a job of "
                            "n > 1 images writes <stem>-1.png .. <stem>-n.png, and both would "
                            f"write {file_key}"
                        )
                        errors.append(ManifestError(self._shown, spec.line, "output", message))
                        break
                else:
                    yield held.row  # the hash matched a different value
                continue
            if earlier is not None and earlier[0] < held.seq:
                other = earlier[1]
                if other.output != spec.output:
                    how = f" ({_show(other.output)}; only the case differs)"
                elif other.line == spec.line:
                    how = " (another combination of the matrix: use its variables in output)"
                else:
                    how = ""
                message = f"{_show(spec.output)} collides with line {other.line}{how}"
                errors.append(ManifestError(self._shown, spec.line, "output", message))
                continue
            yield held.row  # the hash matched a different value
        withheld.clear()


def _show(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")
