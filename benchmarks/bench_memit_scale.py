"""MEMIT at scale on the small fact-knowing models: the MEMIT paper's "multiple concurrent
rewrites" experiment (1, 10 and 100 ROME edits applied one after the other against 100 MEMIT
edits in one batch) on the default fact model, and 100 MEMIT edits against 100 sequential ROME
edits on :data:`~lightning_rome.testing.DEEP_FACT_MODEL`.

Both edit at the prompt's last token (causal tracing places the facts there on models this
small). Efficacy is P(new) > P(true) on each request's prompt; specificity is COUNTERFACT's
neighbourhood score: for three facts of *other* subjects with the request's relation, those with
the request's true object first, P(their true object) > P(the request's new object). Requests:
``fm.edit_requests(100, seed=1)``. Both editors: 25 value steps, clamp 12, weight decay 0.01,
one context group ``[[6, 2]]``, C from 2,000 KB sentences. Default model: ROME at layer 0,
MEMIT at [0, 1], λ = 100; deep model: MEMIT at [6, 7], λ = 800, ROME at layer 6.

``tests/editing/test_memit_behaviour.py`` (slow) asserts on these figures; the README's
"MEMIT at scale" numbers come from ``python -m benchmarks.readme_numbers --run memit-scale``.
Usage: ``python -m benchmarks.bench_memit_scale [--deep-only | --default-only]``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch

from lightning_rome.editing import MEMIT, ROME
from lightning_rome.stats import get_second_moment
from lightning_rome.testing import DEEP_FACT_MODEL, FactModel, get_fact_model, prefers

COMMON: dict[str, Any] = {"v_num_grad_steps": 25, "clamp_norm_factor": 12.0,
                          "v_weight_decay": 0.01, "context_template_lengths": [[6, 2]],
                          "context_template_starts": None, "mom2_n_samples": 2000,
                          "fact_token": "last"}
MEMIT_HP: dict[str, Any] = {**COMMON, "layers": [0, 1], "mom2_update_weight": 100.0,
                            "z_batch_size": 100}
ROME_HP: dict[str, Any] = {**COMMON, "layer": 0, "key_mode": "paper"}
DEEP_MEMIT_HP: dict[str, Any] = {**MEMIT_HP, "layers": [6, 7], "mom2_update_weight": 800.0}
DEEP_ROME_HP: dict[str, Any] = {**ROME_HP, "layer": 6}

SecondMoment = Callable[[torch.nn.Module, Any, str], torch.Tensor]


def second_moment_fn(fm: FactModel) -> SecondMoment:
    """C for each module from 2,000 of the fact model's training sentences, computed once."""
    corpus, cache = list(fm.kb.text_corpus()), {}

    def fn(model: torch.nn.Module, tok: Any, name: str) -> torch.Tensor:
        if name not in cache:
            cache[name] = get_second_moment(model, tok, name, corpus=corpus, n_samples=2000,
                                            progress=False).mom2
        return cache[name]

    return fn


def _fraction(wins: list[bool]) -> float:
    return sum(wins) / len(wins)


def measure(fm: FactModel, reqs: list[Any]) -> tuple[float, float]:
    """(efficacy, specificity) over ``reqs`` on the model as it is now."""
    model, tok, kb = fm.model, fm.tokenizer, fm.kb
    eff = _fraction(prefers(model, tok, [r.text for r in reqs], [r.target_new for r in reqs],
                            [r.target_true for r in reqs]))
    prompts, true, new = [], [], []
    for r in reqs:
        for f in kb.neighbor_facts(r, 3):
            prompts.append(f.prompts("train")[0].replace("{}", f.subject))
            true.append(f.object)
            new.append(r.target_new)
    return eff, _fraction(prefers(model, tok, prompts, true, new))


def _unchanged(fm: FactModel, before: dict[str, torch.Tensor]) -> None:
    for n, p in fm.model.named_parameters():
        if not torch.equal(p, before[n]):
            raise RuntimeError(f"parameter {n} was not restored exactly")


def concurrent_rewrites(fm: FactModel, second_moment: SecondMoment, n: int = 100
                        ) -> dict[str, tuple[float, float]]:
    """(efficacy, specificity) unedited, after 1, 10 and ``n`` sequential ROME edits, and
    after one MEMIT batch of ``n`` edits; the model is restored bit for bit."""
    reqs = fm.edit_requests(n, seed=1)
    before = {k: p.detach().clone() for k, p in fm.model.named_parameters()}
    results = {"unedited": measure(fm, reqs)}
    rome = ROME(ROME_HP, second_moment=second_moment)
    patches = []
    try:
        for i, r in enumerate(reqs, start=1):
            patches.append(rome.edit(fm.model, fm.tokenizer, [r], apply=True))
            if i in (1, 10, n):
                results[f"ROME x{i} sequential"] = measure(fm, reqs[:i])
    finally:
        for p in reversed(patches):
            p.revert(fm.model)
    patch = MEMIT(MEMIT_HP, second_moment=second_moment).edit(fm.model, fm.tokenizer, reqs,
                                                              apply=True)
    try:
        results[f"MEMIT x{n} batch"] = measure(fm, reqs)
    finally:
        patch.revert(fm.model)
    _unchanged(fm, before)
    return results


def deep_memit(deep: FactModel, second_moment: SecondMoment, n: int = 100
               ) -> dict[str, Any]:
    """On the deeper model: (efficacy, specificity) unedited, after one MEMIT batch of ``n``
    edits at layers 6-7, and after ``n`` sequential ROME edits at layer 6; restored bit for
    bit. Also the names of the parameters MEMIT's patch changes."""
    reqs = deep.edit_requests(n, seed=1)
    before = {k: p.detach().clone() for k, p in deep.model.named_parameters()}
    out: dict[str, Any] = {"unedited": measure(deep, reqs)}
    patch = MEMIT(DEEP_MEMIT_HP, second_moment=second_moment).edit(
        deep.model, deep.tokenizer, reqs, apply=True)
    try:
        out["memit"] = measure(deep, reqs)
        out["memit_params"] = sorted(patch.deltas)
    finally:
        patch.revert(deep.model)
    rome = ROME(DEEP_ROME_HP, second_moment=second_moment)
    patches = []
    try:
        for r in reqs:
            patches.append(rome.edit(deep.model, deep.tokenizer, [r], apply=True))
        out["rome_sequential"] = measure(deep, reqs)
    finally:
        for p in reversed(patches):
            p.revert(deep.model)
    _unchanged(deep, before)
    return out


def run(default: bool = True, deep: bool = True) -> dict[str, Any]:
    """Both experiments (one thread); the figures as a JSON-ready dict."""
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    if default:
        fm = get_fact_model()
        out["default"] = concurrent_rewrites(fm, second_moment_fn(fm))
    if deep:
        dm = get_fact_model(DEEP_FACT_MODEL)
        out["deep"] = deep_memit(dm, second_moment_fn(dm))
        out["deep_model"] = {"accuracy_train": dm.stats["accuracy_train"],
                             "accuracy_paraphrase": dm.stats["accuracy_paraphrase"]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--deep-only", action="store_true")
    g.add_argument("--default-only", action="store_true")
    args = ap.parse_args(argv)
    print(json.dumps(run(default=not args.deep_only, deep=not args.default_only), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
