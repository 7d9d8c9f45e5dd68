"""zsRE token-level accuracy against a numpy computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_rome.metrics import ZsREAccuracy, ZsREEfficacy, ZsREParaphrase, ZsRESpecificity
from lightning_rome.metrics.functional import zsre_accuracy


def random_cases(seed, n_cases, vocab=7):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 6, n_cases)
    target = [rng.integers(0, vocab, k) for k in lengths]
    # predictions agree with the target most of the time
    preds = [
        np.where(rng.random(k) < 0.6, t, rng.integers(0, vocab, k)) for k, t in zip(lengths, target)
    ]
    return preds, target


def reference(preds, target):
    return np.array([np.mean(p == t) for p, t in zip(preds, target)])


def test_lists_padded_tensors_logits_and_masks_agree_with_numpy():
    preds, target = random_cases(0, 23)
    expected = reference(preds, target)
    # per-case lists of variable length
    lists = [torch.tensor(p) for p in preds], [torch.tensor(t) for t in target]
    assert zsre_accuracy(*lists).item() == pytest.approx(expected.mean(), abs=1e-6)
    # padded (N, T) with ignore_index in the target (the prediction at padding is irrelevant)
    T = max(len(t) for t in target)
    p_pad = torch.full((23, T), 3)
    t_pad = torch.full((23, T), -100)
    for i, (p, t) in enumerate(zip(preds, target)):
        p_pad[i, : len(p)] = torch.tensor(p)
        t_pad[i, : len(t)] = torch.tensor(t)
    assert zsre_accuracy(p_pad, t_pad).item() == pytest.approx(expected.mean(), abs=1e-6)
    # logits (N, T, V): argmax is the prediction
    logits = torch.nn.functional.one_hot(p_pad, 7).float() * 5 + 0.1 * torch.randn(23, T, 7)
    assert zsre_accuracy(logits, t_pad).item() == pytest.approx(expected.mean(), abs=1e-6)
    # a correctness mask per case
    correct = [torch.tensor(p == t) for p, t in zip(preds, target)]
    assert zsre_accuracy(correct=correct).item() == pytest.approx(expected.mean(), abs=1e-6)

    m = ZsREAccuracy()
    m.update(p_pad[:10], t_pad[:10])
    m.update(correct=correct[10:])
    ci = m.compute_with_ci()
    # Accuracies are rates: the Wilson interval, from the roots of its defining quadratic.
    assert ci["mean"] == pytest.approx(expected.mean(), abs=1e-12)
    p, k = expected.mean(), 1.96**2 / 23
    a, b, c = 1 + k, -(2 * p + k), p * p
    root = math.sqrt(b * b - 4 * a * c)
    assert (ci["ci_low"], ci["ci_high"]) == pytest.approx(
        ((-b - root) / (2 * a), (-b + root) / (2 * a)), abs=1e-12
    )


def test_per_case_mean_before_the_mean_over_cases():
    # case 0: 1/4 tokens right; case 1: 1/1 -> (0.25 + 1) / 2, not the pooled 2/5
    assert zsre_accuracy(correct=[[True, False, False, False], [True]]).item() == 0.625


def test_routed_subclasses_take_prefixed_inputs():
    e, p, s = ZsREEfficacy(), ZsREParaphrase(), ZsRESpecificity()
    e.update(rewrite_correct=[[True, False]])
    p.update(paraphrase_preds=torch.tensor([[1, 2]]), paraphrase_target=torch.tensor([[1, 2]]))
    s.update(neighborhood_preds=[[4]], neighborhood_target=[[5]])
    assert (e.compute().item(), p.compute().item(), s.compute().item()) == (0.5, 1.0, 0.0)
    with pytest.raises(
        ValueError, match="needs paraphrase_preds and paraphrase_target, or paraphrase_correct"
    ):
        p.update()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"preds": torch.tensor([[1, 2]]), "target": torch.tensor([[1, 2, 3]])},
            r"differ in length",
        ),
        (
            {"preds": torch.tensor([[1], [2]]), "target": torch.tensor([[1]])},
            r"same cases, got 2 and 1",
        ),
        (
            {"preds": torch.tensor([[1, 2]]), "target": torch.tensor([[-100, -100]])},
            r"no answer tokens",
        ),
        (
            {"preds": torch.tensor([[[0.1, float("nan")]]]), "target": torch.tensor([[1]])},
            r"NaN logits",
        ),
        ({"preds": torch.tensor([[1]]), "target": torch.tensor([[1.0]])}, r"integer token ids"),
        ({"preds": torch.tensor([[1]]), "target": torch.tensor([[-3]])}, r"negative token ids"),
        (
            {
                "preds": torch.empty(0, 2, dtype=torch.long),
                "target": torch.empty(0, 2, dtype=torch.long),
            },
            r"holds no cases",
        ),
        ({"correct": [[True], []]}, r"correct\[1\] \(case 1\) has no answer tokens"),
        ({"correct": torch.tensor([[0.5]])}, r"bool \(or 0/1\) mask"),
        (
            {"correct": [[True]], "preds": torch.tensor([[1]])},
            r"either preds and target, or correct",
        ),
        ({}, r"needs preds and target"),
    ],
)
def test_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        zsre_accuracy(**kwargs)
    with pytest.raises(ValueError, match=match):
        ZsREAccuracy().update(**kwargs)
