"""Benchmarks: each prints one table of ratios against a baseline measured in the same run.

Run one with ``python -m bench.NAME [--quick]``, all of them with ``python -m bench.run_all``
(``make bench``). Work files go to ``bench/_work/`` (git-ignored); the latest figures are in
``bench/RESULTS.md``.
"""
