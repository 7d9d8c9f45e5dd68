"""The COUNTERFACT edit score S: the harmonic mean of ES, PS and NS.

As in the papers' tables (and ``summarize.py``), S is the harmonic mean of the three *case
averages* ES, PS and NS, not an average of per-case harmonic means. ROME and MEMIT report S
without an interval; the interval given here is a delta-method approximation (see
:func:`_edit_score_compute`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_rome.metrics.functional._utils import Z_95, MetricCI, PromptScores, ScoreType
from lightning_rome.metrics.functional.counterfact import (
    _efficacy_score_update,
    _neighborhood_score_update,
    _paraphrase_score_update,
)

__all__ = ["edit_score", "harmonic_mean"]


def harmonic_mean(values: Tensor) -> Tensor:
    """Harmonic mean of non-negative values ``(K,)``; 0 when any is 0 (as ``scipy.stats.hmean``).

    Example:
        >>> harmonic_mean(torch.tensor([1.0, 0.5, 0.25]))
        tensor(0.4286)
    """
    v = values.to(torch.float64)  # (K,)
    if (v < 0).any() or torch.isnan(v).any():
        raise ValueError(f"harmonic_mean needs non-negative values, got {values.tolist()}")
    if (v == 0).any():
        return torch.zeros((), dtype=values.dtype)
    return (v.numel() / (1.0 / v).sum()).to(values.dtype)


def _edit_score_update(
    rewrite_new: PromptScores,
    rewrite_true: PromptScores,
    paraphrase_new: PromptScores,
    paraphrase_true: PromptScores,
    neighborhood_new: PromptScores,
    neighborhood_true: PromptScores,
    score_type: ScoreType = "nll",
) -> Tensor:
    """Per-case ``(ES, PS, NS)`` triples: ``(N, 3)`` float64.

    Raises:
        ValueError: the three prompt kinds cover different numbers of cases.
    """
    es = _efficacy_score_update(rewrite_new, rewrite_true, score_type)  # (N,)
    ps = _paraphrase_score_update(paraphrase_new, paraphrase_true, score_type)  # (N,)
    ns = _neighborhood_score_update(neighborhood_new, neighborhood_true, score_type)  # (N,)
    if not es.numel() == ps.numel() == ns.numel():
        raise ValueError(
            "the rewrite, paraphrase and neighborhood scores must cover the same cases, got "
            f"{es.numel()}, {ps.numel()} and {ns.numel()} cases"
        )
    return torch.stack([es, ps.to(es.device), ns.to(es.device)], dim=1)  # (N, 3)


def _edit_score_compute(total: Tensor, outer: Tensor, n: int, z: float = Z_95) -> MetricCI:
    """S and its delta-method 95% interval from per-case sums.

    Args:
        total: ``(3,)`` sums over cases of ``(ES, PS, NS)``.
        outer: ``(3, 3)`` sums over cases of the outer products of the triples.
        n: number of cases.
        z: the normal quantile.

    With the case means ``m = (a, b, c)``, ``S = 3abc / (ab + bc + ca)`` and its gradient
    ``g_a = 3 (bc)^2 / (ab + bc + ca)^2`` (cyclically). The variance of S is approximated by
    ``g^T Σ g / n`` with ``Σ`` the sample covariance (ddof=1) of the per-case triples. When two or
    more means are 0, S = 0 and the gradient is taken as 0.
    """
    if n <= 0:
        raise ValueError("no cases to average: call update() with at least one case first")
    m = total.to(torch.float64) / n  # (3,)
    a, b, c = (float(x) for x in m)
    denom = a * b + b * c + c * a
    s = 3.0 * a * b * c / denom if denom > 0 else 0.0
    if n == 1:
        return MetricCI(mean=s, ci_low=math.nan, ci_high=math.nan, n=n)
    if denom > 0:
        g = torch.tensor([(b * c) ** 2, (c * a) ** 2, (a * b) ** 2], dtype=torch.float64)
        g = 3.0 * g / denom**2  # (3,)
    else:
        g = torch.zeros(3, dtype=torch.float64)
    cov = (outer.to(torch.float64) - n * torch.outer(m, m)) / (n - 1)  # (3, 3)
    var = max(float(g @ cov @ g), 0.0) / n
    half = z * math.sqrt(var)
    # S is a harmonic mean of rates: the delta-method interval is clipped to [0, 1].
    return MetricCI(mean=s, ci_low=max(s - half, 0.0), ci_high=min(s + half, 1.0), n=n)


def edit_score(
    rewrite_new: PromptScores,
    rewrite_true: PromptScores,
    paraphrase_new: PromptScores,
    paraphrase_true: PromptScores,
    neighborhood_new: PromptScores,
    neighborhood_true: PromptScores,
    score_type: ScoreType = "nll",
) -> Tensor:
    """Edit score S: the harmonic mean of ES, PS and NS (each averaged over cases first).

    Args:
        rewrite_new, rewrite_true: scores of ``o*`` and ``o^c`` on the rewrite prompts.
        paraphrase_new, paraphrase_true: the same on the paraphrase prompts.
        neighborhood_new, neighborhood_true: the same on the neighborhood prompts.
        score_type: ``"nll"`` (default) or ``"prob"``. Input forms as in
            :func:`~lightning_rome.metrics.functional.efficacy_score`.

    Returns:
        S as a fraction in ``[0, 1]``.

    Example:
        >>> # ES = 1, PS = 0.5, NS = 0.5 over two cases (probabilities)
        >>> edit_score([0.9, 0.8], [0.1, 0.1], [0.9, 0.1], [0.1, 0.8],
        ...            [0.1, 0.9], [0.8, 0.1], score_type="prob")
        tensor(0.6000)
    """
    triples = _edit_score_update(
        rewrite_new,
        rewrite_true,
        paraphrase_new,
        paraphrase_true,
        neighborhood_new,
        neighborhood_true,
        score_type,
    )  # (N, 3)
    return harmonic_mean(triples.mean(dim=0)).to(torch.get_default_dtype())
