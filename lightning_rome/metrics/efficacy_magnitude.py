"""EM, the COUNTERFACT efficacy magnitude, as a torchmetrics ``Metric``."""

from __future__ import annotations

from typing import Any

from lightning_rome.metrics.base import CaseMean
from lightning_rome.metrics.functional._utils import PromptScores, ScoreType, _check_score_type
from lightning_rome.metrics.functional.counterfact import _efficacy_magnitude_update

__all__ = ["EfficacyMagnitude"]


class EfficacyMagnitude(CaseMean):
    """Efficacy magnitude EM: the mean of ``P[o*] - P[o^c]`` on the rewrite prompts.

    Averaged over each case's prompts first, then over cases (as in ROME's and MEMIT's tables).
    ``compute()`` returns the mean as a fraction; ``compute_with_ci()`` adds the 95% interval;
    tables show both × 100.

    Args:
        score_type: what the inputs hold: ``"nll"`` (the mean per-token NLL of a target after
            the prompt, the default) or ``"prob"`` (``exp(-mean NLL)``).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> m = EfficacyMagnitude(score_type="prob")
        >>> m.update(rewrite_new=[[0.6, 0.2], [0.7]], rewrite_true=[[0.3, 0.5], [0.1]])
        >>> m.compute()  # per case [0.0, 0.6]
        tensor(0.3000)
    """

    higher_is_better = True
    plot_lower_bound = -1.0
    plot_upper_bound = 1.0
    _state_prefix = "em"
    evaluation_inputs = ("rewrite_new", "rewrite_true")

    def __init__(self, score_type: ScoreType = "nll", **kwargs: Any) -> None:
        _check_score_type(score_type)
        super().__init__(**kwargs)
        self.score_type = score_type

    def update(
        self, rewrite_new: PromptScores | None = None, rewrite_true: PromptScores | None = None
    ) -> None:
        """Add a batch of cases.

        Args:
            rewrite_new: scores of the new object ``o*`` on the rewrite prompt(s): a
                tensor ``(N,)`` (one prompt per case), ``(N, P)``, or a list of ``N``
                per-case tensors ``(P_i,)``.
            rewrite_true: scores of the true object ``o^c`` on the same prompts.

        Raises:
            ValueError: an input is missing, holds no case, the two disagree in shape, or a
                value is NaN, a negative NLL or a probability outside ``[0, 1]``.
        """
        self._missing(rewrite_new=rewrite_new, rewrite_true=rewrite_true)
        self._accumulate(_efficacy_magnitude_update(rewrite_new, rewrite_true, self.score_type))
