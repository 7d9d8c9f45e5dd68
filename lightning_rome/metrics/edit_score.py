"""S, the COUNTERFACT edit score (harmonic mean of ES, PS and NS), as a torchmetrics ``Metric``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_rome.metrics.base import MetricWithCI
from lightning_rome.metrics.functional._utils import (
    MetricCI,
    PromptScores,
    ScoreType,
    _check_score_type,
)
from lightning_rome.metrics.functional.edit_score import _edit_score_compute, _edit_score_update

__all__ = ["EditScore"]


class EditScore(MetricWithCI):
    """Edit score S: the harmonic mean of ES, PS and NS, each averaged over cases first.

    It takes the same keyword inputs as :class:`EfficacyScore`, :class:`ParaphraseScore` and
    :class:`NeighborhoodScore` together, so one ``MetricCollection.update(**inputs)`` call feeds
    it along with them. ROME and MEMIT report S without an interval; ``compute_with_ci()`` gives a
    delta-method approximation from the per-case covariance of (ES, PS, NS).

    Args:
        score_type: ``"nll"`` (default) or ``"prob"``, as in :class:`EfficacyScore`.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> m = EditScore(score_type="prob")
        >>> m.update(rewrite_new=[0.9, 0.8], rewrite_true=[0.1, 0.1],
        ...          paraphrase_new=[0.9, 0.1], paraphrase_true=[0.1, 0.8],
        ...          neighborhood_new=[0.1, 0.9], neighborhood_true=[0.8, 0.1])
        >>> m.compute()  # ES = 1, PS = 0.5, NS = 0.5
        tensor(0.6000)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0
    evaluation_inputs = (
        "rewrite_new",
        "rewrite_true",
        "paraphrase_new",
        "paraphrase_true",
        "neighborhood_new",
        "neighborhood_true",
    )

    def __init__(self, score_type: ScoreType = "nll", **kwargs: Any) -> None:
        _check_score_type(score_type)
        super().__init__(**kwargs)
        self.score_type = score_type
        # Sums over cases of the (ES, PS, NS) triples and of their outer products.
        self.add_state("s_sum", torch.zeros(3, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("s_outer", torch.zeros(3, 3, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("s_count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        rewrite_new: PromptScores | None = None,
        rewrite_true: PromptScores | None = None,
        paraphrase_new: PromptScores | None = None,
        paraphrase_true: PromptScores | None = None,
        neighborhood_new: PromptScores | None = None,
        neighborhood_true: PromptScores | None = None,
    ) -> None:
        """Add a batch of cases; every case needs all three prompt kinds.

        Raises:
            ValueError: an input is missing or invalid (see :class:`EfficacyScore`), or the
                three prompt kinds cover different numbers of cases.
        """
        self._missing(
            rewrite_new=rewrite_new,
            rewrite_true=rewrite_true,
            paraphrase_new=paraphrase_new,
            paraphrase_true=paraphrase_true,
            neighborhood_new=neighborhood_new,
            neighborhood_true=neighborhood_true,
        )
        triples = _edit_score_update(
            rewrite_new,
            rewrite_true,
            paraphrase_new,
            paraphrase_true,
            neighborhood_new,
            neighborhood_true,
            self.score_type,
        )
        triples = triples.to(self.device)  # (N, 3)
        self.s_sum = self.s_sum + triples.sum(dim=0)
        self.s_outer = self.s_outer + triples.T @ triples  # (3, 3)
        self.s_count = self.s_count + triples.shape[0]

    def compute(self) -> Tensor:
        """S as a float32 scalar in ``[0, 1]``."""
        return torch.tensor(
            self._compute_ci()["mean"], dtype=torch.get_default_dtype(), device=self.device
        )

    def _compute_ci(self) -> MetricCI:
        n = int(self.s_count)
        if n == 0:
            raise ValueError(
                "EditScore has no cases to average: call update() with at least one case first"
            )
        return _edit_score_compute(self.s_sum, self.s_outer, n)
