"""Reference score RS (consistency): TF-IDF similarity of generated text to reference text.

Definition (ROME, §3.2; the released ``test_generation``): for one case, join the texts generated
from its generation prompts with spaces, join the reference texts (the attribute snippets of
other subjects sharing the relation and the *new* object, ``snips[r][o*]``) with spaces, and take
the cosine similarity of their unigram TF-IDF vectors. RS is the mean over cases, a fraction in
``[0, 1]``; tables multiply by 100.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_rome.metrics.functional.generation_entropy import _as_case_texts
from lightning_rome.metrics.functional.tfidf import TfidfTable

__all__ = ["reference_score"]


def _reference_score_update(
    generated_texts: Sequence[str | Sequence[str]],
    reference_texts: Sequence[str | Sequence[str]],
    tfidf: TfidfTable,
) -> Tensor:
    """Per-case RS: ``cos(tfidf(" ".join(generated)), tfidf(" ".join(references)))``, ``(N,)``.

    Raises:
        ValueError: no cases, a case without texts, or different numbers of cases.
    """
    gen = _as_case_texts(generated_texts, "generated_texts")
    ref = _as_case_texts(reference_texts, "reference_texts")
    if len(gen) != len(ref):
        raise ValueError(
            f"generated_texts and reference_texts must cover the same cases, got {len(gen)} "
            f"and {len(ref)}"
        )
    scores = [tfidf.similarity(" ".join(g), " ".join(r)) for g, r in zip(gen, ref)]
    return torch.tensor(scores, dtype=torch.float64)  # (N,)


def reference_score(
    generated_texts: Sequence[str | Sequence[str]],
    reference_texts: Sequence[str | Sequence[str]],
    tfidf: TfidfTable,
) -> Tensor:
    """Reference score RS: mean over cases of the TF-IDF cosine similarity to the references.

    Args:
        generated_texts: one entry per case: a text or the list of the case's generated texts.
        reference_texts: one entry per case: the reference text(s), e.g.
            ``AttributeSnippets.texts(relation_id, target_new_id)``.
        tfidf: the IDF table (ROME's released one, or :meth:`TfidfTable.fit` on a corpus).

    Returns:
        RS as a fraction in ``[0, 1]``.

    Example:
        >>> table = TfidfTable.fit(["the cat sat", "the dog sat", "a bird sang"])
        >>> reference_score(["The cat sat.", "a bird"], [["the dog sat"], "bird sang"], table)
        tensor(0.6217)
    """
    return (
        _reference_score_update(generated_texts, reference_texts, tfidf)
        .mean()
        .to(torch.get_default_dtype())
    )
