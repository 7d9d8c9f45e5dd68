"""Benchmark: COUNTERFACT evaluation throughput (cases per second), batched vs naive.

The fast path is the evaluator's per-case code,
:func:`lightning_rome.modules.evaluator.evaluate_cases`: the pre-edit scores of a whole batch of
cases in one padded forward pass, each case's post-edit scores in one more, with prompts that are
prefixes of one another sharing a row and the LM head run only at the candidate positions
(:func:`lightning_rome.scoring.candidate_scores`). Two slower paths compute the same numbers in
the same process:

* **naive**: one forward pass per prompt per target (the unbatched loop), full logits;
* **per-case batch**: one :func:`~lightning_rome.scoring.candidate_nll` call per case and phase
  (all of a case's prompts in one padded pass, full logits: the published code's batching).

Cases have COUNTERFACT's original shape: 1 rewrite prompt, 2 paraphrase prompts and 10
neighborhood prompts, each scored for o* and for the true object (26 pairs per case and phase).
They are built from the local reduced COUNTERFACT file. Two editors: none (the unedited model,
one phase) and a cheap random rank-one patch of one MLP (pre and post phases, apply and revert
per case), so that the edits themselves cost nothing and the figure is the evaluation's.
The script checks that all paths give the same probabilities before it reports speeds.

Usage::

    python -m benchmarks.bench_evaluation            # GPT-2 small (random weights), 5 runs
    python -m benchmarks.bench_evaluation --quick    # scaled-down GPT-2, fewer cases and runs
    python benchmarks/bench_evaluation.py --device cuda --cases 64
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import zlib
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from benchmarks.common import (
    PeakMemory,
    Settings,
    add_common_args,
    build_model,
    fmt_bytes,
    fmt_s,
    machine_line,
    print_table,
    section,
    settings_from_args,
    time_runs,
    write_json,
)
from lightning_rome.modules.evaluator import evaluate_cases
from lightning_rome.patches import LowRankDelta, WeightPatch
from lightning_rome.records import EditCase
from lightning_rome.requests import EditRequest
from lightning_rome.scoring import candidate_nll
from lightning_rome.tokens import continuation_ids, encode_prompt
from lightning_rome.utils.paths import data_path

# --------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------


def make_cases(n: int, n_neighbors: int = 10) -> list[EditCase]:
    """``n`` cases in COUNTERFACT's original shape from the reduced validation file: the edit
    prompt, its rephrase and a second paraphrase, and as neighbourhood prompts the locality
    prompts (with their own true answers) of ``n_neighbors`` records after the first ``n``, a
    different set for each case (overlapping sets would let the unedited model's batched
    scoring share rows across cases, which COUNTERFACT's own neighbourhoods rarely allow)."""
    raw = json.loads(data_path("counterfact/counterfact-val.json",
                               what="COUNTERFACT file").read_text())
    if n * (1 + n_neighbors) > len(raw):
        raise SystemExit(f"--cases {n} is too many for {len(raw)} records")
    cases = []
    for i in range(n):
        r = raw[i]
        template = r["prompt"].replace(r["subject"], "{}", 1)
        req = EditRequest(template, r["subject"], r["target_new"], r["ground_truth"],
                          case_id=r["case_id"])
        nbs = raw[n + i * n_neighbors:n + (i + 1) * n_neighbors]
        cases.append(EditCase(
            req,
            paraphrase_prompts=(r["rephrase_prompt"], f"In other news, {r['prompt']}"),
            neighborhood_prompts=tuple(x["locality_prompt"] for x in nbs),
            neighborhood_answers=tuple(x["locality_ground_truth"] for x in nbs)))
    return cases


class RandomRankOne:
    """A cheap editor: a seeded random rank-one patch of one MLP output weight."""

    method = "random-rank-one"

    def __init__(self, layer: int) -> None:
        self.name = f"transformer.h.{layer}.mlp.c_proj.weight"

    def edit(self, model: torch.nn.Module, tokenizer: Any, requests: Any) -> WeightPatch:
        W = model.get_parameter(self.name)  # Conv1D: (d_ff, d) = (in, out)
        g = torch.Generator().manual_seed(zlib.crc32(requests[0].subject.encode()))
        left = torch.randn(W.shape[1], 1, generator=g) * 0.5  # (d_out, 1)
        right = torch.randn(1, W.shape[0], generator=g) / W.shape[0] ** 0.5  # (1, d_in)
        return WeightPatch.from_model(
            model, {self.name: LowRankDelta(left.to(W), right.to(W))}, method=self.method,
            requests=list(requests))


def _pairs(case: EditCase) -> list[tuple[str, str]]:
    """Every (prompt, candidate) pair the evaluation scores for a case."""
    r = case.request
    out = []
    for p in (*case.rewrite_prompts, *case.paraphrase_prompts):
        out += [(p, r.target_new), (p, r.target_true)]
    for p, a in zip(case.neighborhood_prompts, case.neighborhood_answers):
        out += [(p, r.target_new), (p, a)]
    return out


# --------------------------------------------------------------------------------------------
# The three paths
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def naive_probs(model: torch.nn.Module, tok: Any, pairs: list[tuple[str, str]]) -> list[float]:
    """One forward pass per (prompt, target): full logits, log-softmax, mean NLL."""
    device = next(model.parameters()).device
    out = []
    for prompt, target in pairs:
        p, c = encode_prompt(tok, prompt), continuation_ids(tok, target)
        ids = torch.tensor([p + c[:-1]], device=device)  # (1, T)
        logp = F.log_softmax(model(input_ids=ids).logits[0].float(), -1)  # (T, V)
        nll = -logp[torch.arange(len(c), device=device) + len(p) - 1,
                    torch.tensor(c, device=device)]  # (n_c,)
        out.append(math.exp(-float(nll.mean())))
    return out


@torch.no_grad()
def per_case_probs(model: torch.nn.Module, tok: Any, pairs: list[tuple[str, str]]) -> list[float]:
    """All of a case's pairs in one padded pass (full logits)."""
    nll = candidate_nll(model, tok, [p for p, _ in pairs], [c for _, c in pairs])
    return [math.exp(-float(x.mean())) for x in nll]


def run_loop(model: torch.nn.Module, tok: Any, cases: list[EditCase], editor: Any,
             score: Any) -> list[list[float]]:
    """The unbatched evaluation loop: per case, score (pre), edit, apply, score (post),
    revert. Returns the post probabilities of every case's pairs."""
    out = []
    for case in cases:
        pairs = _pairs(case)
        pre = score(model, tok, pairs)
        if editor is None:
            out.append(pre)
            continue
        patch = editor.edit(model, tok, [case.request])
        patch.apply(model)
        try:
            out.append(score(model, tok, pairs))
        finally:
            patch.revert(model)
    return out


def run_pipeline(model: torch.nn.Module, tok: Any, cases: list[EditCase], editor: Any,
                 batch_cases: int) -> list[list[float]]:
    """The evaluator's code, ``batch_cases`` cases per call (a test batch)."""
    out = []
    for s in range(0, len(cases), batch_cases):
        for rec in evaluate_cases(model, tok, cases[s:s + batch_cases], editor):
            post = rec["post"]
            probs = []
            for kind in ("rewrite", "paraphrase", "neighborhood"):
                for a, b in zip(post[kind]["p_new"], post[kind]["p_true"]):
                    probs += [a, b]
            out.append(probs)
    return out


class WorkCounter:
    """Counts the model work of the passes run inside it: token positions through the decoder
    blocks (padding included: the work the matmuls do) and positions through the LM head, and
    converts them to FLOPs (2 per weight per position for the blocks' and the head's matrices,
    plus the attention scores and mixing, 4·T·d per position per layer; layer norms,
    activations and softmax left out)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        c = model.config
        self.d, self.n_layer, self.vocab = int(c.n_embd), int(c.n_layer), int(c.vocab_size)
        self.d_ff = int(c.n_inner or 4 * c.n_embd)
        self.block_positions = 0
        self.head_positions = 0
        self.attention_pairs = 0  # sum over passes of B·T² (query-key pairs per layer)

    def __enter__(self) -> WorkCounter:
        def on_blocks(_m: Any, args: Any, kwargs: Any) -> None:
            x = kwargs.get("input_ids", args[0] if args else None)
            if x is None:
                x = kwargs["inputs_embeds"]
            b, t = int(x.shape[0]), int(x.shape[1])  # (B, T[, d])
            past = kwargs.get("past_key_values")
            t_past = int(past.get_seq_length()) if past is not None and \
                hasattr(past, "get_seq_length") else 0
            self.block_positions += b * t
            self.attention_pairs += b * t * (t + t_past)

        def on_head(_m: Any, args: Any) -> None:
            x = args[0]  # (..., d)
            self.head_positions += x.numel() // x.shape[-1]

        base = self.model.base_model
        self._handles = [base.register_forward_pre_hook(on_blocks, with_kwargs=True),
                         self.model.get_output_embeddings().register_forward_pre_hook(on_head)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()

    @property
    def flops(self) -> float:
        per_position = 2 * (4 * self.d * self.d + 2 * self.d * self.d_ff)  # qkv, out, MLP
        return float(self.n_layer * (self.block_positions * per_position
                                     + 4 * self.attention_pairs * self.d)
                     + self.head_positions * 2 * self.d * self.vocab)


def minimal_flops(tok: Any, groups: list[list[EditCase]], model: torch.nn.Module) -> float:
    """The least work the scores need: per group of cases scored on one model (all cases for
    the unedited model, each case alone after its edit), every distinct token prefix of the
    sequences ``prompt + candidate[:-1]`` runs through the blocks once (a trie of the
    sequences, each node attending to its prefix), and the LM head runs once at each distinct
    position that predicts a candidate token (two candidates after the same prompt share it)."""
    c = WorkCounter(model)  # its sizes and FLOP formula; counted by hand here, not by hooks
    for group in groups:
        nodes: set[tuple[int, ...]] = set()
        heads: set[tuple[int, ...]] = set()
        for case in group:
            for p, target in _pairs(case):
                prompt, cont = encode_prompt(tok, p), continuation_ids(tok, target)
                seq = tuple(prompt + cont[:-1])
                nodes.update(seq[:k] for k in range(1, len(seq) + 1))
                heads.update(seq[:len(prompt) + j] for j in range(len(cont)))
        c.block_positions += len(nodes)
        c.attention_pairs += sum(len(x) for x in nodes)
        c.head_positions += len(heads)
    return c.flops


def _max_rel_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-30) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--cases", type=int, default=None,
                    help="cases per timed run (default 8; 2 with --quick)")
    ap.add_argument("--batch-cases", type=int, default=8,
                    help="cases per evaluator call, like a test batch (default 8)")
    args = ap.parse_args(argv)
    s: Settings = settings_from_args(args)
    if args.quick and args.runs == 5:
        s.runs = 1  # --quick: a smoke-sized run within the suite's 2 minutes
    n = args.cases or (2 if s.quick else 8)
    print(machine_line(s.device))
    bm = build_model(s.model, s.device, s.dtype, s.seed)
    print(f"model: {bm.description}")
    model, tok = bm.model, bm.tokenizer
    cases = make_cases(n)
    n_pairs = sum(len(_pairs(c)) for c in cases) // n
    print(f"workload: {n} cases x {n_pairs} (prompt, target) pairs per phase; "
          f"{s.runs} timed runs after {s.warmup} warm-up; median")
    editors = {"none": None, "rank-one": RandomRankOne(bm.n_layers // 2)}
    rows, payload = [], {}
    for name, editor in editors.items():
        with section(f"editor {name}"):
            results = {}
            for path, fn in (
                ("naive (1 pass / prompt / target)",
                 lambda e=editor: run_loop(model, tok, cases, e, naive_probs)),
                ("per-case batch (candidate_nll)",
                 lambda e=editor: run_loop(model, tok, cases, e, per_case_probs)),
                ("evaluator (evaluate_cases)",
                 lambda e=editor: run_pipeline(model, tok, cases, e, args.batch_cases)),
            ):
                with WorkCounter(model) as work:
                    fn()  # one untimed pass to count the work
                with PeakMemory(s.device) as mem:
                    timing, out = time_runs(fn, s)
                results[path] = (timing, out, mem.peak, work.flops / n)
                print(f"  {path}: median {fmt_s(timing.median)} ({timing.spread} s)", flush=True)
            ref = results["naive (1 pass / prompt / target)"]
            groups = [cases] + ([] if editor is None else [[c] for c in cases])
            least = minimal_flops(tok, groups, model) / n
            for path, (timing, out, peak, flops) in results.items():
                diff = _max_rel_diff(out, ref[1])
                if diff > 1e-3:
                    raise SystemExit(f"{path} disagrees with the naive loop (max relative "
                                     f"difference of P {diff:.2e})")
                speedup = ref[0].median / timing.median
                rows.append([name, path, f"{n / timing.median:.2f}", fmt_s(timing.median / n),
                             f"{speedup:.2f}x", f"{flops / 1e9:.1f}", f"{flops / least:.2f}x",
                             fmt_bytes(peak), f"{diff:.1e}"])
                payload[f"{name}/{path}"] = {
                    "cases_per_s": n / timing.median, "times": timing.times,
                    "speedup_vs_naive": speedup, "peak_bytes": peak, "max_rel_diff": diff,
                    "gflop_per_case": flops / 1e9, "minimal_gflop_per_case": least / 1e9}
    print_table(["editor", "path", "cases/s", "per case", "vs naive", "GFLOP / case",
                 "work vs minimal", "peak mem", "max rel. diff P"], rows,
                title=f"COUNTERFACT evaluation throughput, {bm.name} on {s.device} "
                      f"({s.dtype_name}), {n} cases")
    write_json(s.json_out, "bench_evaluation", {"model": bm.description, "cases": n,
                                                "pairs": n_pairs, "rows": payload})
    return payload


if __name__ == "__main__":
    main()
