"""Benchmark: layer statistics (the second moment C = E[k kᵀ] of W_out's input).

Three comparisons on WikiText-2 texts (the local copy), cache off:

1. tokens/s of :func:`lightning_rome.stats.get_second_moment` (texts sorted by length in
   windows and cut into batches of at most 4,096 padded tokens, each pass stopped before the
   hooked module, a blocked symmetric product) against

   - the *published* loop (:func:`benchmarks.published_loop.published_second_moment`, ROME's
     ``layer_stats`` re-implemented from reading it: groups of 100 texts, each sorted longest
     first and cut into sub-batches of at most ``3 x n_positions`` padded tokens with its
     collation rule, the padded batch run with ``attention_mask`` and ``position_ids`` until a
     forward hook on the module raises after the module ran, the real tokens' inputs cast to
     the precision and added with ``mom2 += aᵀ a``). It runs at ``float32`` (ROME's and MEMIT's
     ``mom2_dtype``) and at ``float64`` (``layer_stats``' own default), each against the
     package at the same precision, interleaved in one run (a b c d a b c d ...); the speed-ups
     are printed as the ratio of medians and per round;
   - a naive loop: one text at a time, a full forward pass with a hook, and a float64 outer
     product per token (on fewer texts).

   The table gives the padded tokens of each path, the FLOPs of the minimal work (the blocks up
   to the hooked module over the real tokens, and the symmetric rank-n update) and the measured
   time as a multiple of that work at this machine's measured GEMM rates. The C of all paths
   are checked to agree.
2. Several layers in one pass (:func:`get_second_moments`) against one pass per layer.
3. The Lightning job (:func:`lightning_rome.modules.stats.compute_second_moments_distributed`,
   ``Trainer.predict`` on the CPU) with 1 process and with 2 (``ddp_spawn``, one corpus shard per
   rank, one thread each): tokens/s per rank, and the check that both C agree (``--no-ddp``
   skips it; it is skipped with ``--quick``).

Usage::

    python -m benchmarks.bench_stats [--quick] [--texts 200] [--naive-texts 4] [--no-ddp]
"""

from __future__ import annotations

import argparse
import itertools
import time
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
    write_json,
)
from benchmarks.published_loop import published_second_moment
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


def _fast(bm: BenchModel, texts: list[str], layer: int, dtype: torch.dtype = torch.float64
          ) -> Any:
    return get_second_moment(bm.model, bm.tokenizer, layer, corpus=texts, n_samples=len(texts),
                             dtype=dtype, cache=False, progress=False, checkpoint_every=None)


def minimal_flops(bm: BenchModel, texts: list[str], layer: int) -> dict[str, float]:
    """FLOPs of the minimal work for the input of block ``layer``'s W_out over the real tokens
    (GPT-2 layout): the ``layer`` blocks below in full (QKV, attention output, both MLP
    matrices) and block ``layer`` up to W_out (QKV, attention output, W_in), 2 FLOPs per
    multiply-add, plus causal attention (QKᵀ and AV over the prefix) in the ``layer + 1``
    blocks; layer norms, GELU and softmax are left out. ``accumulate``: the symmetric rank-n
    update ``d_ff (d_ff + 1) n``."""
    c = bm.model.config
    d, dff = int(c.n_embd), bm.d_ff
    seq_len = default_seq_len(bm.model)
    lens = [len(bm.tokenizer(t, add_special_tokens=False, truncation=True,
                             max_length=seq_len)["input_ids"]) for t in texts]
    n = sum(lens)
    full, part = 2 * (4 * d * d + 2 * d * dff), 2 * (4 * d * d + d * dff)
    attention = (layer + 1) * sum(2 * d * L * (L + 1) for L in lens)
    return {"tokens": n, "forward": n * (layer * full + part) + attention,
            "accumulate": float(dff * (dff + 1) * n)}


def gemm_rates(device: torch.device, n: int = 1536) -> dict[torch.dtype, float]:
    """This machine's measured matrix-product rate (FLOP/s, best of 3) in float32 and float64,
    the yardstick for "times the minimal work"."""
    out = {}
    for dt in (torch.float32, torch.float64):
        a = torch.randn(n, n, dtype=dt, device=device)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            a @ a
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
        out[dt] = 2 * n ** 3 / best
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def published_rows(bm: BenchModel, texts: list[str], naive_texts: list[str], layer: int,
                   s: Settings) -> dict[str, Any]:
    """Package, published loop (float32 and float64) and naive loop, interleaved; prints the
    table and returns the figures."""
    name = get_layout(bm.model).name("mlp_out", layer)
    variants = {
        "package, float64 sums": lambda: _fast(bm, texts, layer, torch.float64),
        "published loop, float64": lambda: published_second_moment(
            bm.model, bm.tokenizer, texts, name, precision=torch.float64),
        "package, float32 sums": lambda: _fast(bm, texts, layer, torch.float32),
        "published loop, float32": lambda: published_second_moment(
            bm.model, bm.tokenizer, texts, name, precision=torch.float32),
    }
    timed = time_interleaved(list(variants.values()), s)
    res = dict(zip(variants, timed))
    (naive_t, (C_naive, n_naive)), = time_interleaved(
        [lambda: naive_second_moment(bm, naive_texts, name)], s, runs=1, warmup=0)
    sub = _fast(bm, naive_texts, layer)
    rates = gemm_rates(s.device)
    fl = minimal_flops(bm, texts, layer)
    n = fl["tokens"]
    rows, out = [], {"variants": {}, "flops": fl,
                     "gemm_rate": {str(k): v for k, v in rates.items()}}
    for label, (t, r) in res.items():
        ours = label.startswith("package")
        prec = torch.float64 if "64" in label else torch.float32
        count = r.count if ours else r["count"]
        padded = r.meta["padded_tokens"] if ours else r["padded"]
        C = r.mom2 if ours else r["C"]
        t_min = fl["forward"] / rates[torch.float32] + fl["accumulate"] / rates[prec]
        other = res[label.replace("package", "published loop").replace(" sums", "")
                    if ours else label.replace("published loop", "package") + " sums"]
        ratio = other[0].median / t.median if ours else 1.0
        rows.append([label, count, padded, fmt_s(t.median), f"{t.spread} s",
                     f"{count / t.median:,.0f}", f"{ratio:.2f}x" if ours else "1.00x",
                     f"{t.median / t_min:.2f}x"])
        out["variants"][label] = {"times": t.times, "tokens": count, "padded_tokens": padded,
                                  "x_minimal": t.median / t_min, "C": C}
    rows.append([f"naive loop ({len(naive_texts)} texts, one run)", n_naive, n_naive,
                 fmt_s(naive_t.median), "-", f"{n_naive / naive_t.median:,.1f}", "-", "-"])
    print_table(["path", "tokens", "padded tokens", "median", "min-max", "tokens/s",
                 "vs published (same precision)", "time / minimal work"], rows,
                title=f"Second moment of {name}: {len(texts)} texts, {n:,} tokens (cache off, "
                      f"{s.runs} interleaved runs after {s.warmup} warm-up)")
    pub32 = res["published loop, float32"][0]
    ratios = {}
    for label, ref in (("package, float32 sums", pub32),
                       ("package, float64 sums", res["published loop, float64"][0]),
                       ("package, float64 sums (default) vs published float32", pub32)):
        ours = res[label.split(" (default)")[0]][0]
        pairs = [b / a for a, b in zip(ours.times, ref.times)]  # one per interleaved round
        ratios[label] = {"median": ref.median / ours.median, "pairs": pairs}
        print(f"speed-up, {label}: {ref.median / ours.median:.2f}x (per round: "
              f"{', '.join(f'{x:.2f}' for x in pairs)})")
    out["ratios"] = ratios
    print(f"minimal work: forward {fl['forward'] / 1e9:,.1f} GFLOP (blocks 0-{layer} up to "
          f"W_out) + accumulation {fl['accumulate'] / 1e9:,.1f} GFLOP; measured GEMM rates "
          f"{rates[torch.float32] / 1e9:,.1f} GFLOP/s (float32), "
          f"{rates[torch.float64] / 1e9:,.1f} GFLOP/s (float64)")
    v = out["variants"]
    checks = {
        "package vs published, float64": _rel(v["package, float64 sums"]["C"],
                                              v["published loop, float64"]["C"]),
        "package vs published, float32": _rel(v["package, float32 sums"]["C"],
                                              v["published loop, float32"]["C"]),
        "package vs naive": _rel(sub.mom2, C_naive),
    }
    # float32 forward passes batched differently agree to ~1e-7; float32 sums to ~1e-6
    scale = 1.0 if s.dtype == torch.float32 else 2e4  # a bf16 model: bf16 rounding
    tols = {"package vs published, float64": 1e-6 * scale,
            "package vs published, float32": 1e-5 * scale, "package vs naive": 1e-6 * scale}
    ok = all(checks[k] < tols[k] for k in checks) and sub.count == n_naive and all(
        x["tokens"] == n for x in v.values())
    for k, r in checks.items():
        print(f"correctness: {k}: |ΔC|/|C| = {r:.1e} (tolerance {tols[k]:.0e})")
    print(f"correctness: {'PASS' if ok else 'FAIL'} (and the token counts are equal)")
    for x in v.values():
        del x["C"]
    out.update(checks=checks, ok=ok, naive={"tokens": n_naive, "s": naive_t.times})
    return out


def lightning_rows(bm: BenchModel, texts: list[str], layer: int, s: Settings
                   ) -> tuple[list[list[str]], dict[str, Any]]:
    """The Lightning statistics job with 1 and 2 CPU processes: tokens/s per rank (the job's
    own ``meta["tokens_per_sec_per_rank"]``), wall time, and the largest relative difference
    between the two C."""
    import os
    import tempfile
    import time

    import lightning as L

    from lightning_rome.modules.stats import compute_second_moments_distributed

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
    texts = texts or (8 if small else 200)
    naive_texts = naive_texts or (2 if small else 4)
    multi_texts = multi_texts or (4 if small else 16)
    bm = build_model(s.model, s.device, s.dtype, s.seed)
    layer = DEFAULT_LAYER.get(bm.name, 0)
    name = get_layout(bm.model).name("mlp_out", layer)
    corpus = wikitext(max(texts, naive_texts, multi_texts))
    print(f"model: {bm.description}")
    print(f"statistics of {name} (d = {bm.d_ff}); WikiText-2 valid paragraphs; "
          f"{s.runs} timed runs after {s.warmup} warm-up")
    results: dict[str, Any] = {}
    with section("second moment: package vs the published loop vs naive"):
        results["single"] = published_rows(bm, corpus[:texts], corpus[:naive_texts], layer, s)

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
                    help="texts for the package against the published loop (default 200; 8 "
                         "with --quick)")
    ap.add_argument("--naive-texts", type=int, default=None,
                    help="texts for the naive loop (default 4; 2 with --quick)")
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
