"""GE, the generation entropy (fluency), as a torchmetrics ``Metric``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_rome.metrics.base import CaseMean
from lightning_rome.metrics.functional.generation_entropy import _generation_entropy_update

__all__ = ["GenerationEntropy"]


class GenerationEntropy(CaseMean):
    """Generation entropy GE: the weighted bigram/trigram entropy of generated text.

    For each text, ``(2/3 · H_2 + 4/3 · H_3) / 2`` with ``H_n = -Σ f log₂ f`` over its word
    n-gram frequencies (words from
    :func:`~lightning_rome.metrics.functional.word_tokenize`); the mean over a case's texts, then
    over cases. ``compute()`` returns bits (about 6.27 for unedited GPT-2 XL); tables show × 100
    (626.6). Higher is more fluent (less repetitive).

    Args:
        ns: n-gram orders.
        weights: their weights.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> m = GenerationEntropy()
        >>> m.update(generated_texts=[["the cat sat on mat", "a a a a"]])
        >>> m.compute()
        tensor(0.8617)
    """

    higher_is_better = True
    plot_lower_bound = 0.0
    _state_prefix = "ge"
    evaluation_inputs = ("generated_texts",)

    def __init__(
        self,
        ns: Sequence[int] = (2, 3),
        weights: Sequence[float] = (2 / 3, 4 / 3),
        **kwargs: Any,
    ) -> None:
        if len(ns) != len(weights) or not ns or any(int(n) < 1 for n in ns):
            raise ValueError(
                f"ns and weights must be non-empty, of equal length, ns >= 1: {ns}, {weights}"
            )
        super().__init__(**kwargs)
        self.ns = tuple(int(n) for n in ns)
        self.weights = tuple(float(w) for w in weights)

    def update(self, generated_texts: Sequence[str | Sequence[str]] | None = None) -> None:
        """Add a batch of cases.

        Args:
            generated_texts: one entry per case: a generated text, or the list of the case's
                texts (one per generation prompt). ROME scores prompt + continuation.

        Raises:
            ValueError: missing input, no case, or a case without texts.
            TypeError: an entry that is not a str or a list of str.
        """
        self._missing(generated_texts=generated_texts)
        self._accumulate(_generation_entropy_update(generated_texts, self.ns, self.weights))
