"""Benchmarks of lightning-rome: each fast path against a naive path measured in the same run.

Run them with ``python -m benchmarks [--quick] [--only NAME ...]``; see ``benchmarks/RESULTS.md``
for recorded figures. Speed is measured here and never asserted in unit tests.
"""
