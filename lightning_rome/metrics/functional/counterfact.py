"""COUNTERFACT probability metrics: efficacy, paraphrase and neighborhood scores and magnitudes.

Definitions (Meng et al., 2022, §3 and Appendix; the same in MEMIT), with ``P = exp(-mean NLL)``
of a target's tokens teacher-forced after the prompt (targets take a leading space):

- **ES** (efficacy score): on the rewrite prompt(s), the fraction with ``P[o*] > P[o^c]``.
- **EM** (efficacy magnitude): on the rewrite prompt(s), the mean of ``P[o*] - P[o^c]``.
- **PS / PM**: the same on the paraphrase prompts.
- **NS** (neighborhood score): on the neighborhood prompts (other subjects whose true object is
  ``o^c``), the fraction with ``P[o^c] > P[o*]``; **NM** the mean of ``P[o^c] - P[o*]``.

Averaging follows the published ``summarize.py``: first over the prompts of one case (e.g. the 2
paraphrase or 10 neighborhood prompts of a COUNTERFACT record), then over cases. Ties count as
failures (a strict inequality). Values are fractions in ``[0, 1]`` (magnitudes in ``[-1, 1]``);
tables multiply by 100 (see :func:`lightning_rome.metrics.summary_table`).

Each ``*_update`` helper returns the per-case values ``(N,)`` in float64; the public functions
return their mean over cases as a float32 scalar.
"""

from __future__ import annotations

from torch import Tensor

from lightning_rome.metrics.functional._utils import (
    PromptScores,
    ScoreType,
    _case_mean_compute,
    _case_means,
    _paired_scores,
)

__all__ = [
    "efficacy_magnitude",
    "efficacy_score",
    "neighborhood_magnitude",
    "neighborhood_score",
    "paraphrase_magnitude",
    "paraphrase_score",
]


def _comparison_update(
    new: PromptScores,
    true: PromptScores,
    names: tuple[str, str],
    score_type: ScoreType,
    *,
    prefer_new: bool,
    magnitude: bool,
) -> Tensor:
    """Per-case success rate (or probability margin) of the preferred target: ``(N,)``."""
    p_new, p_true, case, n = _paired_scores(new, true, names, score_type)  # (M,), (M,), (M,)
    p_good, p_bad = (p_new, p_true) if prefer_new else (p_true, p_new)
    per_prompt = (p_good - p_bad) if magnitude else (p_good > p_bad).double()  # (M,)
    return _case_means(per_prompt, case, n)  # (N,)


def _efficacy_score_update(
    rewrite_new: PromptScores, rewrite_true: PromptScores, score_type: ScoreType = "nll"
) -> Tensor:
    """Per-case ES: the fraction of the case's rewrite prompts with ``P[o*] > P[o^c]``."""
    return _comparison_update(
        rewrite_new,
        rewrite_true,
        ("rewrite_new", "rewrite_true"),
        score_type,
        prefer_new=True,
        magnitude=False,
    )


def _efficacy_magnitude_update(
    rewrite_new: PromptScores, rewrite_true: PromptScores, score_type: ScoreType = "nll"
) -> Tensor:
    """Per-case EM: the mean over the case's rewrite prompts of ``P[o*] - P[o^c]``."""
    return _comparison_update(
        rewrite_new,
        rewrite_true,
        ("rewrite_new", "rewrite_true"),
        score_type,
        prefer_new=True,
        magnitude=True,
    )


def _paraphrase_score_update(
    paraphrase_new: PromptScores, paraphrase_true: PromptScores, score_type: ScoreType = "nll"
) -> Tensor:
    """Per-case PS: the fraction of the case's paraphrase prompts with ``P[o*] > P[o^c]``."""
    return _comparison_update(
        paraphrase_new,
        paraphrase_true,
        ("paraphrase_new", "paraphrase_true"),
        score_type,
        prefer_new=True,
        magnitude=False,
    )


def _paraphrase_magnitude_update(
    paraphrase_new: PromptScores, paraphrase_true: PromptScores, score_type: ScoreType = "nll"
) -> Tensor:
    """Per-case PM: the mean over the case's paraphrase prompts of ``P[o*] - P[o^c]``."""
    return _comparison_update(
        paraphrase_new,
        paraphrase_true,
        ("paraphrase_new", "paraphrase_true"),
        score_type,
        prefer_new=True,
        magnitude=True,
    )


def _neighborhood_score_update(
    neighborhood_new: PromptScores, neighborhood_true: PromptScores, score_type: ScoreType = "nll"
) -> Tensor:
    """Per-case NS: the fraction of the case's neighborhood prompts with ``P[o^c] > P[o*]``."""
    return _comparison_update(
        neighborhood_new,
        neighborhood_true,
        ("neighborhood_new", "neighborhood_true"),
        score_type,
        prefer_new=False,
        magnitude=False,
    )


def _neighborhood_magnitude_update(
    neighborhood_new: PromptScores, neighborhood_true: PromptScores, score_type: ScoreType = "nll"
) -> Tensor:
    """Per-case NM: the mean over the case's neighborhood prompts of ``P[o^c] - P[o*]``."""
    return _comparison_update(
        neighborhood_new,
        neighborhood_true,
        ("neighborhood_new", "neighborhood_true"),
        score_type,
        prefer_new=False,
        magnitude=True,
    )


def efficacy_score(
    rewrite_new: PromptScores, rewrite_true: PromptScores, score_type: ScoreType = "nll"
) -> Tensor:
    """Efficacy score ES: the fraction of rewrite prompts where ``P[o*] > P[o^c]``.

    Args:
        rewrite_new: per-prompt scores of the new object ``o*`` on the rewrite prompts: a tensor
            ``(N,)`` (one prompt per case), ``(N, P)``, or a list of ``N`` per-case ``(P_i,)``.
        rewrite_true: the same for the true object ``o^c``, on the same prompts.
        score_type: ``"nll"`` (mean per-token NLL, the default) or ``"prob"`` (``exp(-NLL)``).

    Returns:
        The mean over cases of each case's success rate, a fraction in ``[0, 1]``.

    Raises:
        ValueError: no cases, mismatched shapes, NaN, a negative NLL or a probability > 1.

    Example:
        >>> import torch
        >>> efficacy_score(torch.tensor([0.5, 3.0, 1.0]), torch.tensor([2.0, 1.0, 4.0]))
        tensor(0.6667)
    """
    return _case_mean_compute(_efficacy_score_update(rewrite_new, rewrite_true, score_type))


def efficacy_magnitude(
    rewrite_new: PromptScores, rewrite_true: PromptScores, score_type: ScoreType = "nll"
) -> Tensor:
    """Efficacy magnitude EM: the mean of ``P[o*] - P[o^c]`` on the rewrite prompts.

    Args and raises as :func:`efficacy_score`.

    Example:
        >>> efficacy_magnitude([0.9, 0.2], [0.1, 0.4], score_type="prob")
        tensor(0.3000)
    """
    return _case_mean_compute(_efficacy_magnitude_update(rewrite_new, rewrite_true, score_type))


def paraphrase_score(
    paraphrase_new: PromptScores, paraphrase_true: PromptScores, score_type: ScoreType = "nll"
) -> Tensor:
    """Paraphrase score PS: ES on the paraphrase prompts (per case first, then over cases).

    Args and raises as :func:`efficacy_score`.

    Example:
        >>> # case 0 has two paraphrases (one succeeds), case 1 has one (succeeds)
        >>> paraphrase_score([[0.6, 0.2], [0.7]], [[0.3, 0.5], [0.1]], score_type="prob")
        tensor(0.7500)
    """
    return _case_mean_compute(_paraphrase_score_update(paraphrase_new, paraphrase_true, score_type))


def paraphrase_magnitude(
    paraphrase_new: PromptScores, paraphrase_true: PromptScores, score_type: ScoreType = "nll"
) -> Tensor:
    """Paraphrase magnitude PM: EM on the paraphrase prompts.

    Args and raises as :func:`efficacy_score`.

    Example:
        >>> paraphrase_magnitude([[0.6, 0.2], [0.7]], [[0.3, 0.5], [0.1]], score_type="prob")
        tensor(0.3000)
    """
    return _case_mean_compute(
        _paraphrase_magnitude_update(paraphrase_new, paraphrase_true, score_type)
    )


def neighborhood_score(
    neighborhood_new: PromptScores, neighborhood_true: PromptScores, score_type: ScoreType = "nll"
) -> Tensor:
    """Neighborhood score NS: the fraction of neighborhood prompts where ``P[o^c] > P[o*]``.

    Args:
        neighborhood_new: scores of ``o*`` on the neighborhood prompts (forms as in
            :func:`efficacy_score`).
        neighborhood_true: scores of ``o^c`` on the same prompts.
        score_type: ``"nll"`` or ``"prob"``.

    Example:
        >>> neighborhood_score([[0.1, 0.5]], [[0.4, 0.3]], score_type="prob")
        tensor(0.5000)
    """
    return _case_mean_compute(
        _neighborhood_score_update(neighborhood_new, neighborhood_true, score_type)
    )


def neighborhood_magnitude(
    neighborhood_new: PromptScores, neighborhood_true: PromptScores, score_type: ScoreType = "nll"
) -> Tensor:
    """Neighborhood magnitude NM: the mean of ``P[o^c] - P[o*]`` on the neighborhood prompts.

    Args and raises as :func:`neighborhood_score`.

    Example:
        >>> neighborhood_magnitude([[0.1, 0.5]], [[0.4, 0.3]], score_type="prob")
        tensor(0.0500)
    """
    return _case_mean_compute(
        _neighborhood_magnitude_update(neighborhood_new, neighborhood_true, score_type)
    )
