"""Run the benchmark suite.

Usage::

    python -m benchmarks                    # every benchmark, full size (GPT-2 small)
    python -m benchmarks --quick            # small workloads, under 2 minutes on 2 CPU cores
    python -m benchmarks --only rome memit  # some of them
    python -m benchmarks --device cuda --dtype bf16
    python -m benchmarks fidelity           # ROME / MEMIT against the published algorithm

The suite's own benchmarks (rome, memit, stats, memory, samples) take every common option, and so does
any other built on ``benchmarks.common.add_common_args``. The rest are called with ``--quick``
only. Others are called through their ``run(quick=...)`` or ``main(argv)`` when they have one,
else as a subprocess. A benchmark whose file does not exist is
reported as missing.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import subprocess
import sys
import time
import traceback
from typing import Any

from benchmarks.common import REPO, add_common_args, fmt_s, machine_line, print_table

#: ``(name for --only, module in benchmarks/)`` in the order they run.
SUITE: tuple[tuple[str, str], ...] = (
    ("rome", "bench_rome"),
    ("vstar", "bench_vstar"),
    ("memit", "bench_memit"),
    ("stats", "bench_stats"),
    ("memory", "bench_memory"),
    ("samples", "bench_samples"),
    ("tracing", "bench_tracing"),
    ("evaluation", "bench_evaluation"),
    ("fidelity", "bench_fidelity"),
    ("rome-modes", "bench_rome_modes"),
)
#: The benchmarks that accept the common options (``benchmarks/common.py``).
OWN = frozenset({"rome", "memit", "stats", "memory", "samples"})
#: Own benchmarks that also take ``--no-fact``.
FACT_ROWS = frozenset({"rome", "memory"})
#: Own benchmarks that run on the fact model only (skipped with ``--no-fact``).
FACT_ONLY = frozenset({"samples"})


def _common_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--device", args.device, "--dtype", args.dtype, "--runs", str(args.runs),
            "--warmup", str(args.warmup), "--seed", str(args.seed)]
    if args.quick:
        argv.append("--quick")
    if args.model:
        argv += ["--model", args.model]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.json_out:
        argv += ["--json", str(args.json_out)]
    return argv


def _takes_argv(fn: Any) -> bool:
    try:
        return bool(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False


def _run_foreign(module_name: str, quick: bool, common: list[str]) -> int:
    """A benchmark owned elsewhere: ``run(quick=)``, ``main(argv)``, or a subprocess. One built
    on ``benchmarks.common.add_common_args`` gets every common option, the others ``--quick``."""
    module = importlib.import_module(f"benchmarks.{module_name}")
    flags = common if getattr(module, "add_common_args", None) is add_common_args else (
        ["--quick"] if quick else [])
    run = getattr(module, "run", None)
    if callable(run):
        try:
            params = inspect.signature(run).parameters
        except (TypeError, ValueError):
            params = {}
        if "quick" in params:
            out = run(quick=quick)
            return out if isinstance(out, int) else 0
    main = getattr(module, "main", None)
    if callable(main) and _takes_argv(main):
        out = main(flags)
        return out if isinstance(out, int) else 0
    path = REPO / "benchmarks" / f"{module_name}.py"
    return subprocess.run([sys.executable, str(path), *flags], cwd=REPO).returncode


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks and print a summary table; non-zero if any failed."""
    names = [n for n, _ in SUITE]
    ap = add_common_args(argparse.ArgumentParser(
        prog="python -m benchmarks", description="Run the lightning-rome benchmark suite."))
    ap.add_argument("--only", nargs="+", choices=names, metavar="NAME",
                    help=f"run only these ({', '.join(names)})")
    ap.add_argument("--no-fact", action="store_true", help="skip the fact-model rows")
    ap.add_argument("names", nargs="*", metavar="NAME",
                    help="benchmarks to run, as --only (e.g. `python -m benchmarks fidelity`)")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in names]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {names}")
    if args.names:
        args.only = [*(args.only or []), *args.names]
    selected = [(n, m) for n, m in SUITE if not args.only or n in args.only]
    common = _common_argv(args)
    print(machine_line(args.device), flush=True)
    rows, failed = [], False
    for name, module_name in selected:
        path = REPO / "benchmarks" / f"{module_name}.py"
        if not path.is_file():
            rows.append([name, "missing (no benchmarks/" + path.name + ")", "-"])
            continue
        if args.no_fact and name in FACT_ONLY:
            rows.append([name, "skipped (--no-fact)", "-"])
            continue
        print(f"\n##### {name} ({module_name}) #####", flush=True)
        t0 = time.perf_counter()
        try:
            if name in OWN:
                module = importlib.import_module(f"benchmarks.{module_name}")
                extra = ["--no-fact"] if args.no_fact and name in FACT_ROWS else []
                rc = module.main(common + extra)
            else:
                rc = _run_foreign(module_name, args.quick, common)
        except Exception:
            traceback.print_exc()
            rc = -1
        elapsed = time.perf_counter() - t0
        status = "ok" if rc == 0 else ("error" if rc == -1 else f"failed (exit {rc})")
        failed = failed or rc != 0
        rows.append([name, status, fmt_s(elapsed)])
        sys.stdout.flush()
    print_table(["benchmark", "status", "time"], rows, title="Benchmark suite")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
