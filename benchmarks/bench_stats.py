"""Benchmark: layer statistics (the second moment C = E[k kᵀ] of W_out's input).

Two comparisons on WikiText-2 texts (the local copy), cache off:

1. tokens/s of :func:`lightning_rome.stats.get_second_moment` (padded batches, the forward pass
   cut after the hooked module, one ``addmm`` per batch) against a naive loop: one text at a
   time, a full forward pass with a hook, and a float64 outer product per token. The two C are
   checked to agree.
2. Several layers in one pass (:func:`get_second_moments`) against one pass per layer.
3. The Lightning job (:func:`lightning_rome.stats.lightning.compute_second_moments_distributed`,
   ``Trainer.predict`` on the CPU) with 1 process and with 2 (``ddp_spawn``, one corpus shard per
   rank, one thread each): tokens/s per rank, and the check that both C agree (``--no-ddp``
   skips it; it is skipped with ``--quick``).

Usage::

    python -m benchmarks.bench_stats [--quick] [--texts 64] [--naive-texts 4]
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import torch

from benchmarks.common import (
    BenchModel,
    Settings,
    add_common_args,
    build_model,
    fmt_s,
    machine_line,
    print_table,
    section,
    settings_from_args,
    time_interleaved,
    time_runs,
    write_json,
)
from lightning_rome.hooks import module_hooks
from lightning_rome.models import get_layout
from lightning_rome.stats import get_second_moment, get_second_moments
from lightning_rome.stats.collect import default_seq_len

DEFAULT_LAYER = {"gpt2-small": 5, "gpt2-mini": 1, "tiny": 0, "fact": 1}
MULTI_LAYERS = {"gpt2-small": [3, 4, 5, 6, 7], "gpt2-mini": [0, 1, 2, 3], "tiny": [0, 1],
                "fact": [0, 1, 2, 3]}


def wikitext(n: int) -> list[str]:
    """The first ``n`` WikiText-2 (valid) paragraphs, as the statistics corpus reads them."""
    from lightning_rome.corpora import as_corpus

    return list(itertools.islice(iter(as_corpus("wikitext")), n))


@torch.no_grad()
def naive_second_moment(bm: BenchModel, texts: list[str], module_name: str) -> tuple[Any, int]:
    """``Σ k kᵀ / n`` the plain way: one text per forward pass (the whole model), a hook, and a
    float64 outer product per token. Returns C ``(d, d)`` and the token count."""
    model, tok = bm.model, bm.tokenizer
    device = next(model.parameters()).device
    seq_len = default_seq_len(model)
    d = bm.d_ff
    C = torch.zeros(d, d, dtype=torch.float64, device=device)  # (d, d)
    n = 0
    for text in texts:
        ids = tok(text, add_special_tokens=False, truncation=True, max_length=seq_len)[
            "input_ids"]
        if not ids:
            continue
        with module_hooks(model, [module_name], retain_input=True) as rec:
            model(input_ids=torch.tensor([ids], device=device), use_cache=False)
        for k in rec[module_name].input[0].double():  # (d,) per token
            C += torch.outer(k, k)  # (d, d)
            n += 1
    return C / n, n


def _fast(bm: BenchModel, texts: list[str], layer: int) -> Any:
    return get_second_moment(bm.model, bm.tokenizer, layer, corpus=texts, n_samples=len(texts),
                             cache=False, progress=False, checkpoint_every=None)


def lightning_rows(bm: BenchModel, texts: list[str], layer: int, s: Settings
                   ) -> tuple[list[list[str]], dict[str, Any]]:
    """The Lightning statistics job with 1 and 2 CPU processes: tokens/s per rank (the job's
    own ``meta["tokens_per_sec_per_rank"]``), wall time, and the largest relative difference
    between the two C."""
    import os
    import tempfile
    import time

    import lightning as L

    from lightning_rome.stats.lightning import compute_second_moments_distributed

    os.environ["OMP_NUM_THREADS"] = "1"  # the spawned ranks share the cores
    out, rows = {}, []
    for devices in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            trainer = L.Trainer(accelerator="cpu", devices=devices, logger=False,
                                strategy="ddp_spawn" if devices > 1 else "auto",
                                enable_checkpointing=False, enable_model_summary=False,
                                enable_progress_bar=False, default_root_dir=tmp)
            t0 = time.perf_counter()
            res = compute_second_moments_distributed(
                bm.model, bm.tokenizer, [layer], trainer=trainer, corpus=texts,
                n_samples=len(texts), cache=False)
            wall = time.perf_counter() - t0
        m = next(iter(res.values()))
        tps = m.meta["tokens_per_sec_per_rank"]
        out[devices] = {"tokens": m.count, "wall_s": wall, "tokens_per_sec_per_rank": tps,
                        "mom2": m.mom2}
        rows.append([f"Trainer.predict, {devices} process{'es' if devices > 1 else ''}",
                     m.count, fmt_s(wall), ", ".join(f"{v:,.0f}" for v in tps),
                     f"{sum(tps):,.0f}"])
    rel = float((out[2]["mom2"] - out[1]["mom2"]).norm() / out[1]["mom2"].norm())
    for v in out.values():
        del v["mom2"]
    return rows, {"runs": out, "rel": rel, "ok": rel < 1e-9}


def run(s: Settings, *, texts: int | None = None, naive_texts: int | None = None,
        multi_texts: int | None = None, ddp: bool = True) -> dict[str, Any]:
    """Run both comparisons and print their tables; returns the figures."""
    print(machine_line(s.device), flush=True)
    small = s.quick or s.model == "tiny"
    texts = texts or (8 if small else 64)
    naive_texts = naive_texts or (2 if small else 6)
    multi_texts = multi_texts or (4 if small else 16)
    bm = build_model(s.model, s.device, s.dtype, s.seed)
    layer = DEFAULT_LAYER.get(bm.name, 0)
    name = get_layout(bm.model).name("mlp_out", layer)
    corpus = wikitext(max(texts, naive_texts, multi_texts))
    print(f"model: {bm.description}")
    print(f"statistics of {name} (d = {bm.d_ff}); WikiText-2 valid paragraphs; float64 sums; "
          f"{s.runs} timed runs after {s.warmup} warm-up")
    results: dict[str, Any] = {}
    with section("second moment: package vs naive loop"):
        fast_t, m = time_runs(lambda: _fast(bm, corpus[:texts], layer), s)
        sub_fast = _fast(bm, corpus[:naive_texts], layer)
        (sub_t, _), (naive_t, (C_naive, n_naive)) = time_interleaved(
            [lambda: _fast(bm, corpus[:naive_texts], layer),
             lambda: naive_second_moment(bm, corpus[:naive_texts], name)], s)
        C_fast = sub_fast.mom2.to(C_naive)
        rel = float((C_fast - C_naive).norm() / C_naive.norm())
        tol = 1e-6 if s.dtype == torch.float32 else 2e-2  # batched vs one-by-one rounding
        ok = rel < tol and sub_fast.count == n_naive
    rows = [
        [f"get_second_moment, {texts} texts", m.count, fmt_s(fast_t.median),
         f"{m.count / fast_t.median:,.0f}",
         f"{(m.count / fast_t.median) / (n_naive / naive_t.median):.1f}x"],
        [f"get_second_moment, {naive_texts} texts", sub_fast.count, fmt_s(sub_t.median),
         f"{sub_fast.count / sub_t.median:,.0f}",
         f"{(sub_fast.count / sub_t.median) / (n_naive / naive_t.median):.1f}x"],
        [f"naive loop, {naive_texts} texts", n_naive, fmt_s(naive_t.median),
         f"{n_naive / naive_t.median:,.0f}", "1.0x"],
    ]
    print_table(["path", "tokens", "time (median)", "tokens/s", "vs naive"], rows,
                title="Second moment: tokens per second (cache off)")
    print(f"correctness: {'PASS' if ok else 'FAIL'}: |C_fast − C_naive|/|C_naive| = {rel:.1e} "
          f"over the same {naive_texts} texts ({n_naive} tokens both)")
    results["single"] = {"fast_tokens": m.count, "fast_s": fast_t.times,
                         "naive_tokens": n_naive, "naive_s": naive_t.times, "rel": rel, "ok": ok}

    layers = MULTI_LAYERS.get(bm.name, [0])
    with section("several layers: one pass vs one pass per layer"):
        sub = corpus[:multi_texts]
        def per_layer() -> list[Any]:
            return [_fast(bm, sub, layer) for layer in layers]

        (one_t, both), (sep_t, sep) = time_interleaved([lambda: get_second_moments(
            bm.model, bm.tokenizer, layers, corpus=sub, n_samples=len(sub), cache=False,
            progress=False, checkpoint_every=None), per_layer], s)
        rel_multi = max(float((a.mom2 - b.mom2).norm() / b.mom2.norm())
                        for a, b in zip(both.values(), sep))
    tokens = sep[0].count
    print_table(["path", "layers", "tokens", "time (median)", "tokens/s", "speed-up"], [
        ["one pass, all layers", len(layers), tokens, fmt_s(one_t.median),
         f"{tokens / one_t.median:,.0f}", f"{sep_t.median / one_t.median:.2f}x"],
        ["one pass per layer", len(layers), tokens, fmt_s(sep_t.median),
         f"{tokens / sep_t.median:,.0f}", "1.00x"],
    ], title=f"Statistics of layers {layers} over {multi_texts} texts")
    ok_multi = rel_multi < 1e-9
    print(f"correctness: {'PASS' if ok_multi else 'FAIL'}: largest relative difference between "
          f"the one-pass and per-layer C: {rel_multi:.1e}")
    results["multi"] = {"layers": layers, "one_pass_s": one_t.times, "per_layer_s": sep_t.times,
                        "rel": rel_multi, "ok": ok_multi}
    if ddp and not small:
        with section("Lightning job: 1 process vs 2 (ddp_spawn), one run each"):
            lrows, lres = lightning_rows(bm, corpus[:texts], layer, s)
        print_table(["path", "tokens", "wall (incl. start-up)", "tokens/s per rank",
                     "tokens/s, all ranks"], lrows,
                    title=f"Lightning statistics job over {texts} texts (CPU, 1 thread per rank)")
        print(f"correctness: {'PASS' if lres['ok'] else 'FAIL'}: |C_2 − C_1|/|C_1| = "
              f"{lres['rel']:.1e}")
        results["lightning"] = lres
    write_json(s.json_out, "stats", results)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    ap.add_argument("--texts", type=int, default=None,
                    help="texts for the package's throughput (default 64; 8 with --quick)")
    ap.add_argument("--naive-texts", type=int, default=None,
                    help="texts for the naive loop (default 6; 2 with --quick)")
    ap.add_argument("--multi-texts", type=int, default=None,
                    help="texts for the multi-layer comparison (default 16; 4 with --quick)")
    ap.add_argument("--no-ddp", action="store_true",
                    help="skip the Lightning job with 1 and 2 processes")
    args = ap.parse_args(argv)
    s = settings_from_args(args)
    r = run(s, texts=args.texts, naive_texts=args.naive_texts, multi_texts=args.multi_texts,
            ddp=not args.no_ddp)
    ok = r["single"]["ok"] and r["multi"]["ok"] and r.get("lightning", {}).get("ok", True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
