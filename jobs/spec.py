"""The value a manifest row becomes: one job's full, validated description."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_MODEL", "JobSpec"]

DEFAULT_MODEL = "z-image-turbo"


@dataclass(frozen=True, kw_only=True, slots=True)
class JobSpec:
    """One validated job, ready to import.

    ``output`` is a normalised, relative POSIX path below the run folder's ``images/``;
    ``output_key`` is its case-folded form, used to refuse paths that collide on
    case-insensitive file systems. ``line`` is the manifest line the job came from.
    """

    id: str
    model: str
    prompt: str
    size: str  # always "W*H"
    seed: int  # given, or derived from the id so a job is reproducible
    prompt_extend: bool
    output: str
    output_key: str
    line: int

    @property
    def width(self) -> int:
        return int(self.size.split("*", 1)[0])

    @property
    def height(self) -> int:
        return int(self.size.split("*", 1)[1])
