"""The COUNTERFACT and zsRE metric sets, one update call per batch, and the summary table."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics import MetricCollection

from lightning_rome.metrics import (
    EfficacyScore,
    ParaphraseScore,
    TfidfTable,
    compute_with_ci,
    counterfact_metrics,
    summary_table,
    to_percent,
    zsre_metrics,
)
from lightning_rome.metrics import functional as F

REFS = [
    "Paris is the capital of France.",
    "Rome is the capital of Italy.",
    "The guitar is a string instrument.",
    "English is a West Germanic language.",
]


def cf_batch(seed, n):
    rng = np.random.default_rng(seed)
    batch = {}
    for kind, p in [("rewrite", 1), ("paraphrase", 2), ("neighborhood", 3)]:
        batch[f"{kind}_new"] = torch.tensor(rng.uniform(0, 4, (n, p)))
        batch[f"{kind}_true"] = torch.tensor(rng.uniform(0, 4, (n, p)))
    words = ["capital", "city", "France", "guitar", "the", "is", "language", "Paris", "a"]
    batch["generated_texts"] = [
        [" ".join(rng.choice(words, 8)) for _ in range(2)] for _ in range(n)
    ]
    batch["reference_texts"] = [[REFS[i % 4]] for i in range(n)]
    return batch


def concat(batches):
    out = {}
    for k in batches[0]:
        if isinstance(batches[0][k], torch.Tensor):
            out[k] = torch.cat([b[k] for b in batches])
        else:
            out[k] = [x for b in batches for x in b[k]]
    return out


def test_counterfact_set_one_update_per_batch_matches_functional():
    table = TfidfTable.fit(REFS)
    metrics = counterfact_metrics(prefix="post/", tfidf=table)
    assert sorted(metrics.keys()) == sorted(
        f"post/{k}" for k in ["ES", "EM", "PS", "PM", "NS", "NM", "S", "GE", "RS"]
    )
    batches = [cf_batch(s, n) for s, n in [(0, 4), (1, 7), (2, 1)]]
    for b in batches:
        metrics.update(**b)
    everything = concat(batches)
    expected = {
        "ES": F.efficacy_score(everything["rewrite_new"], everything["rewrite_true"]),
        "EM": F.efficacy_magnitude(everything["rewrite_new"], everything["rewrite_true"]),
        "PS": F.paraphrase_score(everything["paraphrase_new"], everything["paraphrase_true"]),
        "PM": F.paraphrase_magnitude(everything["paraphrase_new"], everything["paraphrase_true"]),
        "NS": F.neighborhood_score(everything["neighborhood_new"], everything["neighborhood_true"]),
        "NM": F.neighborhood_magnitude(
            everything["neighborhood_new"], everything["neighborhood_true"]
        ),
        "S": F.edit_score(
            *(
                everything[f"{k}_{t}"]
                for k in ["rewrite", "paraphrase", "neighborhood"]
                for t in ["new", "true"]
            )
        ),
        "GE": F.generation_entropy(everything["generated_texts"]),
        "RS": F.reference_score(
            everything["generated_texts"], everything["reference_texts"], table
        ),
    }
    got = metrics.compute()
    for k, v in expected.items():
        assert got[f"post/{k}"].item() == pytest.approx(v.item(), abs=1e-6), k
    # S is the harmonic mean of the collection's own ES, PS and NS
    hm = 3 / sum(1 / got[f"post/{k}"].item() for k in ["ES", "PS", "NS"])
    assert got["post/S"].item() == pytest.approx(hm, abs=1e-6)

    cis = compute_with_ci(metrics)
    assert set(cis) == set(got)
    for k, r in cis.items():
        assert r["n"] == 12
        assert r["mean"] == pytest.approx(got[k].item(), abs=1e-6)
        assert r["ci_low"] <= r["mean"] <= r["ci_high"]


def test_forward_returns_batch_values_and_keeps_accumulating():
    metrics = counterfact_metrics(generation=False, score_type="prob")
    b1 = {
        "rewrite_new": [0.9],
        "rewrite_true": [0.1],
        "paraphrase_new": [0.9],
        "paraphrase_true": [0.1],
        "neighborhood_new": [0.1],
        "neighborhood_true": [0.9],
    }
    b2 = {k: [1.0 - v[0]] for k, v in b1.items()}
    out1 = metrics(**b1)
    out2 = metrics(**b2)
    assert out1["ES"].item() == 1.0 and out2["ES"].item() == 0.0
    assert metrics.compute()["ES"].item() == 0.5


def test_identical_first_batches_do_not_merge_different_metrics():
    # After a first batch where ES and PS are both 1, plain equal-named states would look equal
    # and torchmetrics would merge the two into one compute group; prefixed states prevent that.
    user_built = MetricCollection(
        [EfficacyScore(score_type="prob"), ParaphraseScore(score_type="prob")]
    )  # compute_groups=True
    user_built.update(
        rewrite_new=[0.9], rewrite_true=[0.1], paraphrase_new=[0.9], paraphrase_true=[0.1]
    )
    user_built.update(
        rewrite_new=[0.9], rewrite_true=[0.1], paraphrase_new=[0.1], paraphrase_true=[0.9]
    )
    out = user_built.compute()
    assert out["EfficacyScore"].item() == 1.0
    assert out["ParaphraseScore"].item() == 0.5
    assert len(user_built.compute_groups) == 2


def test_rs_needs_an_idf_table():
    with pytest.warns(UserWarning, match="RS is left out"):
        metrics = counterfact_metrics()
    assert "GE" in metrics and "RS" not in metrics
    assert "GE" not in counterfact_metrics(generation=False)


def test_missing_input_names_the_metric():
    metrics = counterfact_metrics(generation=False)
    with pytest.raises(
        ValueError,
        match=r"Neighborhood\w+.update\(\) needs neighborhood_new, "
        r"neighborhood_true; missing",
    ):
        metrics.update(
            rewrite_new=[0.1], rewrite_true=[0.2], paraphrase_new=[0.1], paraphrase_true=[0.2]
        )


def test_zsre_set():
    metrics = zsre_metrics(prefix="zsre/")
    metrics.update(
        rewrite_preds=torch.tensor([[1, 2], [3, 4]]),
        rewrite_target=torch.tensor([[1, 2], [3, 5]]),
        paraphrase_correct=[[True, False, True], [False]],
        neighborhood_preds=[[7]],
        neighborhood_target=[[7]],
    )
    out = {k: v.item() for k, v in metrics.compute().items()}
    assert out == pytest.approx(
        {"zsre/efficacy": 0.75, "zsre/paraphrase": 1 / 3, "zsre/specificity": 1.0}
    )
    cis = compute_with_ci(metrics)
    assert cis["zsre/efficacy"]["n"] == 2 and cis["zsre/specificity"]["n"] == 1


def test_summary_table_scales_every_metric_by_100():
    results = {
        "S": {"mean": 0.8912, "ci_low": 0.8712, "ci_high": 0.9112, "n": 100},
        "ES": {"mean": 1.0, "ci_low": 1.0, "ci_high": 1.0, "n": 100},
        "NM": {"mean": 0.051, "ci_low": 0.041, "ci_high": 0.061, "n": 100},
        "GE": {"mean": 6.266, "ci_low": 6.2, "ci_high": 6.332, "n": 100},
        "RS": torch.tensor(0.417),
    }
    assert summary_table(results, label="ROME").splitlines() == [
        "| Editor | S          | ES          | NM        | GE          | RS   |",
        "|--------|------------|-------------|-----------|-------------|------|",
        "| ROME   | 89.1 ± 2.0 | 100.0 ± 0.0 | 5.1 ± 1.0 | 626.6 ± 6.6 | 41.7 |",
    ]
    pct = to_percent(results)
    assert pct["GE"]["mean"] == pytest.approx(626.6)
    assert pct["NM"]["ci_high"] == pytest.approx(6.1)
    assert pct["ES"]["n"] == 100 and math.isnan(pct["RS"]["ci_low"])


def test_summary_table_rows_prefix_and_rich():
    rows = {"GPT-2": {"pre/ES": 0.2, "pre/PS": 0.24}, "ROME": {"pre/ES": 1.0, "pre/PS": 0.96}}
    text = summary_table(rows, prefix="pre/", digits=2)
    assert text.splitlines() == [
        "| Editor | ES     | PS    |",
        "|--------|--------|-------|",
        "| GPT-2  | 20.00  | 24.00 |",
        "| ROME   | 100.00 | 96.00 |",
    ]
    rich_table = summary_table(rows, prefix="pre/", rich=True)
    assert [c.header for c in rich_table.columns] == ["Editor", "ES", "PS"]
    assert rich_table.row_count == 2
