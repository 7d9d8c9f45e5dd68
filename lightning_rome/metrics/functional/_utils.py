"""Shared helpers of the functional metrics: input normalisation and mean ± CI arithmetic.

Every edit-quality metric is a mean over *cases* (one requested rewrite and its prompts). The
helpers here turn the accepted input forms into one flat tensor of per-prompt values plus a
case index, so that each metric can average over a case's prompts first and then over cases,
the way ROME's and MEMIT's ``summarize.py`` do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, TypedDict

import torch
from torch import Tensor

__all__ = ["Z_95", "MetricCI", "PromptScores", "ScoreType", "mean_ci", "wilson_interval"]

#: The normal quantile of a two-sided 95% interval: mean ± 1.96 standard errors.
Z_95 = 1.96

ScoreType = Literal["nll", "prob"]

#: Per-prompt scores of a batch of cases: a tensor ``(N,)`` (one prompt per case), a tensor
#: ``(N, P)`` (``P`` prompts per case), or a sequence of ``N`` per-case tensors/lists ``(P_i,)``.
PromptScores = Tensor | Sequence[Tensor | Sequence[float] | float]


class MetricCI(TypedDict):
    """A mean over cases with its 95% confidence interval.

    By default the normal interval ``mean ± 1.96·s/√n`` (``s``: the sample standard deviation
    over cases, ``ddof=1``), clipped to the metric's range where it has one (the magnitudes to
    [-1, 1], S to [0, 1]). The success rates (ES, PS, NS, zsRE accuracies) use the Wilson score
    interval, which stays inside [0, 1] and is not degenerate at 0 or 1 (see
    :func:`wilson_interval`). Either way the interval may be asymmetric. With a single case the
    interval is undefined and ``ci_low``/``ci_high`` are NaN.
    """

    mean: float
    ci_low: float
    ci_high: float
    n: int


def _flatten_cases(x: PromptScores, name: str) -> tuple[Tensor, Tensor, int]:
    """Flatten per-case prompt scores.

    Returns:
        ``values (M,)`` float64, ``case (M,)`` int64 (the case each value belongs to) and the
        number of cases ``N``.

    Raises:
        ValueError: no cases, a case without prompts, or a tensor of rank other than 1 or 2.
        TypeError: an element that is not a number, list or tensor.
    """
    if isinstance(x, Tensor):
        if x.ndim == 1:
            x = x[:, None]  # (N, 1)
        if x.ndim != 2:
            raise ValueError(
                f"{name} must be a tensor (N,) or (N, P) or a list of per-case tensors, "
                f"got a tensor of shape {tuple(x.shape)}"
            )
        n, p = x.shape
        if n == 0:
            raise ValueError(f"{name} holds no cases (shape {tuple(x.shape)}); pass at least one")
        if p == 0:
            raise ValueError(f"{name} has cases without prompts (shape {tuple(x.shape)})")
        values = x.detach().to(torch.float64).reshape(-1)  # (N * P,)
        case = torch.arange(n, device=x.device).repeat_interleave(p)  # (N * P,)
        return values, case, n
    if isinstance(x, str | bytes) or not isinstance(x, Sequence):
        raise TypeError(
            f"{name} must be a tensor or a sequence of per-case scores, got {type(x).__name__}"
        )
    if len(x) == 0:
        raise ValueError(f"{name} holds no cases (an empty sequence); pass at least one")
    parts: list[Tensor] = []
    for i, item in enumerate(x):
        if isinstance(item, Tensor):
            t = item.detach().to(torch.float64).reshape(-1)
        elif isinstance(item, int | float) and not isinstance(item, bool):
            t = torch.tensor([float(item)], dtype=torch.float64)
        elif isinstance(item, Sequence) and not isinstance(item, str | bytes):
            try:
                t = torch.tensor([float(v) for v in item], dtype=torch.float64)
            except (TypeError, ValueError) as err:
                raise TypeError(f"{name}[{i}] must hold numbers, got {item!r}") from err
        else:
            raise TypeError(
                f"{name}[{i}] must be a number, a list of numbers or a tensor, "
                f"got {type(item).__name__}"
            )
        if t.numel() == 0:
            raise ValueError(
                f"{name}[{i}] (case {i}) has no prompts; every case needs at least one"
            )
        parts.append(t)
    device = parts[0].device
    values = torch.cat([t.to(device) for t in parts])  # (M,)
    counts = torch.tensor([t.numel() for t in parts], device=device)  # (N,)
    case = torch.arange(len(parts), device=device).repeat_interleave(counts)  # (M,)
    return values, case, len(parts)


def _check_scores(values: Tensor, case: Tensor, name: str, score_type: ScoreType) -> None:
    """Reject NaN, negative NLLs and probabilities outside [0, 1], naming the first bad case."""
    bad = torch.isnan(values)
    what = "NaN"
    if not bad.any():
        if score_type == "nll":
            bad, what = values < 0, "a negative NLL"
        else:
            bad, what = (values < 0) | (values > 1), "a probability outside [0, 1]"
    if bad.any():
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{name} contains {what} (case {int(case[first])}: {float(values[first])}); "
            f"expected {'mean NLLs >= 0' if score_type == 'nll' else 'probabilities in [0, 1]'}"
        )


def _check_score_type(score_type: str) -> None:
    if score_type not in ("nll", "prob"):
        raise ValueError(f"score_type must be 'nll' or 'prob', got {score_type!r}")


def _paired_scores(
    new: PromptScores, true: PromptScores, names: tuple[str, str], score_type: ScoreType
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Flatten and validate the scores of ``o*`` and ``o^c`` on the same prompts.

    Returns:
        ``p_new (M,)``, ``p_true (M,)`` as probabilities ``exp(-mean NLL)`` (float64), the case
        index ``(M,)`` and the number of cases.
    """
    _check_score_type(score_type)
    v_new, case_new, n_new = _flatten_cases(new, names[0])
    v_true, case_true, n_true = _flatten_cases(true, names[1])
    if (
        n_new != n_true
        or v_new.shape != v_true.shape
        or not torch.equal(case_new.cpu(), case_true.cpu())
    ):
        counts_new = torch.bincount(case_new.cpu(), minlength=n_new).tolist()
        counts_true = torch.bincount(case_true.cpu(), minlength=n_true).tolist()
        raise ValueError(
            f"{names[0]} and {names[1]} must score the same prompts: {n_new} vs {n_true} cases, "
            f"prompts per case {counts_new} vs {counts_true}"
        )
    _check_scores(v_new, case_new, names[0], score_type)
    _check_scores(v_true, case_true, names[1], score_type)
    v_true = v_true.to(v_new.device)
    if score_type == "nll":
        return torch.exp(-v_new), torch.exp(-v_true), case_new, n_new
    return v_new, v_true, case_new, n_new


def _case_means(values: Tensor, case: Tensor, n_cases: int) -> Tensor:
    """Mean of ``values (M,)`` within each case: ``(N,)`` float64."""
    total = torch.zeros(n_cases, dtype=torch.float64, device=values.device)
    total.index_add_(0, case, values.to(torch.float64))  # (N,)
    counts = torch.bincount(case, minlength=n_cases).to(torch.float64)  # (N,)
    return total / counts


def _case_mean_compute(per_case: Tensor) -> Tensor:
    """The mean over cases of per-case values ``(N,)``, as a float32 scalar."""
    if per_case.numel() == 0:
        raise ValueError("no cases to average: pass at least one case")
    return per_case.to(torch.float64).mean().to(torch.get_default_dtype())


def wilson_interval(p: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``p`` observed over ``n`` cases.

    ``(p + z²/2n ± z·√(p(1-p)/n + z²/4n²)) / (1 + z²/n)``: always inside [0, 1], and of
    non-zero width at ``p = 0`` or ``1`` (Wilson 1927; Brown, Cai & DasGupta 2001). For per-case
    values that are fractions in [0, 1] rather than 0/1 (several prompts per case), it is
    conservative: such values have a variance of at most ``p(1-p)``.

    Example:
        >>> [round(x, 4) for x in wilson_interval(1.0, 10)]
        [0.7225, 1.0]
    """
    if n <= 0:
        raise ValueError(f"wilson_interval needs n >= 1, got {n}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"wilson_interval needs a proportion in [0, 1], got {p}")
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n)) / denom
    # It always holds p; min/max only undo rounding (p = 1 gives 0.9999999999999999).
    return max(0.0, min(centre - half, p)), min(1.0, max(centre + half, p))


def _mean_ci_from_sums(total: float, total_sq: float, n: int, z: float = Z_95, *,
                       bounds: tuple[float, float] | None = None,
                       wilson: bool = False) -> MetricCI:
    """Mean and interval from the sum and the sum of squares of ``n`` values: ``z`` standard
    errors either side, clipped to ``bounds``; or with ``wilson``, the Wilson interval of the
    mean rescaled from ``bounds`` (default ``(0, 1)``) to [0, 1]."""
    if n <= 0:
        raise ValueError("no cases to average: call update() with at least one case first")
    mean = total / n
    if n == 1:
        return MetricCI(mean=mean, ci_low=math.nan, ci_high=math.nan, n=n)
    if wilson:
        lo, hi = bounds or (0.0, 1.0)
        p = min(max((mean - lo) / (hi - lo), 0.0), 1.0)
        a, b = wilson_interval(p, n, z)
        return MetricCI(mean=mean, ci_low=lo + a * (hi - lo), ci_high=lo + b * (hi - lo), n=n)
    var = max(total_sq - n * mean * mean, 0.0) / (n - 1)  # sample variance, ddof=1
    half = z * math.sqrt(var / n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return MetricCI(mean=mean, ci_low=low, ci_high=high, n=n)


def mean_ci(values: Tensor | Sequence[float], z: float = Z_95) -> MetricCI:
    """Mean and 95% confidence interval of per-case values.

    Args:
        values: one value per case.
        z: the normal quantile (1.96 for 95%).

    Returns:
        ``{"mean", "ci_low", "ci_high", "n"}``; ``ci_low``/``ci_high`` are NaN for one case.

    Example:
        >>> r = mean_ci([1.0, 0.0, 1.0, 1.0])
        >>> round(r["mean"], 4), round(r["ci_low"], 4), round(r["ci_high"], 4), r["n"]
        (0.75, 0.26, 1.24, 4)
    """
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)  # (N,)
    if torch.isnan(v).any():
        raise ValueError("mean_ci got NaN values")
    return _mean_ci_from_sums(float(v.sum()), float((v * v).sum()), v.numel(), z)
