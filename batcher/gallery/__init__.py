"""The run report and the review page: a static gallery of a run folder's jobs
(:func:`build_report`, ``batcher report``) and a local server that serves it with review marks
(:mod:`batcher.gallery.server`, ``batcher review``)."""

from __future__ import annotations

from .site import ReportResult, build_report

__all__ = ["ReportResult", "build_report"]
