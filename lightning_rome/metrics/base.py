"""Base classes: a mean over cases with a 95% confidence interval, synced across processes."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_rome.metrics.functional._utils import MetricCI, _mean_ci_from_sums

__all__ = ["CaseMean", "MetricWithCI"]


class MetricWithCI(Metric):
    """A metric whose ``compute()`` returns the mean and ``compute_with_ci()`` adds its interval.

    Subclasses implement :meth:`_compute_ci` on the (already synchronised) states.
    """

    #: The case inputs (names in :data:`lightning_rome.evaluation.INPUTS`) that the evaluation
    #: core passes to ``update(**inputs)``, all required: a case without one of them does not
    #: update the metric. ``None``: not fed from case records (:class:`CaseMean`'s ``values``
    #: are passed by the evaluator itself).
    evaluation_inputs: ClassVar[tuple[str, ...] | None] = None

    def compute_with_ci(self) -> MetricCI:
        """The mean over all cases seen (on every process) and its 95% confidence interval.

        Under DDP this synchronises the states like :meth:`compute`, so call it on every rank.

        Returns:
            ``{"mean": float, "ci_low": float, "ci_high": float, "n": int}`` in the metric's
            natural units (fractions; bits for GE). ``ci_low``/``ci_high`` are NaN for one case.

        Raises:
            ValueError: no case was seen.
        """
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn,
            should_sync=self._to_sync,
            should_unsync=self._should_unsync,
        ):
            return self._compute_ci()

    @abstractmethod
    def _compute_ci(self) -> MetricCI:
        """Mean and interval from the synchronised states."""

    def _missing(self, **inputs: Any) -> None:
        """Raise a clear error when a required update input was not given."""
        missing = [k for k, v in inputs.items() if v is None]
        if missing:
            raise ValueError(
                f"{type(self).__name__}.update() needs {', '.join(inputs)}; missing: "
                f"{', '.join(missing)}. (In a MetricCollection each metric takes the keyword "
                "inputs it names from the same update(**inputs) call.)"
            )


class CaseMean(MetricWithCI):
    """The mean over cases of one per-case value, with its 95% confidence interval.

    Used as it is for any per-case value (``update(values)``: one value per case; the evaluator's
    patch norms and edit times), and as the base of every edit metric (ES, PS, NS, GE, ...),
    which override :meth:`update` to turn their inputs into one value per case.

    The states are the number of cases, the sum and the sum of squares of the per-case values
    (float64, ``dist_reduce_fx="sum"``), so DDP needs no extra code and shards of any size
    combine exactly. State names carry the class's ``_state_prefix`` so that two different
    metrics never share a compute group inside a :class:`~torchmetrics.MetricCollection`.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    _state_prefix = "case"
    #: The interval: ``"normal"`` (mean ± 1.96 s.e., clipped to the metric's plot bounds when
    #: it has both) or ``"wilson"`` (success rates: the Wilson score interval inside them).
    ci_method: str = "normal"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        p = self._state_prefix
        self.add_state(f"{p}_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state(f"{p}_sum_sq", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state(f"{p}_count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def _accumulate(self, per_case: Tensor) -> None:
        """Add per-case values ``(N,)`` to the states."""
        p = self._state_prefix
        v = per_case.detach().to(device=self.device, dtype=torch.float64).reshape(-1)  # (N,)
        setattr(self, f"{p}_sum", getattr(self, f"{p}_sum") + v.sum())
        setattr(self, f"{p}_sum_sq", getattr(self, f"{p}_sum_sq") + (v * v).sum())
        setattr(self, f"{p}_count", getattr(self, f"{p}_count") + v.numel())

    def _sums(self) -> tuple[float, float, int]:
        p = self._state_prefix
        return (
            float(getattr(self, f"{p}_sum")),
            float(getattr(self, f"{p}_sum_sq")),
            int(getattr(self, f"{p}_count")),
        )

    def compute(self) -> Tensor:
        """The mean over cases (a float32 scalar, so ``self.log`` takes it).

        Raises:
            ValueError: no case was seen.
        """
        total, _, n = self._sums()
        if n == 0:
            raise ValueError(
                f"{type(self).__name__} has no cases to average: call update() with at least "
                "one case first"
            )
        return torch.tensor(total / n, dtype=torch.get_default_dtype(), device=self.device)

    def _compute_ci(self) -> MetricCI:
        total, total_sq, n = self._sums()
        if n == 0:
            raise ValueError(
                f"{type(self).__name__} has no cases to average: call update() with at least "
                "one case first"
            )
        lo = getattr(self, "plot_lower_bound", None)
        hi = getattr(self, "plot_upper_bound", None)
        bounds = (float(lo), float(hi)) if lo is not None and hi is not None else None
        return _mean_ci_from_sums(total, total_sq, n, bounds=bounds,
                                  wilson=self.ci_method == "wilson")

    def update(self, values: Tensor | Sequence[float]) -> None:
        """Add one value per case.

        Example:
            >>> m = CaseMean()
            >>> m.update([1.0, 0.0, 1.0])
            >>> m.update([1.0])
            >>> m.compute()
            tensor(0.7500)
            >>> {k: round(v, 4) for k, v in m.compute_with_ci().items()}
            {'mean': 0.75, 'ci_low': 0.26, 'ci_high': 1.24, 'n': 4}

        Raises:
            ValueError: no values, or NaN.
        """
        v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)  # (N,)
        if v.numel() == 0:
            raise ValueError(f"{type(self).__name__}.update() got no values; pass at least one "
                             "case")
        if torch.isnan(v).any():
            where = int(torch.isnan(v).nonzero()[0, 0])
            raise ValueError(f"{type(self).__name__}.update() got NaN at case {where}")
        self._accumulate(v)
