"""Benchmark: MEMIT throughput (edits per second) against the batch size.

Edits COUNTERFACT requests (the local ``counterfact-train.json``) in batches of 1, 10, 100 and
1,000 (``--quick``: 1, 4, 16 on the scaled-down model) with
:class:`lightning_rome.editing.memit.MEMIT` on a GPT-2-small-sized model with random weights. Each layer's second moment is a random
positive-definite matrix passed through ``second_moment=``, so statistics are not timed. The
naive reference is the same editor called once per request (batch size 1): the cost per edit at
batch size 1 is the baseline that batching must beat.

Settings (stated in the output): few z-optimisation steps (``--steps``, default 2), key
averaging over the bare prompt only (the published 21 context templates multiply the forward
work per request by about 11), the published λ and z batch size.

Usage::

    python -m benchmarks.bench_memit [--quick] [--batches 1 10 100] [--steps 2]
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any

import torch

from benchmarks.common import (
    BenchModel,
    PeakMemory,
    Settings,
    add_common_args,
    build_model,
    counterfact_requests,
    fmt_bytes,
    fmt_s,
    machine_line,
    print_table,
    random_second_moment,
    section,
    settings_from_args,
    sync,
    time_interleaved,
    time_runs,
    write_json,
)
from lightning_rome.editing.memit import (
    MEMIT,
    MEMITHyperParams,
    cholesky_factor,
    memit_update,
)
from lightning_rome.models import get_layout

DEFAULT_LAYERS = {"gpt2-small": [3, 4, 5, 6, 7], "gpt2-mini": [1, 2], "tiny": [0, 1],
                  "fact": [0, 1]}


def make_memit(bm: BenchModel, steps: int, layers: list[int], seed: int,
               device: torch.device) -> tuple[MEMIT, dict[str, torch.Tensor]]:
    """A MEMIT editor with a random positive-definite C per layer (precomputed, not timed)."""
    layout = get_layout(bm.model)
    Cs = {layout.name("mlp_out", layer): random_second_moment(bm.d_ff, seed + layer, device)
          for layer in layers}
    hp = MEMITHyperParams(layers=layers, v_num_grad_steps=steps, early_stop_loss=0.0,
                          context_templates=["{}"], seed=seed)
    return MEMIT(hp, second_moment=lambda m, t, n: Cs[n]), Cs


def time_batch(memit: MEMIT, bm: BenchModel, reqs: list[Any], s: Settings,
               budget: float) -> dict[str, Any]:
    """Edit ``reqs`` in one batch, up to ``s.runs`` times (fewer when the next run would pass
    ``budget`` seconds, at least one); time the z optimisation separately. Peak memory is taken
    on the first run."""
    times, z_times = [], []
    orig = memit.compute_z

    def compute_z(*args: Any, **kwargs: Any) -> Any:
        sync(s.device)
        t0 = time.perf_counter()
        out = orig(*args, **kwargs)
        sync(s.device)
        z_times.append(time.perf_counter() - t0)
        return out

    memit.compute_z = compute_z  # type: ignore[method-assign]  (benchmark-only timing)
    peak = None
    try:
        spent = 0.0
        while len(times) < s.runs:
            mem = PeakMemory(s.device, retained=False) if not times else None
            if mem is not None:
                mem.__enter__()
            sync(s.device)
            t0 = time.perf_counter()
            memit.edit(bm.model, bm.tokenizer, reqs)
            sync(s.device)
            times.append(time.perf_counter() - t0)
            if mem is not None:
                mem.__exit__(None, None, None)
                peak = mem.peak
            spent += times[-1]
            if spent + times[-1] > budget:
                break
    finally:
        del memit.compute_z
    times_sorted = sorted(times)
    median = times_sorted[len(times) // 2] if len(times) % 2 else sum(
        times_sorted[len(times) // 2 - 1:len(times) // 2 + 1]) / 2
    return {"times": times, "median": median, "z": sorted(z_times)[len(z_times) // 2],
            "peak": peak}


def solve_cost(bm: BenchModel, Cs: dict[str, torch.Tensor], s: Settings) -> dict[str, float]:
    """Median times of one per-layer solve ``R Kᵀ (λC + KKᵀ)⁻¹`` for a single request: dense,
    and Woodbury with the cached Cholesky factor (what :class:`MEMIT` does), and the factor."""
    C = next(iter(Cs.values()))
    K = torch.randn(bm.d_ff, 1, dtype=torch.float64, device=s.device)  # (d_in, 1)
    R = torch.randn(bm.model.config.n_embd, 1, dtype=torch.float64, device=s.device)
    t_chol, L = time_runs(lambda: cholesky_factor(C), s, runs=1, warmup=0)
    (t_dense, _), (t_wood, _) = time_interleaved(
        [lambda: memit_update(K, R, C, 20000.0, method="dense"),
         lambda: memit_update(K, R, C, 20000.0, factor=L, method="woodbury")], s, runs=3,
        warmup=0)
    return {"dense": t_dense.median, "woodbury": t_wood.median, "cholesky": t_chol.median}


def solve_rows(s: Settings, dims: list[int], sizes: list[int]) -> tuple[list[list[str]],
                                                                        list[dict[str, Any]]]:
    """The per-layer solve of :func:`memit_update`, dense (``method="dense"``: an LU solve of
    the ``d x d`` system, what every batch paid before) against Woodbury (``"woodbury"`` with
    the Cholesky factor of C computed once per layer, as :class:`MEMIT` caches it), for each
    key dimension ``d`` and batch size ``u``, interleaved; with the relative difference of the
    two ΔW (float64)."""
    rows, out = [], []
    d_out = 768
    for d in dims:
        C = random_second_moment(d, s.seed + d, s.device)  # (d, d)
        sync(s.device)
        t0 = time.perf_counter()
        L = cholesky_factor(C)  # (d, d), once per layer
        sync(s.device)
        t_chol = time.perf_counter() - t0
        rows.append([d, "Cholesky of C (once per layer, cached)", "-", fmt_s(t_chol), "-", "-"])
        out.append({"d": d, "cholesky_s": t_chol})
        g = torch.Generator().manual_seed(s.seed)
        for u in sizes:
            K = (torch.randn(d, u, generator=g, dtype=torch.float64) / 10).to(s.device)
            R = torch.randn(d_out, u, generator=g, dtype=torch.float64).to(s.device)
            runs = 1 if d * d * d > 2e10 else 3
            (t_dense, dense), (t_wood, wood) = time_interleaved(
                [lambda K=K, R=R, C=C: memit_update(K, R, C, 20000.0, method="dense"),
                 lambda K=K, R=R, C=C, L=L: memit_update(K, R, C, 20000.0, factor=L,
                                                        method="woodbury")],
                s, runs=runs, warmup=0)
            dW = dense.dense(torch.float64)
            rel = float((wood.dense(torch.float64) - dW).norm() / dW.norm())
            rows.append([d, f"u = {u}", fmt_s(t_dense.median), fmt_s(t_wood.median),
                         f"{t_dense.median / t_wood.median:.1f}x", f"{rel:.1e}"])
            out.append({"d": d, "u": u, "dense_s": t_dense.times, "woodbury_s": t_wood.times,
                        "rel": rel})
        del C, L
    return rows, out


def _throughput(memit: MEMIT, bm: BenchModel, Cs: dict[str, torch.Tensor], reqs: list[Any],
                batches: list[int], s: Settings, budget: float, rows: list[list[Any]],
                results: dict[int, Any]) -> dict[str, float]:
    """Time MEMIT edits at each batch size (rows and results filled in); returns the solve
    costs of one layer."""
    memit.edit(bm.model, bm.tokenizer, reqs[-1:])  # warm-up: templates, C, factor, allocator
    t_solve = solve_cost(bm, Cs, s)
    print(f"per-layer solve at u = 1 ({bm.d_ff}x{bm.d_ff}, float64): dense "
          f"{fmt_s(t_solve['dense'])}, Woodbury with the cached factor "
          f"{fmt_s(t_solve['woodbury'])} (the factor, once per layer: "
          f"{fmt_s(t_solve['cholesky'])})")
    base = None
    for n in batches:
        r = time_batch(memit, bm, reqs[:n], s, budget)
        per_edit = r["median"] / n
        base = base or per_edit
        results[n] = {**r, "per_edit": per_edit}
        rows.append([n, len(r["times"]), fmt_s(r["median"]), f"{n / r['median']:.3g}",
                     fmt_s(per_edit), f"{base / per_edit:.2f}x",
                     f"{100 * r['z'] / r['median']:.0f}%", fmt_bytes(r["peak"])])
        print(f"  batch {n}: {fmt_s(r['median'])} ({len(r['times'])} runs: "
              f"{', '.join(fmt_s(t) for t in r['times'])}), {fmt_s(per_edit)} per edit, "
              f"z optimisation {100 * r['z'] / r['median']:.0f}%, peak "
              f"{fmt_bytes(r['peak'])}", flush=True)
    return t_solve


def run(s: Settings, *, batches: list[int] | None = None, steps: int = 2,
        layers: list[int] | None = None, budget: float | None = None,
        solve_dims: list[int] | None = None, solve_sizes: list[int] | None = None,
        edits: bool = True) -> dict[str, Any]:
    """Run the benchmark and print its table; returns the figures."""
    print(machine_line(s.device), flush=True)
    if batches is None:
        batches = ([1, 10] if s.model == "tiny" else [1, 4, 16] if s.quick
                   else [1, 10, 100, 1000])
    if budget is None:
        budget = 10.0 if s.quick or s.model == "tiny" else 900.0
    bm = build_model(s.model, s.device, s.dtype, s.seed)
    layers = layers or DEFAULT_LAYERS.get(bm.name, [0, 1])
    memit, Cs = make_memit(bm, steps, layers, s.seed, s.device)
    reqs = counterfact_requests(max(batches) + 1, bm.tokenizer)
    hp = memit.hparams
    print(f"model: {bm.description}")
    print(f"MEMIT: layers {layers}, {steps} z steps (no early stop), key averaging over the "
          f"bare prompt only, λ = {hp.mom2_update_weight:g}, z batch {hp.z_batch_size}, "
          f"C random PD per layer ({bm.d_ff}x{bm.d_ff}, not timed); {s.dtype_name}; up to "
          f"{s.runs} timed runs per batch size (fewer past {budget:.0f} s), after a warm-up")
    rows, results = [], {}
    t_solve: dict[str, float] = {}
    if edits:
        with section("MEMIT throughput"):
            t_solve = _throughput(memit, bm, Cs, reqs, batches, s, budget, rows, results)
        print_table(["batch", "runs", "time (median)", "edits/s", "time per edit",
                     "per edit vs batch 1 (one at a time)", "z optimisation", "peak mem"], rows,
                    title="MEMIT throughput against the batch size")
        first, last = batches[0], batches[-1]
        drop = results[first]["per_edit"] / results[last]["per_edit"]
        steps_txt = ", ".join(
            f"{a}→{b}: {results[a]['per_edit'] / results[b]['per_edit']:.2f}x"
            for a, b in itertools.pairwise(batches))
        print(f"\nThe cost per edit falls {drop:.1f}x from batch {first} to batch {last} "
              f"({steps_txt}).")

    dims = solve_dims or ([bm.d_ff] if s.quick or s.model == "tiny" else [1600, 6400])
    sizes = solve_sizes or ([1, 10, 100] if s.quick or s.model == "tiny"
                            else [1, 10, 100, 1000])
    with section("the per-layer solve: dense vs Woodbury with a cached Cholesky factor"):
        srows, sres = solve_rows(s, dims, sizes)
    print_table(["d", "batch", "dense solve", "Woodbury, cached Cholesky", "speed-up",
                 "ΔW rel. diff (as stored)"], srows,
                title="memit_update per layer: dense (λC + KKᵀ) solve vs Woodbury (float64)")
    worst = max(r["rel"] for r in sres if "rel" in r)
    ok = worst <= 1e-6
    print(f"correctness: {'PASS' if ok else 'FAIL'}: largest relative difference of ΔW, "
          f"Woodbury vs dense: {worst:.1e} (tolerance 1e-6)")
    write_json(s.json_out, "memit", {"batches": {str(k): {kk: vv for kk, vv in v.items()}
                                                 for k, v in results.items()},
                                     "solve_s": t_solve, "steps": steps, "layers": layers,
                                     "solves": sres, "solve_ok": ok})
    results["solve_ok"] = ok
    return results


def main(argv: list[str] | None = None) -> int:
    ap = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    ap.add_argument("--batches", type=int, nargs="+", default=None,
                    help="batch sizes (default 1 10 100 1000; --quick: 1 4 16)")
    ap.add_argument("--steps", type=int, default=2, help="z optimisation steps (default 2)")
    ap.add_argument("--layers", type=int, nargs="+", default=None,
                    help="the edited layers R (default 3-7 on GPT-2 small)")
    ap.add_argument("--solve-dims", type=int, nargs="+", default=None,
                    help="key dimensions d of the dense vs Woodbury solve table (default 1600 "
                         "6400; --quick: the model's d_ff)")
    ap.add_argument("--solve-sizes", type=int, nargs="+", default=None,
                    help="batch sizes u of that table (default 1 10 100 1000; --quick: 1 10 "
                         "100)")
    ap.add_argument("--solves-only", action="store_true",
                    help="only the solve table (no edits timed)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds per batch size after which no further run starts "
                         "(default 900; 10 with --quick)")
    args = ap.parse_args(argv)
    s = settings_from_args(args)
    r = run(s, batches=args.batches, steps=args.steps, layers=args.layers, budget=args.budget,
            solve_dims=args.solve_dims, solve_sizes=args.solve_sizes,
            edits=not args.solves_only)
    return 0 if r["solve_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
