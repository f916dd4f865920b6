"""The value a manifest row becomes: one job's full, validated description.

A manifest streams each job into the store as a ``JobRow``, a plain tuple in the order of the
job table's import columns (``schema.STAGING_COLUMNS``): a million frozen dataclasses cost
more than checking the million rows. ``JobSpec`` is the same job as a value, for everything
that is not a bulk import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = ["JobRow", "JobSpec", "KindCounts"]

JobRow = tuple[str, int, str, str, str, int, bool, str, str, int, str | None, str | None]
"""(id, line, model, prompt, size, seed, prompt_extend, output, output_key, n, params, vars):
a ``JobSpec``'s fields in the job table's column order."""

KindCounts = dict[tuple[str, bool], tuple[int, int]]
"""(model, prompt_extend) -> (jobs, images): what a bulk load put in the table, counted as the
rows went in (images: the sum of the jobs' ``n``)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class JobSpec:
    """One validated job, ready to import.

    ``output`` is a normalised, relative POSIX path below the run folder's ``images/``;
    ``output_key`` is its case-folded form, used to refuse paths that collide on
    case-insensitive file systems. ``line`` is the manifest line the job came from. ``vars``
    holds the manifest row's own variables (extra columns, ``vars``, matrix values) as a JSON
    object, typed as the manifest wrote them; they describe the image, they do not make it.
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
    n: int = 1  # images one call makes, each its own file (see batcher.layout)
    params: str | None = None  # the optional model parameters given, as JSON (jobs.params)
    vars: str | None = None  # the row's own variables as a JSON object, None without any

    @classmethod
    def from_row(cls, row: JobRow) -> JobSpec:
        """The spec of a ``JobRow``."""
        (
            job_id,
            line,
            model,
            prompt,
            size,
            seed,
            prompt_extend,
            output,
            output_key,
            n,
            params,
            variables,
        ) = row
        return cls(
            id=job_id,
            model=model,
            prompt=prompt,
            size=size,
            seed=seed,
            prompt_extend=prompt_extend,
            output=output,
            output_key=output_key,
            line=line,
            n=n,
            params=params,
            vars=variables,
        )

    def row(self) -> JobRow:
        """This spec as a ``JobRow`` (``JobSpec.from_row(spec.row()) == spec``)."""
        return (
            self.id,
            self.line,
            self.model,
            self.prompt,
            self.size,
            self.seed,
            self.prompt_extend,
            self.output,
            self.output_key,
            self.n,
            self.params,
            self.vars,
        )

    @property
    def variables(self) -> dict[str, object]:
        """``vars`` as a dict (empty without any)."""
        return {} if self.vars is None else dict(json.loads(self.vars))

    @property
    def width(self) -> int:
        return int(self.size.split("*", 1)[0])

    @property
    def height(self) -> int:
        return int(self.size.split("*", 1)[1])
