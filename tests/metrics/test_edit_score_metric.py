"""S (harmonic mean of ES, PS, NS) against scipy, and its delta-method interval."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_rome.metrics import EditScore
from lightning_rome.metrics.functional import edit_score, harmonic_mean

scipy_stats = pytest.importorskip("scipy.stats")


def make_inputs(seed, n_cases):
    rng = np.random.default_rng(seed)
    out = {}
    for kind, max_p in [("rewrite", 1), ("paraphrase", 2), ("neighborhood", 10)]:
        counts = rng.integers(1, max_p + 1, n_cases)
        out[f"{kind}_new"] = [torch.tensor(rng.uniform(0, 4, c)) for c in counts]
        out[f"{kind}_true"] = [torch.tensor(rng.uniform(0, 4, c)) for c in counts]
    return out


def per_case_triples(inputs):
    """(ES, PS, NS) per case, straight from the definitions (NLL: lower is more probable)."""
    rows = []
    for i in range(len(inputs["rewrite_new"])):
        es = np.mean(inputs["rewrite_new"][i].numpy() < inputs["rewrite_true"][i].numpy())
        ps = np.mean(inputs["paraphrase_new"][i].numpy() < inputs["paraphrase_true"][i].numpy())
        ns = np.mean(inputs["neighborhood_true"][i].numpy() < inputs["neighborhood_new"][i].numpy())
        rows.append((es, ps, ns))
    return np.array(rows)


def test_matches_scipy_hmean_of_case_averages():
    inputs = make_inputs(0, 41)
    triples = per_case_triples(inputs)
    expected = scipy_stats.hmean(triples.mean(axis=0))
    assert edit_score(**inputs).item() == pytest.approx(expected, abs=1e-6)
    m = EditScore()
    half = {k: v[:20] for k, v in inputs.items()}
    rest = {k: v[20:] for k, v in inputs.items()}
    m.update(**half)
    m.update(**rest)
    assert m.compute().item() == pytest.approx(expected, abs=1e-6)
    # not the mean of per-case harmonic means
    per_case_hmeans = [scipy_stats.hmean(t) if t.min() > 0 else 0.0 for t in triples]
    assert abs(np.mean(per_case_hmeans) - expected) > 1e-3


def test_delta_method_interval_against_finite_differences():
    inputs = make_inputs(1, 60)
    triples = per_case_triples(inputs)
    n = len(triples)
    means = triples.mean(axis=0)
    # gradient of scipy's hmean by central differences: independent of the closed form
    eps = 1e-6
    grad = np.array(
        [
            (scipy_stats.hmean(means + eps * e) - scipy_stats.hmean(means - eps * e)) / (2 * eps)
            for e in np.eye(3)
        ]
    )
    se = math.sqrt(grad @ np.cov(triples.T, ddof=1) @ grad / n)
    m = EditScore()
    m.update(**inputs)
    ci = m.compute_with_ci()
    assert ci["n"] == n
    assert ci["mean"] == pytest.approx(scipy_stats.hmean(means), abs=1e-12)
    assert ci["ci_low"] == pytest.approx(ci["mean"] - 1.96 * se, rel=1e-6)
    assert ci["ci_high"] == pytest.approx(ci["mean"] + 1.96 * se, rel=1e-6)


def test_zero_component_gives_zero():
    # ES = 0 (the new object never wins), PS = NS = 1
    p = {
        "rewrite_new": [0.1, 0.2],
        "rewrite_true": [0.5, 0.6],
        "paraphrase_new": [0.9, 0.8],
        "paraphrase_true": [0.1, 0.1],
        "neighborhood_new": [0.1, 0.1],
        "neighborhood_true": [0.9, 0.8],
    }
    assert edit_score(**p, score_type="prob").item() == 0.0
    m = EditScore(score_type="prob")
    m.update(**p)
    ci = m.compute_with_ci()
    assert ci["mean"] == 0.0 and ci["ci_low"] == 0.0 and ci["ci_high"] == 0.0
    assert harmonic_mean(torch.tensor([0.5, 0.0, 1.0])).item() == 0.0


def test_cases_must_match_across_prompt_kinds():
    p = {
        "rewrite_new": [0.1, 0.2],
        "rewrite_true": [0.5, 0.6],
        "paraphrase_new": [0.9],
        "paraphrase_true": [0.1],
        "neighborhood_new": [0.1, 0.1],
        "neighborhood_true": [0.9, 0.8],
    }
    with pytest.raises(ValueError, match=r"same cases, got 2, 1 and 2 cases"):
        EditScore(score_type="prob").update(**p)
    del p["neighborhood_true"]
    with pytest.raises(ValueError, match="missing: neighborhood_true"):
        EditScore(score_type="prob").update(**p)


def test_single_case_interval_is_nan():
    m = EditScore(score_type="prob")
    m.update(
        rewrite_new=[0.9],
        rewrite_true=[0.1],
        paraphrase_new=[0.9],
        paraphrase_true=[0.1],
        neighborhood_new=[0.1],
        neighborhood_true=[0.9],
    )
    ci = m.compute_with_ci()
    assert ci["mean"] == pytest.approx(1.0) and math.isnan(ci["ci_low"])
