"""What a run folder remembers about itself, and the refusals that keep it truthful.

A run folder belongs to one manifest and to one kind of endpoint:

- its manifest's path is kept in the database (meta ``manifest``): ``batcher run DIR`` resumes
  from the folder alone, and a *default* folder (``out/<stem>``) made from one manifest refuses
  another manifest of the same stem (``a/data.csv`` and ``b/data.jsonl``) rather than mixing
  them. Naming the folder with ``--out`` is asking for it: that manifest becomes the folder's;
- every image records the endpoint it came from (``emulator``, or the API base URL; never the
  key). A rehearsal (``--emulate``) defaults to ``out/<stem>.emulated``; a paid run into a folder
  holding emulated images, a rehearsal into a folder holding paid ones, or a run against another
  endpoint than the folder's images came from, refuses with one line saying what to do. Images
  of version-1 folders (before endpoints were recorded) whose URL was on the loopback count as
  emulated; the others as paid at an unrecorded endpoint, which any paid run may continue.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yarl

from jobs import EMULATOR_ENDPOINT, JobStore, ManifestError, ManifestInvalid

from .errors import ConfigError
from .layout import RunLayout
from .wording import plural

__all__ = [
    "ENDPOINTS_KEY",
    "MANIFEST_KEY",
    "Target",
    "check_endpoint",
    "check_folder_endpoint",
    "check_manifest",
    "default_out",
    "endpoint_label",
    "is_rehearsal_folder",
    "resolve_target",
]

MANIFEST_KEY = "manifest"
"""Meta key: the absolute path of the manifest the folder follows."""
ENDPOINTS_KEY = "endpoints"
"""Meta key: the endpoints runs into this folder used, a JSON list (``null`` for images from
before endpoints were recorded): read instead of scanning every job when a run resumes."""


def default_out(manifest: Path, *, emulate: bool = False) -> Path:
    """The run folder of a manifest when ``--out`` is not given: ``out/<stem>``, or
    ``out/<stem>.emulated`` for a rehearsal.

    >>> str(default_out(Path("a/m.csv"), emulate=True))
    'out/m.emulated'
    """
    return Path("out") / (f"{manifest.stem}.emulated" if emulate else manifest.stem)


def endpoint_label(*, emulate: bool, base_url: str) -> str:
    """What a job records as its image's endpoint: ``emulator``, or the base URL without any
    user name or password it may carry.

    >>> endpoint_label(emulate=False, base_url="https://u:p@example.com/api/v1")
    'https://example.com/api/v1'
    """
    if emulate:
        return EMULATOR_ENDPOINT
    url = yarl.URL(base_url)
    return str(url.with_user(None)) if url.user or url.password else base_url


FS_BYTES = "fs-bytes:"  # a stored path that is not UTF-8: its bytes in hex


def _absolute(path: Path) -> str:
    """``path`` made absolute against the working directory (no symlink resolved), as text the
    database can hold: a name that is not UTF-8 (bytes the filesystem allows) is stored as
    ``fs-bytes:`` and its bytes in hex, so it comes back as the same name."""
    absolute = os.path.abspath(path)
    try:
        absolute.encode("utf-8")
    except UnicodeEncodeError:
        return FS_BYTES + os.fsencode(absolute).hex()
    return absolute


def _stored_path(text: str) -> Path:
    """The path :func:`_absolute` stored as ``text``."""
    if text.startswith(FS_BYTES):
        return Path(os.fsdecode(bytes.fromhex(text[len(FS_BYTES) :])))
    return Path(text)


@dataclass(frozen=True, kw_only=True, slots=True)
class Target:
    """The manifest to import and the run folder to use, and whether the user named it."""

    manifest: Path
    layout: RunLayout
    explicit: bool

    @property
    def in_paid_default(self) -> bool:
        """Whether the folder is the manifest's paid default, ``out/<stem>`` (named or not)."""
        return _absolute(self.layout.root) == _absolute(default_out(self.manifest))


async def resolve_target(
    target: Path, out: Path | None, *, emulate: bool, database: str | None = None
) -> Target:
    """``MANIFEST [--out DIR]``, or a run folder ``DIR`` standing for its own manifest.
    ``database``: the run's table is in that PostgreSQL database, not in the folder."""
    if not target.is_dir():  # noqa: ASYNC240 (a stat, once per command)
        if not os.path.lexists(target):  # noqa: ASYNC240 (the same stat)
            # said before any folder or database is made: a missing manifest writes nothing
            raise ManifestInvalid([ManifestError(os.fspath(target), None, None, "no such file")])
        layout = RunLayout.locate(out or default_out(target, emulate=emulate), database)
        return Target(manifest=target, layout=layout, explicit=out is not None)
    layout = RunLayout.locate(target, database)
    if not layout.has_store():
        raise ConfigError(f"{target} is a folder, neither a manifest nor a batcher run folder")
    if out is not None and _absolute(out) != _absolute(target):
        raise ConfigError(f"{target} is a run folder: --out cannot name another one")
    # Read-only when the folder cannot be written (read-only media): the run or plan then
    # refuses it in one line, as for a manifest, instead of failing to open the database.
    writable = layout.shared or (os.access(layout.root, os.W_OK) and os.access(layout.db, os.W_OK))
    async with await JobStore.open(layout.store, create=False, read_only=not writable) as store:
        remembered = await store.get_meta(MANIFEST_KEY)
    if remembered is None:
        raise ConfigError(
            f"{target} does not record its manifest (made by an older batcher): "
            f"give the manifest and --out {target}"
        )
    manifest = _stored_path(remembered)
    if not manifest.is_file():
        raise ConfigError(
            f"{target} was made from {manifest}, which is no longer there: "
            f"give the manifest's new path and --out {target}"
        )
    return Target(manifest=manifest, layout=layout, explicit=True)


async def check_manifest(store: JobStore, target: Target) -> str | None:
    """Refuse a default folder made from another manifest of the same stem. Returns the path
    to record as the folder's manifest once the import succeeded, None when it is already."""
    path = _absolute(target.manifest)
    found = await store.get_meta(MANIFEST_KEY)
    if found is not None and found != path and not target.explicit:
        raise ConfigError(
            f"{target.layout.root} was made from {found}, not {target.manifest}: give this "
            f"manifest a folder of its own with --out DIR (or --out {target.layout.root} to "
            "make it this folder's manifest, withdrawing the other's jobs)"
        )
    return None if found == path else path


async def check_folder_endpoint(
    store: JobStore,
    endpoint: str,
    root: Path,
    *,
    default: bool = False,
    siblings: frozenset[str] = frozenset(),
) -> None:
    """:func:`check_endpoint` for the folder of ``store``, then remember ``endpoint`` (and
    ``siblings``, the endpoints of the run's other lanes) as its own. The jobs are scanned only
    for a folder that has no list yet, or when the list names another endpoint (to count its
    images for the refusal)."""
    known_text = await store.get_meta(ENDPOINTS_KEY)
    known: set[str | None] = set(json.loads(known_text)) if known_text else set()
    # images of an unrecorded endpoint (None) were paid: any paid run may go on with them
    compatible = {endpoint} if endpoint == EMULATOR_ENDPOINT else {endpoint, None, *siblings}
    if known_text is None or known - compatible:
        found = await store.endpoints()
        check_endpoint(found, endpoint, root, default=default, siblings=siblings)
        known = set(found)
    mine = {endpoint, *siblings}
    if mine - known or known_text is None:
        listed = sorted(known | mine, key=lambda e: (e is None, e or ""))
        await store.set_meta(ENDPOINTS_KEY, json.dumps(listed))


async def is_rehearsal_folder(store: JobStore, *, nothing_billed: bool = False) -> bool:
    """Whether every image of the folder came from the emulator: only a rehearsal can go on
    in it (a paid run is refused), so ``plan`` prices what is left as emulated.
    ``nothing_billed``: the caller knows no job has an image (a first import just filled the
    table), so the jobs need not be read (at a million rows, a scan)."""
    known_text = await store.get_meta(ENDPOINTS_KEY)
    if known_text:
        known = json.loads(known_text)
    else:
        known = [] if nothing_billed else list(await store.endpoints())
    return bool(known) and set(known) == {EMULATOR_ENDPOINT}


def check_endpoint(
    found: dict[str | None, int],
    endpoint: str,
    root: Path,
    *,
    default: bool = False,
    siblings: frozenset[str] = frozenset(),
) -> None:
    """Refuse a run whose images would be mixed with another endpoint's (see the module
    docstring); ``found`` is :meth:`JobStore.endpoints`. ``default``: ``root`` is the paid
    run's default folder (``out/<stem>``), which the advice then does not point back to.
    ``siblings``: the endpoints of the run's other lanes (a paid run with lanes in both
    regions), whose images count as the run's own."""
    others = {
        e: n
        for e, n in found.items()
        if e is not None and e != endpoint and (e not in siblings or e == EMULATOR_ENDPOINT)
    }
    legacy = found.get(None, 0)
    if endpoint == EMULATOR_ENDPOINT:
        paid = sum(others.values()) + legacy
        if paid:
            raise ConfigError(
                f"{root} holds {plural(paid, 'paid image')}: a rehearsal never writes over them; "
                "rehearse without --out (in out/<name>.emulated) or in a folder of its own"
            )
        return
    emulated = others.pop(EMULATOR_ENDPOINT, 0)
    if emulated:
        elsewhere = (
            "give the paid run a folder of its own with --out DIR"
            if default
            else "run the manifest without --out (into out/<name>) or with another --out DIR"
        )
        raise ConfigError(
            f"{root} holds {plural(emulated, 'image')} from the emulator (a rehearsal), "
            f"which never count as done for a paid run: add --emulate to go on rehearsing, or "
            f"{elsewhere}"
        )
    if others:
        where = ", ".join(sorted(others))
        raise ConfigError(
            f"{root} holds images from {where}, and images from another endpoint never count "
            f"as done for {endpoint}: choose another --out DIR for this endpoint"
        )
