"""Sequential single edits of the default fact model (``benchmarks/bench_sequential.py``, b = 1):
AlphaEdit keeps far more of the facts no edit touches than MEMIT and ROME.

Measured on this code, after MEMIT's z optimisation began stopping each request on its own
(benchmarks/RESULTS.md, "Sequential editing", re-measured 2026-12-04; efficacy over all edits
so far / accuracy on the retained facts, unedited 1.000):

=========  ============  ============
method     20 edits      100 edits
=========  ============  ============
AlphaEdit  0.80 / 0.922  0.59 / 0.71
α = 1.5    0.95 / 0.68   0.81 / 0.35
MEMIT      0.90 / 0.16   0.75 / 0.09
ROME       0.90 / 0.12   0.77 / 0.08
=========  ============  ============

The issue's target (within 10 points of the unedited accuracy with efficacy >= 0.8) holds up to
20 edits only; at 100 AlphaEdit's efficacy is below the baselines' (see RESULTS.md for why: the
small model's null space).
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

N = 100


@pytest.fixture(scope="module")
def finals(tmp_path_factory):
    from benchmarks.bench_sequential import alphaedit_variant, run_one

    out = tmp_path_factory.mktemp("sequential")
    runs = {m: run_one(m, N, 1, 10, out, fluency=False) for m in ("alphaedit", "memit", "rome")}
    runs["alphaedit-a1.5"] = run_one("alphaedit", N, 1, 10, out, fluency=False,
                                     hparams=alphaedit_variant(1.5), label="alphaedit-a1.5")
    return runs


def _at(run, edits):
    (point,) = [p for p in run["points"] if p["edits"] == edits]
    return point


def test_after_20_edits_alphaedit_meets_the_target_and_the_baselines_do_not(finals):
    unedited = finals["alphaedit"]["unedited"]["retain_accuracy"]
    assert unedited > 0.95
    ae = _at(finals["alphaedit"], 20)
    assert ae["efficacy"] >= 0.8 and ae["retain_accuracy"] >= unedited - 0.10
    for m in ("memit", "rome"):
        assert _at(finals[m], 20)["retain_accuracy"] < unedited - 0.5


def test_after_100_edits_alphaedit_keeps_far_more_of_what_the_model_knew(finals):
    ae, mem, rome = (finals[m]["final"] for m in ("alphaedit", "memit", "rome"))
    assert ae["retain_accuracy"] >= 0.6
    assert ae["retain_accuracy"] > max(mem["retain_accuracy"], rome["retain_accuracy"]) + 0.4
    assert ae["neighborhood"] > max(mem["neighborhood"], rome["neighborhood"]) + 0.3
    assert ae["update_norm"] < 0.2 * min(mem["update_norm"], rome["update_norm"])
    # Its edits decay, though (the target's efficacy >= 0.8 is not reached at 100).
    assert ae["efficacy"] >= 0.55


def test_with_a_smaller_alpha_alphaedit_beats_both_on_efficacy_and_retained_facts(finals):
    """α = 1.5 instead of the preset's 3: more of the edits stay, less of what the model knew
    (0.81 / 0.35 against MEMIT's 0.75 / 0.09 and ROME's 0.77 / 0.08)."""
    ae = finals["alphaedit-a1.5"]["final"]
    for m in ("memit", "rome"):
        other = finals[m]["final"]
        assert ae["efficacy"] > other["efficacy"] + 0.03
        assert ae["retain_accuracy"] > other["retain_accuracy"] + 0.2
