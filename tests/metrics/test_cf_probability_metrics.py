"""ES, EM, PS, PM, NS, NM against an independent numpy computation of the papers' definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_rome.metrics import (
    CaseMean,
    EfficacyMagnitude,
    EfficacyScore,
    NeighborhoodMagnitude,
    NeighborhoodScore,
    ParaphraseMagnitude,
    ParaphraseScore,
)
from lightning_rome.metrics.functional import (
    efficacy_magnitude,
    efficacy_score,
    mean_ci,
    neighborhood_magnitude,
    neighborhood_score,
    paraphrase_magnitude,
    paraphrase_score,
)

# (class, functional, input kind, prefer_new, magnitude)
METRICS = [
    (EfficacyScore, efficacy_score, "rewrite", True, False),
    (EfficacyMagnitude, efficacy_magnitude, "rewrite", True, True),
    (ParaphraseScore, paraphrase_score, "paraphrase", True, False),
    (ParaphraseMagnitude, paraphrase_magnitude, "paraphrase", True, True),
    (NeighborhoodScore, neighborhood_score, "neighborhood", False, False),
    (NeighborhoodMagnitude, neighborhood_magnitude, "neighborhood", False, True),
]
IDS = [m[0].__name__ for m in METRICS]


def reference_per_case(new_nll, true_nll, prefer_new, magnitude):
    """The definition, written out with numpy: per case over its prompts, as summarize.py."""
    out = []
    for n, t in zip(new_nll, true_nll):
        p_new, p_true = np.exp(-np.asarray(n, float)), np.exp(-np.asarray(t, float))
        good, bad = (p_new, p_true) if prefer_new else (p_true, p_new)
        out.append(np.mean(good - bad) if magnitude else np.mean(good > bad))
    return np.array(out)


def wilson_by_quadratic(p_hat, n, z=1.96):
    """The Wilson interval as the roots in p of (p_hat - p)^2 = z^2 p (1 - p) / n (numpy)."""
    k = z * z / n
    a, b, c = 1 + k, -(2 * p_hat + k), p_hat * p_hat
    root = np.sqrt(max(b * b - 4 * a * c, 0.0))
    return float((-b - root) / (2 * a)), float((-b + root) / (2 * a))


def reference_ci(expected, magnitude):
    """Rates: the Wilson interval; magnitudes: mean ± 1.96 s.e. clipped to [-1, 1]."""
    if not magnitude:
        return wilson_by_quadratic(expected.mean(), len(expected))
    se = np.std(expected, ddof=1) / math.sqrt(len(expected))
    return max(expected.mean() - 1.96 * se, -1.0), min(expected.mean() + 1.96 * se, 1.0)


def random_cases(seed, n_cases, max_prompts=4):
    """Variable prompt counts per case, mean NLLs in [0, 6)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, max_prompts + 1, n_cases)
    new = [rng.uniform(0, 6, c) for c in counts]
    true = [rng.uniform(0, 6, c) for c in counts]
    return new, true


@pytest.mark.parametrize(("cls", "fn", "kind", "prefer_new", "magnitude"), METRICS, ids=IDS)
def test_matches_reference_with_variable_prompt_counts(cls, fn, kind, prefer_new, magnitude):
    new, true = random_cases(0, 37)
    expected = reference_per_case(new, true, prefer_new, magnitude)
    as_tensors = [torch.tensor(x) for x in new], [torch.tensor(x) for x in true]

    assert fn(*as_tensors).item() == pytest.approx(expected.mean(), abs=1e-6)
    # probabilities give the same numbers
    probs = [torch.exp(-t) for t in as_tensors[0]], [torch.exp(-t) for t in as_tensors[1]]
    assert fn(*probs, score_type="prob").item() == pytest.approx(expected.mean(), abs=1e-6)

    # the metric over three uneven updates equals the reference over all cases
    m = cls()
    for lo, hi in [(0, 5), (5, 6), (6, 37)]:
        m.update(**{f"{kind}_new": as_tensors[0][lo:hi], f"{kind}_true": as_tensors[1][lo:hi]})
    assert m.compute().item() == pytest.approx(expected.mean(), abs=1e-6)
    assert m.compute().dtype == torch.float32

    ci = m.compute_with_ci()
    assert ci["n"] == 37
    assert ci["mean"] == pytest.approx(expected.mean(), abs=1e-12)
    assert (ci["ci_low"], ci["ci_high"]) == pytest.approx(reference_ci(expected, magnitude),
                                                          abs=1e-9)


def test_cases_are_averaged_before_the_mean_over_cases():
    # case 0: 1 rewrite prompt that succeeds; case 1: 3 prompts that all fail.
    new = [[0.1], [5.0, 5.0, 5.0]]
    true = [[2.0], [1.0, 1.0, 1.0]]
    assert efficacy_score(new, true).item() == pytest.approx(0.5)  # (1 + 0) / 2
    pooled = 1 / 4  # what averaging over all prompts would give
    assert efficacy_score(new, true).item() != pytest.approx(pooled)
    # magnitude: case means 1 exp(-.1)-exp(-2), and exp(-5)-exp(-1)
    expected = ((math.exp(-0.1) - math.exp(-2.0)) + (math.exp(-5.0) - math.exp(-1.0))) / 2
    assert efficacy_magnitude(new, true).item() == pytest.approx(expected, abs=1e-6)


def test_hand_computed_values_and_input_forms():
    p_new = torch.tensor([[0.6, 0.2], [0.7, 0.05]])  # (N=2, P=2)
    p_true = torch.tensor([[0.3, 0.5], [0.1, 0.02]])
    # PS: case 0 -> 1/2, case 1 -> 2/2; PM: case 0 -> 0.0, case 1 -> (0.6 + 0.03) / 2
    assert paraphrase_score(p_new, p_true, score_type="prob").item() == pytest.approx(0.75)
    assert paraphrase_magnitude(p_new, p_true, "prob").item() == pytest.approx(0.1575)
    # NS/NM reverse the preference
    assert neighborhood_score(p_new, p_true, "prob").item() == pytest.approx(0.25)
    assert neighborhood_magnitude(p_new, p_true, "prob").item() == pytest.approx(-0.1575)
    # 1-D tensors: one prompt per case; Python floats and lists work too
    assert efficacy_score(torch.tensor([0.5, 3.0]), torch.tensor([2.0, 1.0])).item() == 0.5
    assert efficacy_score([0.5, 3.0], [2.0, 1.0]).item() == 0.5
    assert efficacy_score([[0.5], [3.0]], [[2.0], [1.0]]).item() == 0.5


def test_ties_are_failures_for_both_directions():
    nll = torch.tensor([1.0, 2.0])
    assert efficacy_score(nll, nll).item() == 0.0
    assert neighborhood_score(nll, nll).item() == 0.0
    assert efficacy_magnitude(nll, nll).item() == 0.0


def test_infinite_nll_is_probability_zero():
    assert efficacy_score([math.inf], [1.0]).item() == 0.0
    assert efficacy_magnitude([1.0], [math.inf]).item() == pytest.approx(math.exp(-1.0))


def test_single_case_has_undefined_interval():
    m = EfficacyScore()
    m.update(rewrite_new=[0.1], rewrite_true=[1.0])
    ci = m.compute_with_ci()
    assert ci["mean"] == 1.0 and ci["n"] == 1
    assert math.isnan(ci["ci_low"]) and math.isnan(ci["ci_high"])


@pytest.mark.parametrize(("p", "n"), [(0.0, 2), (0.5, 2), (1.0, 3), (0.3, 10), (1.0, 100),
                                     (0.97, 1000)])
def test_wilson_interval_against_the_quadratic(p, n):
    from lightning_rome.metrics.functional import wilson_interval

    lo, hi = wilson_interval(p, n)
    want = wilson_by_quadratic(p, n)
    assert (lo, hi) == pytest.approx(want, abs=1e-9)
    assert 0.0 <= lo <= p <= hi <= 1.0


@pytest.mark.parametrize(("cls", "kind", "prefer_new"), [
    (EfficacyScore, "rewrite", True), (ParaphraseScore, "paraphrase", True),
    (NeighborhoodScore, "neighborhood", False)])
def test_rate_intervals_stay_within_0_and_1_at_small_n(cls, kind, prefer_new):
    """Two cases, one success: the normal interval would be 50 ± 98; Wilson stays in [0, 1]."""
    m = cls(score_type="prob")
    good, bad = ([0.9, 0.1], [0.1, 0.9]) if prefer_new else ([0.1, 0.9], [0.9, 0.1])
    m.update(**{f"{kind}_new": good, f"{kind}_true": bad})
    ci = m.compute_with_ci()
    assert ci["mean"] == 0.5
    assert (ci["ci_low"], ci["ci_high"]) == pytest.approx(wilson_by_quadratic(0.5, 2), abs=1e-9)
    assert 0.0 < ci["ci_low"] < 0.5 < ci["ci_high"] < 1.0
    all_good = cls(score_type="prob")
    all_good.update(**{f"{kind}_new": [good[0]] * 3, f"{kind}_true": [bad[0]] * 3})
    ci = all_good.compute_with_ci()
    assert ci["ci_high"] == 1.0 and ci["ci_low"] == pytest.approx(wilson_by_quadratic(1.0, 3)[0])


def test_summary_table_shows_asymmetric_intervals():
    from lightning_rome.metrics import summary_table

    row = {"ES": {"mean": 0.5, "ci_low": 0.0945, "ci_high": 0.9055, "n": 2},
           "PS": {"mean": 1.0, "ci_low": 0.4385, "ci_high": 1.0, "n": 3}}
    text = summary_table(row, label="ROME")
    assert "50.0 ± 40.5" in text and "100.0 [43.9, 100.0]" in text


def test_mean_ci_helper_against_numpy():
    x = np.random.default_rng(3).uniform(-1, 1, 50)
    r = mean_ci(torch.tensor(x))
    se = x.std(ddof=1) / math.sqrt(50)
    assert r["mean"] == pytest.approx(x.mean())
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(
        (x.mean() - 1.96 * se, x.mean() + 1.96 * se)
    )


def test_reset_and_forward_return_batch_value():
    m = ParaphraseScore(score_type="prob")
    batch_value = m(paraphrase_new=[[0.9, 0.1]], paraphrase_true=[[0.5, 0.5]])
    assert batch_value.item() == pytest.approx(0.5)
    m(paraphrase_new=[[0.9]], paraphrase_true=[[0.5]])
    assert m.compute().item() == pytest.approx(0.75)
    m.reset()
    m.update(paraphrase_new=[[0.1]], paraphrase_true=[[0.5]])
    assert m.compute().item() == 0.0


def test_class_flags():
    for cls, *_ in METRICS:
        assert cls.full_state_update is False
        assert cls.is_differentiable is False
        assert cls.higher_is_better is True


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("new", "true", "match"),
    [
        ([0.1, 0.2], [0.3], r"same prompts: 2 vs 1 cases"),
        ([[0.1, 0.2], [0.3]], [[0.1], [0.2, 0.3]], r"prompts per case \[2, 1\] vs \[1, 2\]"),
        (torch.ones(2, 3), torch.ones(2, 2), r"same prompts"),
        ([0.1, float("nan")], [0.3, 0.4], r"rewrite_new contains NaN \(case 1"),
        ([0.1, 0.2], [0.3, -0.5], r"rewrite_true contains a negative NLL \(case 1"),
        ([], [], r"rewrite_new holds no cases"),
        (torch.empty(0), torch.empty(0), r"rewrite_new holds no cases"),
        ([[0.1], []], [[0.1], []], r"rewrite_new\[1\] \(case 1\) has no prompts"),
        (torch.ones(2, 2, 2), torch.ones(2, 2, 2), r"shape \(2, 2, 2\)"),
    ],
)
def test_bad_inputs_raise_clear_errors(new, true, match):
    with pytest.raises(ValueError, match=match):
        efficacy_score(new, true)
    m = EfficacyScore()
    with pytest.raises(ValueError, match=match):
        m.update(rewrite_new=new, rewrite_true=true)
    assert int(m.es_count) == 0  # nothing was accumulated


def test_probability_outside_unit_interval():
    with pytest.raises(ValueError, match=r"probability outside \[0, 1\]"):
        efficacy_score([1.5], [0.5], score_type="prob")


def test_missing_and_wrong_keywords():
    m = NeighborhoodScore()
    with pytest.raises(
        ValueError,
        match=r"needs neighborhood_new, neighborhood_true; missing: "
        r"neighborhood_true",
    ):
        m.update(neighborhood_new=[0.1])
    with pytest.raises(ValueError, match="score_type must be 'nll' or 'prob'"):
        NeighborhoodScore(score_type="logits")
    with pytest.raises(TypeError, match="rewrite_new must be a tensor or a sequence"):
        efficacy_score("0.1", "0.2")
    with pytest.raises(TypeError, match=r"rewrite_new\[0\] must be a number"):
        efficacy_score([{"a": 1}], [0.2])


def test_compute_without_cases_raises():
    m = EfficacyMagnitude()
    with pytest.raises(ValueError, match="no cases to average"), pytest.warns(UserWarning):
        m.compute()
    with pytest.raises(ValueError, match="no cases to average"):
        m.compute_with_ci()


def test_case_mean_of_arbitrary_values():
    x = np.random.default_rng(5).normal(size=20)
    m = CaseMean()
    m.update(torch.tensor(x[:7]))
    m.update(x[7:].tolist())
    ci = m.compute_with_ci()
    se = x.std(ddof=1) / math.sqrt(20)
    assert ci["mean"] == pytest.approx(x.mean(), abs=1e-12)
    assert ci["ci_high"] == pytest.approx(x.mean() + 1.96 * se, abs=1e-12)
    with pytest.raises(ValueError, match="got NaN at case 1"):
        m.update([0.0, float("nan")])
    with pytest.raises(ValueError, match="got no values"):
        m.update([])
