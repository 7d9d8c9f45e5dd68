"""RS, the reference score (consistency), as a torchmetrics ``Metric``."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lightning_rome.metrics.base import CaseMean
from lightning_rome.metrics.functional.reference_score import _reference_score_update
from lightning_rome.metrics.functional.tfidf import AttributeSnippets, TfidfTable

__all__ = ["ReferenceScore"]


class ReferenceScore(CaseMean):
    """Reference score RS: TF-IDF cosine similarity of generated text to reference text.

    Per case: the case's generated texts joined with spaces against the reference texts joined
    with spaces, compared as unigram TF-IDF vectors; the mean over cases (a fraction, tables ×
    100). The references are the attribute snippets of other subjects sharing the relation and
    the *new* object, ``snippets.texts(relation_id, target_new_id)``; pass them directly as
    ``reference_texts`` or let the metric look them up from ``relation_ids``/``target_new_ids``.

    Args:
        tfidf: the IDF table: a :class:`TfidfTable`, or a folder holding ROME's ``idf.npy`` and
            ``tfidf_vocab.json``. ``None`` fits one on the snippet texts, as ROME does when the
            released files are missing.
        snippets: ROME's attribute snippets: an :class:`AttributeSnippets` or the path of
            ``attribute_snippets.json``. Needed for look-ups by id, or when ``tfidf`` is ``None``.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Raises:
        ValueError: neither ``tfidf`` nor ``snippets`` is given.

    Example:
        >>> m = ReferenceScore.fit(["the cat sat", "the dog sat", "a bird sang"])
        >>> m.update(generated_texts=["The cat sat."], reference_texts=[["the dog sat"]])
        >>> m.compute()
        tensor(0.5363)
    """

    higher_is_better = True
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0
    _state_prefix = "rs"
    evaluation_inputs = ("generated_texts", "relation_ids", "target_new_ids")

    def __init__(
        self,
        tfidf: TfidfTable | str | os.PathLike[str] | None = None,
        snippets: AttributeSnippets | str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if snippets is not None and not isinstance(snippets, AttributeSnippets):
            snippets = AttributeSnippets.load(snippets)
        if tfidf is None:
            if snippets is None:
                raise ValueError(
                    "ReferenceScore needs an IDF table: pass tfidf= (a TfidfTable or a folder "
                    "with idf.npy and tfidf_vocab.json), or snippets= to fit one on their texts"
                )
            tfidf = TfidfTable.fit(snippets.documents())
        elif not isinstance(tfidf, TfidfTable):
            tfidf = TfidfTable.from_dir(Path(tfidf))
        self.tfidf = tfidf
        self.snippets = snippets

    @classmethod
    def fit(cls, corpus: Iterable[str], **kwargs: Any) -> ReferenceScore:
        """A reference score whose IDF table is fitted on ``corpus`` (scikit-learn's defaults)."""
        return cls(tfidf=TfidfTable.fit(corpus), **kwargs)

    def update(
        self,
        generated_texts: Sequence[str | Sequence[str]] | None = None,
        reference_texts: Sequence[str | Sequence[str]] | None = None,
        relation_ids: Sequence[str] | None = None,
        target_new_ids: Sequence[str] | None = None,
    ) -> None:
        """Add a batch of cases.

        Args:
            generated_texts: one entry per case: a text or the list of the case's texts.
            reference_texts: one entry per case: the reference text(s). When ``None``, they are
                looked up in ``snippets`` by ``relation_ids`` and ``target_new_ids``.
            relation_ids: per case, the relation id ``r`` (e.g. ``"P103"``).
            target_new_ids: per case, the id of the new object ``o*`` (e.g. ``"Q1860"``).

        Raises:
            ValueError: missing inputs, no case, mismatched case counts, or no snippet for a
                case's ``(r, o*)``.
        """
        self._missing(generated_texts=generated_texts)
        if reference_texts is None:
            if self.snippets is None or relation_ids is None or target_new_ids is None:
                raise ValueError(
                    "ReferenceScore.update() needs reference_texts, or relation_ids and "
                    "target_new_ids together with snippets= given to the constructor"
                )
            reference_texts = self._lookup(relation_ids, target_new_ids)
        self._accumulate(_reference_score_update(generated_texts, reference_texts, self.tfidf))

    def _lookup(self, relation_ids: Sequence[str], target_ids: Sequence[str]) -> list[list[str]]:
        assert self.snippets is not None
        if isinstance(relation_ids, str) or isinstance(target_ids, str):
            raise TypeError("relation_ids and target_new_ids must be sequences, one id per case")
        if len(relation_ids) != len(target_ids):
            raise ValueError(
                f"relation_ids and target_new_ids must cover the same cases, got "
                f"{len(relation_ids)} and {len(target_ids)}"
            )
        refs = []
        for i, (rid, tid) in enumerate(zip(relation_ids, target_ids)):
            texts = self.snippets.texts(rid, tid)
            if not texts:
                raise ValueError(
                    f"no attribute snippets for case {i}: relation {rid!r}, object {tid!r}"
                )
            refs.append(texts)
        return refs
