"""Benchmark: ROME's quality as the number of samples behind its second moment C falls.

On the small fact-knowing model (``lightning_rome.testing.get_fact_model()``, ROME preset
``"fact-model"``), C is estimated from N texts of the model's own training corpus
(``kb.text_corpus()``, 2,400 sentences, a seeded random subset for each N so that a small N
still spans many subjects), for N falling from 2,000 (the preset) to 20. For each N the same
edit requests (``fm.edit_requests(n, seed=0)``) are made one at a time and scored as in
``tests/editing/test_rome_behaviour.py``:

* efficacy: the new object beats the true one after the edit prompt;
* paraphrase: the same on the fact's two held-out templates;
* specificity: the share of neighbouring facts (other subjects, same relation) whose predicted
  object among the relation's objects is unchanged.

Two reference rows bracket the table: C from the whole corpus, and no C at all (identity,
``mom2_adjustment=False``). Where C is singular (fewer tokens than its dimension), the plain
estimate cannot be used; the shrunk estimate ``(1 − α) C + α (tr C / d) I`` (``--shrink``,
default 0.1; several values give a row each) is measured for every N too, so that the two can be
compared where both exist.

It measures quality, not time: of the common options only ``--quick``, ``--device``,
``--seed``, ``--threads`` and ``--json`` apply (always the fact model, in float32).

Usage::

    python -m benchmarks.bench_samples [--quick] [--samples 2000 500 100] [--requests 10]
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

import torch

from benchmarks.common import (
    Settings,
    add_common_args,
    fact_model_or_none,
    fmt_s,
    machine_line,
    print_table,
    section,
    settings_from_args,
    write_json,
)
from lightning_rome.editing.rome import ROME, ROMEHyperParams
from lightning_rome.models import get_layout
from lightning_rome.models.weights import weight_param_name
from lightning_rome.stats import get_second_moment
from lightning_rome.testing import predicted_objects, prefers

FULL_SAMPLES = [2000, 1000, 500, 200, 100, 50, 20]
QUICK_SAMPLES = [500, 20]


def score(fm: Any, requests: list[Any], patches: list[Any], neighbours: dict[int, list[Any]],
          before: dict[int, list[str]]) -> tuple[float, float, float]:
    """Efficacy, paraphrase and specificity, each edit applied on its own."""
    m, tok, kb = fm.model, fm.tokenizer, fm.kb
    eff, para, spec = [], [], []
    for i, (r, p) in enumerate(zip(requests, patches)):
        paraphrases = [t.replace("{}", r.subject) for t in kb.fact_of(r).prompts("paraphrase")]
        p.apply(m)
        try:
            eff += prefers(m, tok, [r.text], r.target_new, r.target_true)
            para += prefers(m, tok, paraphrases, r.target_new, r.target_true)
            after = predicted_objects(m, tok, neighbours[i])
        finally:
            p.revert(m)
        spec += [float(a == b) for a, b in zip(before[i], after)]
    return sum(eff) / len(eff), sum(para) / len(para), sum(spec) / len(spec)


def shrink(C: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 − α) C + α (tr C / d) I``: positive definite for any α > 0 and C ≠ 0."""
    d = C.shape[0]
    return (1 - alpha) * C + alpha * (torch.trace(C) / d) * torch.eye(d, dtype=C.dtype)


def run(s: Settings, *, samples: list[int] | None = None, n_requests: int | None = None,
        n_neighbours: int = 5, steps: int | None = None,
        alphas: tuple[float, ...] = (0.1,), plain: bool = True) -> dict[str, Any]:
    """Run the study and print its table; returns the figures (or ``{"skipped": reason}``)."""
    print(machine_line(s.device), flush=True)
    fm, note = fact_model_or_none()
    if fm is None:
        print(f"note: {note}")
        return {"skipped": note}
    samples = samples or (QUICK_SAMPLES if s.quick else FULL_SAMPLES)
    n_requests = n_requests or (1 if s.quick else 10)
    model, tok, kb = fm.model.to(s.device).eval(), fm.tokenizer, fm.kb
    hp = ROMEHyperParams.resolve("fact-model")
    if steps is not None:
        hp = ROMEHyperParams(**{**hp.to_dict(), "v_num_grad_steps": steps})
    name = get_layout(model).name("mlp_out", hp.layer)
    corpus = list(kb.text_corpus())
    requests = fm.edit_requests(n_requests, seed=0)
    print(f"model: fact model, {model.config.n_layer} layers, d={model.config.n_embd}, "
          f"d_ff={model.config.n_inner or 4 * model.config.n_embd}; ROME preset fact-model "
          f"(layer {hp.layer}, {hp.v_num_grad_steps} steps); {n_requests} requests "
          f"(edit_requests(seed=0)), {n_neighbours} neighbours each; C from a seeded random "
          f"subset of the {len(corpus)} training sentences; shrinkage α in {list(alphas)}")
    neighbours = {i: kb.neighbor_facts(r, n_neighbours) for i, r in enumerate(requests)}
    before = {i: predicted_objects(model, tok, f) for i, f in neighbours.items()}

    def collect(n: int) -> tuple[torch.Tensor, int, float]:
        texts = random.Random(s.seed + n).sample(corpus, min(n, len(corpus)))
        t0 = time.perf_counter()
        m = get_second_moment(model, tok, name, corpus=texts, n_samples=len(texts),
                              cache=False, progress=False, checkpoint_every=None)
        return m.mom2.double(), m.count, time.perf_counter() - t0

    C_ref, ref_tokens, _ = collect(len(corpus))
    d = C_ref.shape[0]
    # The reference update direction per request: C_ref⁻¹ k*, compared with each N's below.
    ref_patches: list[Any] = []

    def edit_all(C: torch.Tensor | None) -> tuple[list[Any] | None, str, float]:
        hp_n = hp if C is not None else ROMEHyperParams(**{**hp.to_dict(),
                                                           "mom2_adjustment": False})
        rome = ROME(hp_n, second_moment=(lambda m_, t_, n_: C) if C is not None else None)
        t0 = time.perf_counter()
        try:
            patches = [rome.edit(model, tok, [r]) for r in requests]
        except FloatingPointError as e:
            return None, str(e).split(";")[0], time.perf_counter() - t0
        return patches, "", (time.perf_counter() - t0) / len(requests)

    def dW_rel(patches: list[Any]) -> float:
        """Mean ‖ΔW_N − ΔW_ref‖ / ‖ΔW_ref‖ over the requests."""
        w = weight_param_name(name)
        rels = []
        for p, q in zip(patches, ref_patches):
            a, b = p.dense(w).detach().double(), q.dense(w).detach().double()
            rels.append(float((a - b).norm() / b.norm()))
        return sum(rels) / len(rels)

    rows, results = [], {"d": d, "ref_tokens": ref_tokens, "rows": []}

    def add(label: str, n: int | str, tokens: int | str, variant: str, C: torch.Tensor | None,
            t_stats: float | None) -> None:
        c_err = "-" if C is None else f"{float((C - C_ref).norm() / C_ref.norm()):.2f}"
        cond = "-"
        if C is not None:
            ev = torch.linalg.eigvalsh(C)  # (d,) ascending
            cond = "singular" if ev[0] <= ev[-1] * 1e-12 else f"{float(ev[-1] / ev[0]):.1e}"
        patches, err, per_edit = edit_all(C)
        if patches is None:
            row = [label, n, tokens, variant, cond, c_err, "C not PD", "-", "-", "-",
                   fmt_s(t_stats)]
            results["rows"].append({"label": label, "n": n, "variant": variant, "error": err})
        else:
            if not ref_patches and label == "all":
                ref_patches.extend(patches)
            eff, para, spec = score(fm, requests, patches, neighbours, before)
            rel = dW_rel(patches) if ref_patches else float("nan")
            row = [label, n, tokens, variant, cond, c_err, f"{eff:.2f}", f"{para:.2f}",
                   f"{spec:.2f}", f"{rel:.2f}", fmt_s(t_stats)]
            results["rows"].append({"label": label, "n": n, "tokens": tokens,
                                    "variant": variant, "efficacy": eff, "paraphrase": para,
                                    "specificity": spec, "dW_rel": rel, "stats_s": t_stats,
                                    "edit_s": per_edit})
        rows.append(row)
        print(" | ".join(str(c) for c in row), flush=True)

    with section("ROME quality against the samples behind C"):
        add("all", len(corpus), ref_tokens, "plain", C_ref, None)
        for n in samples:
            C, tokens, t_stats = collect(n)
            if plain:
                add(f"N = {n}", n, tokens, "plain", C, t_stats)
            for alpha in alphas:
                add(f"N = {n}", n, tokens, f"shrunk α={alpha:g}", shrink(C, alpha), t_stats)
        add("no C (identity)", 0, 0, "mom2_adjustment=False", None, None)
    print_table(["C from", "texts", "tokens", "estimate", "cond(C)", "‖C−C_all‖/‖C_all‖",
                 "efficacy", "paraphrase", "specificity", "‖ΔW−ΔW_all‖/‖ΔW_all‖",
                 "stats time"], rows,
                title=f"ROME on the fact model against the samples behind C (d = {d})")
    write_json(s.json_out, "samples", results)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    ap.add_argument("--samples", type=int, nargs="+", default=None,
                    help=f"sample counts (default {FULL_SAMPLES}; --quick: {QUICK_SAMPLES})")
    ap.add_argument("--requests", type=int, default=None,
                    help="edit requests per sample count (default 10; 1 with --quick)")
    ap.add_argument("--neighbours", type=int, default=5, help="neighbour facts per request")
    ap.add_argument("--steps", type=int, default=None,
                    help="v* steps (default: the preset's 60)")
    ap.add_argument("--shrink", type=float, nargs="+", default=[0.1],
                    help="α of the shrunk estimate (1 − α) C + α (tr C / d) I (default 0.1; "
                         "several give a row each)")
    ap.add_argument("--no-plain", action="store_true",
                    help="only the shrunk estimates (and the two reference rows)")
    args = ap.parse_args(argv)
    s = settings_from_args(args)
    run(s, samples=args.samples, n_requests=args.requests, n_neighbours=args.neighbours,
        steps=args.steps, alphas=tuple(args.shrink), plain=not args.no_plain)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
