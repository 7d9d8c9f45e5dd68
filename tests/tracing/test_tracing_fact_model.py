"""Causal tracing on a model that knows facts (``lightning_rome.testing.get_fact_model``: a
4-layer GPT-2 trained on a synthetic knowledge base): the structure the paper reports."""

from __future__ import annotations

import warnings

import pytest
import torch
from matplotlib.image import imread

from lightning_rome.testing import get_fact_model
from lightning_rome.tracing import (
    AnswerMismatchWarning,
    CausalTrace,
    GaussianNoise,
    average_traces,
    suggest_edit_layer,
    trace_all,
)
from lightning_rome.tracing.plot import plot_average, plot_average_lines, plot_traces, save_figure

KINDS = ("hidden", "mlp", "attn", "hidden/sever=mlp")
SUBJECT_CLASSES = [0, 1, 2]  # first, middle and last subject tokens
FIRST_AFTER, LAST = 3, 5


@pytest.fixture(scope="module")
def fact_model():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield get_fact_model()
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def traced(fact_model) -> list[dict[str, CausalTrace]]:
    """Eight facts of different relations, traced with their true object as the answer."""
    fm = fact_model
    facts = fm.kb.facts[:: len(fm.kb.facts) // 8][:8]
    noise = GaussianNoise.from_subjects(fm.model, fm.tokenizer, [f.subject for f in fm.kb.facts])
    with warnings.catch_warnings():
        warnings.simplefilter("error", AnswerMismatchWarning)  # the model knows these facts
        return [trace_all(fm.model, fm.tokenizer, f.train_prompts[0], f.subject, KINDS,
                          window=2, samples=5, noise=noise, answer=f.object) for f in facts]


@pytest.fixture(scope="module")
def averages(traced):
    return {k: average_traces([t[k] for t in traced]) for k in KINDS}


def test_the_corruption_lowers_the_answer(traced, averages):
    for t in traced:
        h = t["hidden"]
        assert h.correct and h.low_score < 0.6 * h.high_score
    assert averages["hidden"].ate > 0.5


def test_late_site_at_the_last_token(traced, averages):
    L = traced[0]["hidden"].n_layers
    for t in traced:  # restoring the last layer at the last token is the clean run
        h = t["hidden"]
        assert float(h.scores[-1, L - 1]) == pytest.approx(h.high_score, abs=1e-5)
    last = averages["hidden"].aie[LAST]
    assert last[L - 1] == pytest.approx(averages["hidden"].ate, abs=1e-5)
    assert last[1] < last[2] < last[3]  # the effect at the last token grows with depth
    # ... carried there by attention (the paper's late site).
    attn = averages["attn"].aie
    assert attn[LAST, L - 1] > 0.4 > attn[SUBJECT_CLASSES, L - 1].max() + 0.3


def test_early_site_at_the_subject(averages):
    hidden = averages["hidden"].aie
    subject_early = float(hidden[SUBJECT_CLASSES, :2].max())
    assert subject_early > 0.03
    assert subject_early > float(hidden[FIRST_AFTER, :2].max()) + 0.02
    # ... where MLPs matter more than attention (the paper's early site).
    mlp, attn = averages["mlp"].aie, averages["attn"].aie
    assert float(mlp[SUBJECT_CLASSES, :2].max()) > float(attn[SUBJECT_CLASSES, :2].max())
    assert suggest_edit_layer(averages["mlp"]) in (0, 1)


def test_severing_mlps_changes_the_mlp_mediated_effect(traced, averages):
    L = traced[0]["hidden"].n_layers
    diffs = []
    for t in traced:
        h, s = t["hidden"], t["hidden/sever=mlp"]
        torch.testing.assert_close(s.scores[:, L - 1], h.scores[:, L - 1], rtol=0, atol=1e-6)
        diffs.append(float(h.scores[h.subject_range[1] - 1, 0] - s.scores[s.subject_range[1] - 1,
                                                                           0]))
    # Freezing the later MLPs at the subject's last token removes part of its early effect.
    assert max(abs(d) for d in diffs) > 1e-3
    assert sum(diffs) / len(diffs) > 0.005
    assert averages["hidden/sever=mlp"].aie[2, 0] < averages["hidden"].aie[2, 0]


def test_plots_of_real_traces(traced, averages, tmp_path):
    fig = plot_traces({k: traced[0][k] for k in ("hidden", "mlp", "attn")}, figsize=(9, 3))
    image = imread(save_figure(fig, tmp_path / "fact.png", dpi=40))
    assert image.shape[:2] == (120, 360)
    fig = plot_average(averages["mlp"], figsize=(5, 2.5))
    assert imread(save_figure(fig, tmp_path / "avg.png", dpi=40)).shape[:2] == (100, 200)
    fig = plot_average_lines({k: averages[k] for k in ("hidden", "mlp", "attn")},
                             figsize=(4, 3))
    assert imread(save_figure(fig, tmp_path / "lines.png", dpi=40)).shape[:2] == (120, 160)
