"""Edit-quality metrics of the ROME and MEMIT papers, as torchmetrics.

COUNTERFACT: :class:`EfficacyScore` (ES), :class:`EfficacyMagnitude` (EM),
:class:`ParaphraseScore` (PS), :class:`ParaphraseMagnitude` (PM), :class:`NeighborhoodScore` (NS),
:class:`NeighborhoodMagnitude` (NM), :class:`EditScore` (S), :class:`GenerationEntropy` (GE),
:class:`ReferenceScore` (RS). zsRE: :class:`ZsREAccuracy` and its efficacy, paraphrase and
specificity forms. Every metric averages over each case's prompts first and then over cases,
``compute()`` returns the mean in natural units (fractions; bits for GE), and
``compute_with_ci()`` adds the 95% interval ``mean ± 1.96·s/√n`` over cases. Tables multiply by
100 (:func:`summary_table`, :func:`to_percent`). Functional forms live in
:mod:`lightning_rome.metrics.functional`.
"""

from lightning_rome.metrics.base import CaseMean, MetricWithCI
from lightning_rome.metrics.collections import (
    COUNTERFACT_COLUMNS,
    ZSRE_COLUMNS,
    compute_with_ci,
    counterfact_metrics,
    summary_table,
    to_percent,
    zsre_metrics,
)
from lightning_rome.metrics.edit_score import EditScore
from lightning_rome.metrics.efficacy_magnitude import EfficacyMagnitude
from lightning_rome.metrics.efficacy_score import EfficacyScore
from lightning_rome.metrics.functional import AttributeSnippets, MetricCI, TfidfTable
from lightning_rome.metrics.generation_entropy import GenerationEntropy
from lightning_rome.metrics.neighborhood_magnitude import NeighborhoodMagnitude
from lightning_rome.metrics.neighborhood_score import NeighborhoodScore
from lightning_rome.metrics.paraphrase_magnitude import ParaphraseMagnitude
from lightning_rome.metrics.paraphrase_score import ParaphraseScore
from lightning_rome.metrics.reference_score import ReferenceScore
from lightning_rome.metrics.zsre_accuracy import (
    ZsREAccuracy,
    ZsREEfficacy,
    ZsREParaphrase,
    ZsRESpecificity,
)

__all__ = [
    "COUNTERFACT_COLUMNS",
    "ZSRE_COLUMNS",
    "AttributeSnippets",
    "CaseMean",
    "EditScore",
    "EfficacyMagnitude",
    "EfficacyScore",
    "GenerationEntropy",
    "MetricCI",
    "MetricWithCI",
    "NeighborhoodMagnitude",
    "NeighborhoodScore",
    "ParaphraseMagnitude",
    "ParaphraseScore",
    "ReferenceScore",
    "TfidfTable",
    "ZsREAccuracy",
    "ZsREEfficacy",
    "ZsREParaphrase",
    "ZsRESpecificity",
    "compute_with_ci",
    "counterfact_metrics",
    "summary_table",
    "to_percent",
    "zsre_metrics",
]
