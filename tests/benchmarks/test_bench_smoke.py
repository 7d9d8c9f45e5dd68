"""Smoke test of the benchmark runner: its quickest mode on a tiny model prints its tables.

Nothing is timed or compared here (speed is measured in ``benchmarks/``, never asserted in
tests); the benchmarks' own correctness checks (fast vs naive results) must pass.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def test_runner_quick_tiny_prints_tables(capsys):
    from benchmarks.__main__ import main

    rc = main(["--quick", "--model", "tiny", "--runs", "1", "--warmup", "0", "--threads", "1",
               "--no-fact", "--only", "rome", "memit", "stats", "memory"])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    # The suite's summary table lists the four benchmarks, each "ok".
    summary = out[out.index("Benchmark suite"):]
    for name in ("rome", "memit", "stats", "memory"):
        assert re.search(rf"^\| {name}\s+\| ok\s+\|", summary, re.M), summary
    # Each benchmark printed its table (Markdown header + separator).
    for header in ("| part ", "| model ", "| batch ", "| path ", "| what "):
        assert re.search(rf"^{re.escape(header)}.*\|\n\|-+\|", out, re.M), header
    # The in-benchmark correctness checks passed (fast and naive paths agree).
    assert out.count("correctness") >= 3 and "FAIL" not in out
