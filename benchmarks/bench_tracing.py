"""Benchmark: a full causal trace (hidden + MLP + attention) of one prompt on a GPT-2-small-sized
model with random weights, naive cell-by-cell against the batched engines.

The naive path is the reference approach: one forward pass of 1 clean + S noised rows per
(token, layer) cell and kind. ``prefix`` (the default engine for GPT-2, GPT-J, GPT-NeoX and
Llama) starts each restoration from the corrupted run's cached activations below the restored
layer and recomputes only the tokens from the restored one on; ``batched`` is the generic fallback (other
families, or a transformers version whose internals fail the prefix engine's probe) that
batches many cells into full forward passes. All engines use the same noise draws; the script
checks that their grids agree.

Usage::

    python benchmarks/bench_tracing.py            # median of 5 timed runs per engine
    python benchmarks/bench_tracing.py --quick    # 2 layers, 3 samples, naive vs prefix, 1 run
    python benchmarks/bench_tracing.py --threads 1 --engines naive prefix

It prints a Markdown table (median, min and max wall time per engine, the speed-up over the
naive path, and the largest difference between the engines' grids) and exits non-zero if the
engines disagree by more than 1e-5.

Needs the GPT-2 tokenizer files and ``gpt2-small-config.json`` from the shared data folder
(``$LIGHTNING_ROME_DATA``, default ``../shared/data``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("LIGHTNING_ROME_DATA", str(REPO.parent / "shared" / "data"))

from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from lightning_rome.models import load_tokenizer  # noqa: E402
from lightning_rome.tracing import GaussianNoise, trace_all  # noqa: E402
from lightning_rome.utils.paths import data_path  # noqa: E402

PROMPT = "The {} is located in the city of"
SUBJECT = "Space Needle"
KINDS = ("hidden", "mlp", "attn")


def build(seed: int, n_layer: int | None = None) -> tuple[GPT2LMHeadModel, object]:
    config = GPT2Config.from_json_file(str(data_path("gpt2-tokenizer/gpt2-small-config.json")))
    if n_layer:
        config.n_layer = n_layer
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    return model, load_tokenizer(data_path("gpt2-tokenizer"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="2 layers, 3 samples, window 2, naive and prefix engines only, one "
                         "timed run (a fraction of the 2-minute quick suite)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per engine (default 5)")
    ap.add_argument("--samples", type=int, default=None, help="noise samples (default 10)")
    ap.add_argument("--window", type=int, default=None, help="MLP/attn window (default 10)")
    ap.add_argument("--layers", type=int, default=None,
                    help="override the config's 12 layers (default: 12)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--engines", nargs="+", default=None,
                    help="default naive prefix batched (--quick: naive prefix)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    runs = 1 if args.quick else args.runs
    samples = args.samples or (3 if args.quick else 10)
    window = args.window or (2 if args.quick else 10)
    if args.engines is None:
        args.engines = ["naive", "prefix"] if args.quick else ["naive", "prefix", "batched"]
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = build(args.seed, args.layers or (2 if args.quick else None))
    noise = GaussianNoise.from_subjects(model, tok, [SUBJECT, "Vinson Massif", "Beats Music"])
    kw = dict(window=window, samples=samples, noise=noise, seed=args.seed)
    n_tokens = len(tok(PROMPT.format(SUBJECT))["input_ids"])
    n_layers = model.config.n_layer
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: GPT-2 small config with {n_layers} layers, random weights ({n_params:.0f}M "
          "parameters), float32")
    print(f"prompt: {PROMPT.format(SUBJECT)!r} ({n_tokens} tokens), subject {SUBJECT!r}")
    print(f"trace: {'+'.join(KINDS)}, {n_tokens} x {n_layers} cells each, samples={samples}, "
          f"window={window}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; {runs} timed run(s) "
          "per engine, interleaved, after a warm-up")

    # Warm-up: every engine once on a short prompt (allocator, kernels, lazy imports).
    for eng in args.engines:
        trace_all(model, tok, "{} is in", SUBJECT, ("hidden", "mlp"), engine=eng, **kw)

    # The engines take turns, so that a change in the machine's load hits them alike.
    times: dict[str, list[float]] = {eng: [] for eng in args.engines}
    grids: dict[str, dict] = {}
    for r in range(runs):
        for eng in args.engines:
            t0 = time.perf_counter()
            grids[eng] = trace_all(model, tok, PROMPT, SUBJECT, KINDS, engine=eng, **kw)
            times[eng].append(time.perf_counter() - t0)
            print(f"  run {r + 1}, {eng}: {times[eng][-1]:.2f} s", flush=True)

    ref = "naive" if "naive" in times else args.engines[0]
    base = statistics.median(times[ref])
    print()
    print(f"| engine | median s | min s | max s | speed-up vs {ref} | max abs diff vs {ref} |")
    print("|---|---:|---:|---:|---:|---:|")
    worst = 0.0
    for eng, ts in times.items():
        diff = max(float((grids[eng][k].scores - grids[ref][k].scores).abs().max())
                   for k in grids[ref])
        worst = max(worst, diff)
        print(f"| {eng} | {statistics.median(ts):.2f} | {min(ts):.2f} | {max(ts):.2f} | "
              f"{base / statistics.median(ts):.1f}x | {diff:.1e} |")
    ok = worst <= 1e-5
    print(f"\ncorrectness: {'ok' if ok else 'FAIL'} (engines agree to {worst:.1e})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
