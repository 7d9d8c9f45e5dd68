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
    time_runs,
    write_json,
)
from lightning_rome.editing.memit import MEMIT, MEMITHyperParams, memit_update
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


def solve_cost(bm: BenchModel, Cs: dict[str, torch.Tensor], s: Settings) -> float:
    """Median time of one per-layer solve ``R Kᵀ (λC + KKᵀ)⁻¹`` for a single request."""
    C = next(iter(Cs.values()))
    K = torch.randn(bm.d_ff, 1, dtype=torch.float64, device=s.device)  # (d_in, 1)
    R = torch.randn(bm.model.config.n_embd, 1, dtype=torch.float64, device=s.device)
    times = []
    for _ in range(3):
        sync(s.device)
        t0 = time.perf_counter()
        memit_update(K, R, C, 20000.0)
        sync(s.device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[1]


def woodbury_update(K: torch.Tensor, R: torch.Tensor, L: torch.Tensor, lam: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prototype (benchmark-only): the same ``ΔW = R Kᵀ (λC + KKᵀ)⁻¹`` through the Woodbury
    identity ``(λC + KKᵀ)⁻¹ K = C⁻¹K (λI + KᵀC⁻¹K)⁻¹`` with a cached Cholesky factor ``L`` of
    C: O(d²u) per batch instead of O(d³). Returns ``(R, Aᵀ)`` like :func:`memit_update`."""
    K64 = K.double()  # (d_in, u)
    X = torch.cholesky_solve(K64, L)  # (d_in, u)  C⁻¹K
    M = lam * torch.eye(K64.shape[1], dtype=torch.float64, device=K64.device) + K64.T @ X
    A_T = torch.linalg.solve(M, X.T)  # (u, d_in)  Aᵀ = M⁻¹ (C⁻¹K)ᵀ, M symmetric
    return R.double(), A_T


def solve_table(bm: BenchModel, Cs: dict[str, torch.Tensor], s: Settings,
                sizes: list[int]) -> list[list[str]]:
    """``memit_update`` (a dense d×d solve per layer and batch) against the Woodbury prototype,
    per batch size u, with the largest relative difference of ΔW."""
    C = next(iter(Cs.values()))
    d_out = bm.model.config.n_embd
    g = torch.Generator().manual_seed(s.seed)
    sync(s.device)
    t0 = time.perf_counter()
    L = torch.linalg.cholesky(C)  # (d_in, d_in), once per layer
    sync(s.device)
    t_chol = time.perf_counter() - t0
    rows = [["Cholesky of C (once per layer, cached)", "-", fmt_s(t_chol), "-", "-"]]
    for u in sizes:
        K = torch.randn(bm.d_ff, u, generator=g, dtype=torch.float64).to(s.device) / 10
        R = torch.randn(d_out, u, generator=g, dtype=torch.float64).to(s.device)
        t_direct, direct = time_runs(lambda K=K, R=R: memit_update(K, R, C, 20000.0), s,
                                     runs=3, warmup=0)
        t_wood, (left, right) = time_runs(lambda K=K, R=R: woodbury_update(K, R, L, 20000.0),
                                          s, runs=3, warmup=0)
        dW = direct.dense(torch.float64)
        rel = float((left @ right - dW).norm() / dW.norm())
        rows.append([f"u = {u}", fmt_s(t_direct.median), fmt_s(t_wood.median),
                     f"{t_direct.median / t_wood.median:.1f}x", f"{rel:.1e}"])
    return rows


def run(s: Settings, *, batches: list[int] | None = None, steps: int = 2,
        layers: list[int] | None = None, budget: float | None = None) -> dict[str, Any]:
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
    with section("MEMIT throughput"):
        memit.edit(bm.model, bm.tokenizer, reqs[-1:])  # warm-up: templates, C, allocator
        t_solve = solve_cost(bm, Cs, s)
        print(f"fixed cost per batch: {len(layers)} solves of a {bm.d_ff}x{bm.d_ff} float64 "
              f"system, {fmt_s(t_solve)} each ({fmt_s(t_solve * len(layers))} per batch)")
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
    print_table(["batch", "runs", "time (median)", "edits/s", "time per edit",
                 "per edit vs batch 1 (one at a time)", "z optimisation", "peak mem"], rows,
                title="MEMIT throughput against the batch size")
    first, last = batches[0], batches[-1]
    drop = results[first]["per_edit"] / results[last]["per_edit"]
    steps_txt = ", ".join(f"{a}→{b}: {results[a]['per_edit'] / results[b]['per_edit']:.2f}x"
                          for a, b in itertools.pairwise(batches))
    print(f"\nThe cost per edit falls {drop:.1f}x from batch {first} to batch {last} "
          f"({steps_txt}).")
    with section("waste: the per-layer solve, direct vs Woodbury (benchmark-only prototype)"):
        print_table(["batch", "memit_update (now)", "Woodbury, cached Cholesky", "speed-up",
                     "ΔW rel. diff"], solve_table(bm, Cs, s, batches))
    write_json(s.json_out, "memit", {"batches": {str(k): {kk: vv for kk, vv in v.items()}
                                                 for k, v in results.items()},
                                     "solve_s": t_solve, "steps": steps, "layers": layers})
    return results


def main(argv: list[str] | None = None) -> int:
    ap = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    ap.add_argument("--batches", type=int, nargs="+", default=None,
                    help="batch sizes (default 1 10 100 1000; --quick: 1 4 16)")
    ap.add_argument("--steps", type=int, default=2, help="z optimisation steps (default 2)")
    ap.add_argument("--layers", type=int, nargs="+", default=None,
                    help="the edited layers R (default 3-7 on GPT-2 small)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds per batch size after which no further run starts "
                         "(default 900; 10 with --quick)")
    args = ap.parse_args(argv)
    s = settings_from_args(args)
    run(s, batches=args.batches, steps=args.steps, layers=args.layers, budget=args.budget)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
