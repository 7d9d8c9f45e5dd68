"""PM, the COUNTERFACT paraphrase magnitude, as a torchmetrics ``Metric``."""

from __future__ import annotations

from typing import Any

from lightning_rome.metrics.base import CaseMean
from lightning_rome.metrics.functional._utils import PromptScores, ScoreType, _check_score_type
from lightning_rome.metrics.functional.counterfact import _paraphrase_magnitude_update

__all__ = ["ParaphraseMagnitude"]


class ParaphraseMagnitude(CaseMean):
    """Paraphrase magnitude PM: the mean of ``P[o*] - P[o^c]`` on the paraphrase prompts.

    Averaged over each case's prompts first, then over cases (as in ROME's and MEMIT's tables).
    ``compute()`` returns the mean as a fraction; ``compute_with_ci()`` adds the 95% interval;
    tables show both × 100.

    Args:
        score_type: what the inputs hold: ``"nll"`` (the mean per-token NLL of a target after
            the prompt, the default) or ``"prob"`` (``exp(-mean NLL)``).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> m = ParaphraseMagnitude(score_type="prob")
        >>> m.update(paraphrase_new=[[0.6, 0.2], [0.7]], paraphrase_true=[[0.3, 0.5], [0.1]])
        >>> m.compute()  # per case [0.0, 0.6]
        tensor(0.3000)
    """

    higher_is_better = True
    plot_lower_bound = -1.0
    plot_upper_bound = 1.0
    _state_prefix = "pm"
    evaluation_inputs = ("paraphrase_new", "paraphrase_true")

    def __init__(self, score_type: ScoreType = "nll", **kwargs: Any) -> None:
        _check_score_type(score_type)
        super().__init__(**kwargs)
        self.score_type = score_type

    def update(
        self,
        paraphrase_new: PromptScores | None = None,
        paraphrase_true: PromptScores | None = None,
    ) -> None:
        """Add a batch of cases.

        Args:
            paraphrase_new: scores of the new object ``o*`` on the paraphrase prompts: a
                tensor ``(N,)`` (one prompt per case), ``(N, P)``, or a list of ``N``
                per-case tensors ``(P_i,)``.
            paraphrase_true: scores of the true object ``o^c`` on the same prompts.

        Raises:
            ValueError: an input is missing, holds no case, the two disagree in shape, or a
                value is NaN, a negative NLL or a probability outside ``[0, 1]``.
        """
        self._missing(paraphrase_new=paraphrase_new, paraphrase_true=paraphrase_true)
        self._accumulate(
            _paraphrase_magnitude_update(paraphrase_new, paraphrase_true, self.score_type)
        )
