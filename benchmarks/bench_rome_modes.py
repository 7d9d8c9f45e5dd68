"""ROME's key modes (``reference``, ``r-rome``, ``paper``) on every fact-knowing model of the project.

Usage::

    python -m benchmarks.bench_rome_modes                    # all models, 100 + 100 edits
    python -m benchmarks.bench_rome_modes --quick            # the fact model, 3 + 3 edits
    python -m benchmarks.bench_rome_modes --models fact counterfact --single 150 --json out.json

Models (all built once and cached by :mod:`lightning_rome.testing`):

* ``fact``: ``get_fact_model()`` (4 layers × 96), ROME preset ``fact-model``;
* ``deep``: ``get_fact_model(DEEP_FACT_MODEL)`` (8 layers × 192), preset ``fact-model``;
* ``counterfact``: the demo's COUNTERFACT model (``get_counterfact_model()`` with the default
  :class:`~lightning_rome.testing.CounterFactModelConfig`, as ``lightning_rome/demo.py``), preset
  ``demo-model``.

C is the second moment over 2,000 texts: the fact model's own knowledge-base corpus for the fact
models (as the behaviour tests), wikitext-2 for the COUNTERFACT model (as the demo).

**Single edits** (``--single`` cases, each edit applied alone to the unedited model, then
reverted): one key and one value optimisation per case give the three modes' patches
(:meth:`~lightning_rome.editing.rome.ROME.edit_modes`; the modes differ only in the right
vector). ES / PS / NS are COUNTERFACT's ``P(o*) > P(o^c)`` on the edit prompt, the paraphrases
and (reversed: the neighbour keeps its own answer) the neighbourhood prompts, averaged per case
then over cases; Score is their harmonic mean.

**Sequential edits** (``--sequential`` cases, edited one after another on one model, per mode):
retention is the ES of all of them after the last edit; unedited accuracy is the top-1 accuracy
(every target token the argmax) of the true object on the edit prompts of known cases that were
not edited (``--pool`` of them), before and after.

Nothing is asserted; ``benchmarks/RESULTS.md`` records a run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("LIGHTNING_ROME_DATA", str(REPO.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lightning_rome.data import EditCase  # noqa: E402
from lightning_rome.editing.rome import KEY_MODES, ROME, ROMEHyperParams  # noqa: E402
from lightning_rome.modules.evaluator import score_cases  # noqa: E402

__all__ = ["MODEL_NAMES", "Bench", "load_bench", "main", "run_modes"]

MODEL_NAMES = ("fact", "deep", "counterfact")


@dataclass
class Bench:
    """A model, its tokenizer, its ROME preset, C, and known cases to edit."""

    name: str
    model: nn.Module
    tokenizer: Any
    preset: str
    second_moment: Callable[[nn.Module, Any, str], torch.Tensor]
    cases: list[EditCase]  # known facts, as COUNTERFACT cases, in a fixed order


def _memo_C(fn: Callable[[nn.Module, Any, str], torch.Tensor]) -> Callable[..., torch.Tensor]:
    cache: dict[str, torch.Tensor] = {}

    def second_moment(model: nn.Module, tok: Any, name: str) -> torch.Tensor:
        if name not in cache:
            cache[name] = fn(model, tok, name)
        return cache[name]
    return second_moment


def _fact_bench(name: str, n: int) -> Bench:
    from lightning_rome.stats import get_second_moment
    from lightning_rome.testing import DEEP_FACT_MODEL, get_fact_model
    from lightning_rome.tokens import fill

    fm = get_fact_model(DEEP_FACT_MODEL) if name == "deep" else get_fact_model()
    kb = fm.kb
    corpus = list(kb.text_corpus())
    n = min(n, len(fm.known_facts))
    cases = []
    for r in fm.edit_requests(n, seed=0):
        fact = kb.fact_of(r)
        neigh = kb.neighbor_facts(r, 5)
        cases.append(EditCase(
            r, paraphrase_prompts=tuple(fill(t, fact.subject)[0]
                                        for t in fact.paraphrase_prompts),
            neighborhood_prompts=tuple(fill(f.train_prompts[0], f.subject)[0] for f in neigh),
            neighborhood_answers=tuple(f.object for f in neigh)))
    C = _memo_C(lambda m, t, mod: get_second_moment(m, t, mod, corpus=corpus, n_samples=2000,
                                                    cache=False, progress=False).mom2)
    return Bench(name, fm.model, fm.tokenizer, "fact-model", C, cases)


def _counterfact_bench() -> Bench:
    from lightning_rome.corpora import as_corpus
    from lightning_rome.demo import MOM2_SAMPLES
    from lightning_rome.stats import get_second_moment
    from lightning_rome.testing import CounterFactModelConfig, get_counterfact_model

    cm = get_counterfact_model(CounterFactModelConfig())
    corpus = as_corpus("wikitext-2")
    C = _memo_C(lambda m, t, mod: get_second_moment(m, t, mod, corpus=corpus,
                                                    n_samples=MOM2_SAMPLES,
                                                    progress=False).mom2)
    return Bench("counterfact", cm.model, cm.tokenizer, "demo-model", C, list(cm.known_cases))


def load_bench(name: str, n_cases: int) -> Bench:
    """One of :data:`MODEL_NAMES` with up to ``n_cases`` known cases."""
    if name in ("fact", "deep"):
        return _fact_bench(name, n_cases)
    if name == "counterfact":
        return _counterfact_bench()
    raise ValueError(f"unknown model {name!r}; choose from {list(MODEL_NAMES)}")


def _rates(model: nn.Module, tok: Any, cases: Sequence[EditCase]) -> dict[str, list[float]]:
    """Per case: ES, PS, NS (fractions of its prompts) and whether the rewrite prompt's true
    object is the top-1 answer."""
    out: dict[str, list[float]] = {"ES": [], "PS": [], "NS": [], "top1_true": []}
    for s in score_cases(model, tok, cases):
        for key, kind, new_wins in (("ES", "rewrite", True), ("PS", "paraphrase", True),
                                    ("NS", "neighborhood", False)):
            if kind not in s:
                continue
            wins = [(a < b) == new_wins for a, b in zip(s[kind]["nll_new"], s[kind]["nll_true"])]
            out[key].append(sum(wins) / len(wins))
        out["top1_true"].append(float(all(all(c) for c in s["rewrite"]["correct_true"])))
    return out


def _hmean(xs: Sequence[float]) -> float:
    return 0.0 if min(xs) <= 0 else len(xs) / sum(1.0 / x for x in xs)


def _summary(rates: dict[str, list[float]]) -> dict[str, float]:
    es, ps, ns = (statistics.fmean(rates[k]) for k in ("ES", "PS", "NS"))
    return {"ES": es, "PS": ps, "NS": ns, "Score": _hmean([es, ps, ns])}


def run_modes(bench: Bench, n_single: int, n_sequential: int, n_pool: int,
              modes: Sequence[str] = KEY_MODES, log: Callable[[str], None] = print,
              ) -> dict[str, Any]:
    """Single and sequential edits of ``bench`` under each mode; returns the figures."""
    model, tok = bench.model, bench.tokenizer
    single_cases = bench.cases[:n_single]
    seq_cases = bench.cases[:n_sequential]
    pool = bench.cases[max(n_single, n_sequential):][:n_pool]
    out: dict[str, Any] = {"model": bench.name, "preset": bench.preset,
                           "n_single": len(single_cases), "n_sequential": len(seq_cases),
                           "n_pool": len(pool), "single": {}, "sequential": {}}
    out["unedited"] = _summary(_rates(model, tok, single_cases or seq_cases))

    # Single edits: one key and one value per case, three right vectors.
    rome = ROME(bench.preset, second_moment=bench.second_moment)
    rates = {m: {"ES": [], "PS": [], "NS": [], "top1_true": []} for m in modes}
    t0 = time.perf_counter()
    for i, case in enumerate(single_cases):
        patches = rome.edit_modes(model, tok, case.request, modes)
        for m in modes:
            patches[m].apply(model)
            try:
                r = _rates(model, tok, [case])
            finally:
                patches[m].revert(model)
            for k in rates[m]:
                rates[m][k] += r[k]
        if (i + 1) % 25 == 0:
            log(f"  {bench.name}: {i + 1}/{len(single_cases)} single edits "
                f"({time.perf_counter() - t0:.0f} s)")
    out["single_seconds"] = time.perf_counter() - t0
    for m in modes if single_cases else ():
        out["single"][m] = _summary(rates[m])

    # Sequential edits: one model per mode, edited one request after another.
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pool_before = _rates(model, tok, pool)["top1_true"] if pool else []
    out["pool_accuracy_before"] = statistics.fmean(pool_before) if pool_before else None
    for m in modes if seq_cases else ():
        t0 = time.perf_counter()
        seq_model = copy.deepcopy(model)
        editor = ROME(ROMEHyperParams.from_preset(bench.preset, key_mode=m),
                      second_moment=bench.second_moment)
        norms = []
        for case in seq_cases:
            p = editor.edit(seq_model, tok, [case.request], apply=True)
            norms.append(sum(p.norms().values()))
        r = _rates(seq_model, tok, seq_cases)
        acc = statistics.fmean(_rates(seq_model, tok, pool)["top1_true"]) if pool else None
        out["sequential"][m] = {"retention": statistics.fmean(r["ES"]),
                                "unedited_accuracy": acc,
                                "update_norm_median": statistics.median(norms),
                                "update_norm_max": max(norms),
                                "seconds": time.perf_counter() - t0}
        log(f"  {bench.name}: {len(seq_cases)} sequential edits, {m}: "
            f"{out['sequential'][m]} ")
        del seq_model
    for k, v in model.state_dict().items():  # the single edits were reverted exactly
        if not torch.equal(v, before[k]):
            raise RuntimeError(f"{bench.name}: parameter {k} changed during the benchmark")
    return out


def table(results: Sequence[dict[str, Any]]) -> str:
    """A markdown table of :func:`run_modes` results."""
    lines = ["| model | mode | ES | PS | NS | Score | seq. retention | seq. unedited acc. |",
             "|---|---|---|---|---|---|---|---|"]
    for res in results:
        n1, n2 = res["n_single"], res["n_sequential"]
        before = res.get("pool_accuracy_before")
        u = res["unedited"]
        lines.append(f"| {res['model']} ({n1} single / {n2} seq.) | unedited | {u['ES']:.3f} | "
                     f"{u['PS']:.3f} | {u['NS']:.3f} | - | - | "
                     f"{'-' if before is None else f'{before:.3f}'} |")
        for m in dict.fromkeys([*res["single"], *res["sequential"]]):
            s, q = res["single"].get(m), res["sequential"].get(m, {})
            acc, ret = q.get("unedited_accuracy"), q.get("retention")
            one = (f"{s['ES']:.3f} | {s['PS']:.3f} | {s['NS']:.3f} | **{s['Score']:.3f}**"
                   if s else "- | - | - | -")
            lines.append(f"| | {m} | {one} | {'-' if ret is None else f'{ret:.3f}'} | "
                         f"{'-' if acc is None else f'{acc:.3f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_rome_modes",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    ap.add_argument("--single", type=int, default=100, help="single edits per model")
    ap.add_argument("--sequential", type=int, default=100, help="sequential edits per mode")
    ap.add_argument("--pool", type=int, default=100, help="unedited known cases to check")
    ap.add_argument("--modes", nargs="+", choices=KEY_MODES, default=list(KEY_MODES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="the fact model, 3 + 3 edits")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--table", type=Path, nargs="+", default=None, metavar="JSON",
                    help="print the table of earlier --json results and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table([r for p in args.table for r in json.loads(p.read_text())]))
        return 0
    if args.quick:
        args.models, args.single, args.sequential, args.pool = ["fact"], 3, 3, 10
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    for name in args.models:
        t0 = time.perf_counter()
        bench = load_bench(name, max(args.single, args.sequential) + args.pool)
        res = run_modes(bench, args.single, args.sequential, args.pool, args.modes)
        res["seconds"] = time.perf_counter() - t0
        results.append(res)
        print(table([res]), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    print(f"\nROME key modes (torch {torch.__version__}, {args.threads} thread(s))")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
