"""Functional forms of the edit-quality metrics: plain functions, no Lightning, no state.

Each returns the mean over cases; the per-case values come from the private ``_*_update``
helpers, which the :mod:`lightning_rome.metrics` classes accumulate.
"""

from lightning_rome.metrics.functional._utils import (
    Z_95,
    MetricCI,
    PromptScores,
    ScoreType,
    mean_ci,
    wilson_interval,
)
from lightning_rome.metrics.functional.counterfact import (
    efficacy_magnitude,
    efficacy_score,
    neighborhood_magnitude,
    neighborhood_score,
    paraphrase_magnitude,
    paraphrase_score,
)
from lightning_rome.metrics.functional.edit_score import edit_score, harmonic_mean
from lightning_rome.metrics.functional.generation_entropy import (
    generation_entropy,
    ngram_entropy,
    word_tokenize,
)
from lightning_rome.metrics.functional.reference_score import reference_score
from lightning_rome.metrics.functional.tfidf import AttributeSnippets, TfidfTable, analyze
from lightning_rome.metrics.functional.zsre import zsre_accuracy

__all__ = [
    "Z_95",
    "AttributeSnippets",
    "MetricCI",
    "PromptScores",
    "ScoreType",
    "TfidfTable",
    "analyze",
    "edit_score",
    "efficacy_magnitude",
    "efficacy_score",
    "generation_entropy",
    "harmonic_mean",
    "mean_ci",
    "neighborhood_magnitude",
    "neighborhood_score",
    "ngram_entropy",
    "paraphrase_magnitude",
    "paraphrase_score",
    "reference_score",
    "wilson_interval",
    "word_tokenize",
    "zsre_accuracy",
]
