"""Making a rename or a link survive a crash: the folder that holds the name is fsynced.

A file written under a temporary name, fsynced and renamed (or linked) into place is whole
once the folder's entry is on disk too; until then a power cut may leave the old name.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir"]


def fsync_dir(folder: Path | str) -> None:
    """Flush ``folder``'s entries (a name just renamed, linked or removed in it) to disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
