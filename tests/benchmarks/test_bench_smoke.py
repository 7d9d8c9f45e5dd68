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


def test_samples_study_quick_tiny(capsys):
    """The reduced-sample C study on the fact model with tiny settings: C from fewer tokens than
    its dimension is singular (rank ≤ tokens), so its plain row fails and the shrunk one runs;
    the reference row is C itself (zero difference)."""
    from benchmarks.bench_samples import run
    from benchmarks.common import Settings
    from lightning_rome.testing import get_fact_model

    get_fact_model()  # trained once and cached (the benchmark itself only uses a cached one)
    res = run(Settings(quick=True, runs=1, warmup=0, threads=1), samples=[100, 20],
              n_requests=1, n_neighbours=2, steps=3)
    out = capsys.readouterr().out
    assert "| C from " in out and "efficacy" in out
    d = res["d"]
    by = {(r["label"], r["variant"]): r for r in res["rows"]}
    ref = by[("all", "plain")]
    assert ref["dW_rel"] == 0.0
    for n in (100, 20):
        plain = by[(f"N = {n}", "plain")]
        shrunk = next(r for (lab, v), r in by.items() if lab == f"N = {n}" and v != "plain")
        assert "efficacy" in shrunk and 0.0 <= shrunk["specificity"] <= 1.0
        # The plain estimate is rejected exactly when it comes from fewer tokens than d.
        assert ("error" in plain) == (shrunk["tokens"] < d), (n, shrunk["tokens"], d)
    assert "error" in by[("N = 20", "plain")]  # 20 sentences are ~240 tokens < d = 384
    assert by[("no C (identity)", "mom2_adjustment=False")]["efficacy"] >= 0.0


def test_vstar_benchmark_engines_agree_with_the_published_loop(capsys):
    """bench_vstar on a tiny GPT-2: both package engines give the published loop's v*, and
    ROME.edit the published edit's ΔW."""
    from benchmarks.bench_vstar import run
    from benchmarks.common import Settings

    res = run(Settings(quick=True, runs=1, warmup=0, threads=1, model="tiny"), steps=4)
    out = capsys.readouterr().out
    assert "| published compute_v loop" in out and "engine='suffix'" in out
    assert res["rel_full"] < 1e-5 and res["rel_suffix"] < 1e-5, res
    assert res["work_suffix"] < res["work_full"] / 2
    # The whole edit: ROME.edit (reference key mode) writes the published code's ΔW.
    assert "| package ROME.edit" in out and res["edit"]["rel_dW"] < 1e-4, res["edit"]
