"""MEMIT at scale on the small fact-knowing models: the MEMIT paper's "multiple concurrent
rewrites" experiment (1, 10 and 100 ROME edits applied one after the other against 100 MEMIT edits
in one batch), and 100 MEMIT edits that keep specificity.

Both tests edit at the prompt's last token: causal tracing places the facts there on models this
small (on the default model, restoring the subject's last token recovers 0.085 of the answer's
probability at best, the last token 0.72; injecting MEMIT's optimised z at the subject's last
token flips only 0.70 of the facts). Efficacy is P(new) > P(true) on each request's prompt;
specificity is COUNTERFACT's neighbourhood score: for three facts of *other* subjects with the
request's relation, those with the request's true object first, P(their true object) > P(the
request's new object). Requests: ``fm.edit_requests(100, seed=1)``. Both editors: 25 value
steps, clamp 12, weight decay 0.01, one context group ``[[5, 2]]``, C from 2,000 KB sentences.

**Default fact model** (4 layers, width 96); ROME at layer 0, MEMIT at [0, 1], λ = 100. Measured
(2026-11-21, CPU):

=========================  ==========  ===========
setting                    efficacy    specificity
=========================  ==========  ===========
unedited                   0.00        1.00
ROME, 1 edit               1.00        1.00
ROME, 10 in sequence       0.90        0.33
ROME, 100 in sequence      0.82        0.50
MEMIT, 100 in one batch    0.99        0.55
=========================  ==========  ===========

MEMIT keeps 99% of its 100 edits where sequential ROME keeps 82%, but the last-token keys of a
neighbour prompt ("Y speaks") differ from the edited one ("X speaks") only by what attention
brings from the subject, so on this model the edits spill onto neighbours whatever λ: λ = 1000
gives 0.80 / 0.75, and MEMIT at the last layer 0.98 / 0.81 (λ = 1000) or 0.20 / 0.98 (λ = 3000).

**Deeper fact model** (:data:`~lightning_rome.testing.DEEP_FACT_MODEL`: 8 layers, width 192);
MEMIT at [6, 7], λ = 800; ROME at layer 6. Measured (2026-11-21, CPU):

=========================  ==========  ===========
setting                    efficacy    specificity
=========================  ==========  ===========
unedited                   0.00        1.00
ROME, 1 edit               1.00        1.00
ROME, 10 in sequence       0.90        0.90
ROME, 100 in sequence      0.96        0.77
MEMIT, 100 in one batch    0.93        0.947
=========================  ==========  ===========

Here MEMIT keeps specificity within 5.3 points of the unedited model while 100 sequential ROME
edits lose 23. λ sets the trade-off (layers [5, 6, 7]: λ = 850 gives 0.95 / 0.93, λ = 950
0.93 / 0.947; layers [6, 7], λ = 900: 0.88 / 0.957; the paper's clamp 0.75 with λ = 1000: 0.51 /
0.99); 6 layers of width 128 reach 0.91 / 0.90 at best, 12 layers of width 192 no better than 8.
As in the paper's scaling curves, at 100 edits sequential ROME at its best layers still keeps
most of its edits (0.96 at layer 6, 0.99 at layer 7, 0.86 at layer 5); it is specificity that it loses first.
"""

from __future__ import annotations

import pytest
import torch

from lightning_rome.editing import MEMIT, ROME
from lightning_rome.stats import get_second_moment
from lightning_rome.testing import DEEP_FACT_MODEL, get_fact_model, prefers

pytestmark = [pytest.mark.timeout(1800)]

COMMON = {"v_num_grad_steps": 25, "clamp_norm_factor": 12.0, "v_weight_decay": 0.01,
          "context_template_lengths": [[6, 2]], "context_template_starts": None,
          "mom2_n_samples": 2000, "fact_token": "last"}
MEMIT_HP = {**COMMON, "layers": [0, 1], "mom2_update_weight": 100.0, "z_batch_size": 100}
ROME_HP = {**COMMON, "layer": 0, "key_mode": "paper"}  # the mode these figures were measured in


def _second_moment_fn(fm):
    """C for each module from 2,000 of the fact model's training sentences, computed once."""
    corpus, cache = list(fm.kb.text_corpus()), {}

    def fn(model, tok, name):
        if name not in cache:
            cache[name] = get_second_moment(model, tok, name, corpus=corpus, n_samples=2000,
                                            progress=False).mom2
        return cache[name]

    return fn


@pytest.fixture(scope="module")
def fm():
    return get_fact_model()


@pytest.fixture(scope="module")
def second_moment(fm):
    return _second_moment_fn(fm)


def _fraction(wins: list[bool]) -> float:
    return sum(wins) / len(wins)


def measure(fm, reqs) -> tuple[float, float]:
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


@pytest.mark.slow
def test_memit_batch_beats_sequential_rome_on_retained_efficacy(fm, second_moment):
    reqs = fm.edit_requests(100, seed=1)
    before = {n: p.detach().clone() for n, p in fm.model.named_parameters()}
    results = {"unedited": measure(fm, reqs)}

    rome = ROME(ROME_HP, second_moment=second_moment)
    patches = []
    for i, r in enumerate(reqs, start=1):
        patches.append(rome.edit(fm.model, fm.tokenizer, [r], apply=True))
        if i in (1, 10, 100):
            results[f"ROME x{i} sequential"] = measure(fm, reqs[:i])
    for p in reversed(patches):
        p.revert(fm.model)

    memit = MEMIT(MEMIT_HP, second_moment=second_moment)
    patch = memit.edit(fm.model, fm.tokenizer, reqs, apply=True)
    results["MEMIT x100 batch"] = measure(fm, reqs)
    patch.revert(fm.model)
    for n, p in fm.model.named_parameters():
        assert torch.equal(p, before[n])

    print("\nRESULTS (efficacy, specificity):")
    for k, (e, s) in results.items():
        print(f"  {k:<22} {e:.2f} {s:.2f}")
    assert results["unedited"][0] == 0.0
    assert results["ROME x1 sequential"][0] == 1.0
    assert results["MEMIT x100 batch"][0] >= 0.9
    assert results["MEMIT x100 batch"][0] > results["ROME x100 sequential"][0]


@pytest.mark.slow
def test_memit_100_edits_keep_specificity_on_the_deeper_fact_model():
    """100 MEMIT edits in one batch: efficacy >= 0.85 and specificity within 6.5 points of the
    unedited model (measured 0.87 and 0.933 against 0.993 with per-request early stopping and
    the published group weighting; 0.93 / 0.947 before), where 100 sequential ROME edits at a
    layer of MEMIT's range lose far more specificity (0.77). Trains and caches the deeper fact
    model on first use (about 4 minutes on one core)."""
    deep = get_fact_model(DEEP_FACT_MODEL)
    assert min(deep.stats["accuracy_train"], deep.stats["accuracy_paraphrase"]) >= 0.9
    C = _second_moment_fn(deep)
    reqs = deep.edit_requests(100, seed=1)
    before = {n: p.detach().clone() for n, p in deep.model.named_parameters()}
    eff0, spec0 = measure(deep, reqs)

    patch = MEMIT({**MEMIT_HP, "layers": [6, 7], "mom2_update_weight": 800.0},
                  second_moment=C).edit(deep.model, deep.tokenizer, reqs, apply=True)
    assert set(patch.deltas) == {"transformer.h.6.mlp.c_proj.weight",
                                 "transformer.h.7.mlp.c_proj.weight"}
    eff, spec = measure(deep, reqs)
    patch.revert(deep.model)

    rome = ROME({**ROME_HP, "layer": 6}, second_moment=C)
    patches = [rome.edit(deep.model, deep.tokenizer, [r], apply=True) for r in reqs]
    rome_eff, rome_spec = measure(deep, reqs)
    for p in reversed(patches):
        p.revert(deep.model)
    for n, p in deep.model.named_parameters():
        assert torch.equal(p, before[n])

    print(f"\nunedited {eff0:.3f} {spec0:.3f}; MEMIT x100 {eff:.3f} {spec:.3f}; "
          f"ROME x100 sequential {rome_eff:.3f} {rome_spec:.3f}")
    assert eff0 == 0.0 and spec0 >= 0.95
    assert eff >= 0.85
    assert spec0 - spec <= 0.065
    assert spec > rome_spec + 0.1
