"""zsRE token-level accuracy (efficacy, paraphrase, specificity) as torchmetrics ``Metric``s."""

from __future__ import annotations

from typing import Any

from lightning_rome.metrics.base import CaseMean
from lightning_rome.metrics.functional.zsre import Correct, TokenIds, _zsre_accuracy_update

__all__ = ["ZsREAccuracy", "ZsREEfficacy", "ZsREParaphrase", "ZsRESpecificity"]


class ZsREAccuracy(CaseMean):
    """zsRE token-level accuracy: per case, the fraction of answer tokens that are the argmax
    after the question and the preceding answer tokens (teacher forcing); then the mean over cases.

    Used for efficacy (new answer, edited question), paraphrase (new answer, rephrased question)
    and specificity (gold answer, unrelated NQ question). :class:`ZsREEfficacy`,
    :class:`ZsREParaphrase` and :class:`ZsRESpecificity` are the same metric with prefixed
    input names, so that one ``MetricCollection.update(**inputs)`` feeds all three.

    Args:
        ignore_index: the padding value in ``target``.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> m = ZsREAccuracy()
        >>> m.update(preds=torch.tensor([[5, 7, 9]]), target=torch.tensor([[5, 7, 8]]))
        >>> m.update(correct=[[True]])
        >>> m.compute()  # (2/3 + 1) / 2
        tensor(0.8333)
    """

    higher_is_better = True
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0
    ci_method = "wilson"
    _state_prefix = "zsre"
    evaluation_inputs = None  # the forms below name their inputs

    def __init__(self, ignore_index: int = -100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ignore_index = int(ignore_index)

    def update(
        self,
        preds: TokenIds | None = None,
        target: TokenIds | None = None,
        correct: Correct | None = None,
    ) -> None:
        """Add a batch of cases: ``preds`` and ``target``, or ``correct``.

        Args:
            preds: predicted token ids ``(N, T)``, logits ``(N, T, V)`` or per-case lists.
            target: answer token ids ``(N, T)`` (``ignore_index`` = padding) or per-case lists.
            correct: instead, a bool mask ``(N, T)`` or per-case lists of bools.

        Raises:
            ValueError: both or neither form, mismatched shapes, a case without answer tokens.
        """
        self._accumulate(_zsre_accuracy_update(preds, target, correct, self.ignore_index))

    def _routed_update(
        self, kind: str, preds: TokenIds | None, target: TokenIds | None, correct: Correct | None
    ) -> None:
        if preds is None and target is None and correct is None:
            raise ValueError(
                f"{type(self).__name__}.update() needs {kind}_preds and {kind}_target, or "
                f"{kind}_correct. (In a MetricCollection each metric takes the keyword inputs it "
                "names from the same update(**inputs) call.)"
            )
        ZsREAccuracy.update(self, preds, target, correct)


class ZsREEfficacy(ZsREAccuracy):
    """zsRE efficacy: :class:`ZsREAccuracy` on the edited question (inputs ``rewrite_*``)."""

    _state_prefix = "zsre_efficacy"
    evaluation_inputs = ("rewrite_correct",)

    def update(  # type: ignore[override]
        self,
        rewrite_preds: TokenIds | None = None,
        rewrite_target: TokenIds | None = None,
        rewrite_correct: Correct | None = None,
    ) -> None:
        """As :meth:`ZsREAccuracy.update`, with inputs named ``rewrite_*``."""
        self._routed_update("rewrite", rewrite_preds, rewrite_target, rewrite_correct)


class ZsREParaphrase(ZsREAccuracy):
    """zsRE paraphrase: :class:`ZsREAccuracy` on the rephrased question (``paraphrase_*``)."""

    _state_prefix = "zsre_paraphrase"
    evaluation_inputs = ("paraphrase_correct",)

    def update(  # type: ignore[override]
        self,
        paraphrase_preds: TokenIds | None = None,
        paraphrase_target: TokenIds | None = None,
        paraphrase_correct: Correct | None = None,
    ) -> None:
        """As :meth:`ZsREAccuracy.update`, with inputs named ``paraphrase_*``."""
        self._routed_update("paraphrase", paraphrase_preds, paraphrase_target, paraphrase_correct)


class ZsRESpecificity(ZsREAccuracy):
    """zsRE specificity: :class:`ZsREAccuracy` on the unrelated NQ question and its gold answer
    (inputs ``neighborhood_*``, ROME's name for these prompts)."""

    _state_prefix = "zsre_specificity"
    evaluation_inputs = ("neighborhood_correct",)

    def update(  # type: ignore[override]
        self,
        neighborhood_preds: TokenIds | None = None,
        neighborhood_target: TokenIds | None = None,
        neighborhood_correct: Correct | None = None,
    ) -> None:
        """As :meth:`ZsREAccuracy.update`, with inputs named ``neighborhood_*``."""
        self._routed_update(
            "neighborhood", neighborhood_preds, neighborhood_target, neighborhood_correct
        )
