"""The uncentred second moment ``C = E[k kᵀ]`` of a module's input, as mergeable running sums."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["SecondMoment", "add_gram"]

_BLOCKS = 8  # column blocks of the symmetric product
_BLOCKED_MIN_D = 1024  # below this dimension (or few rows) one addmm is as fast
_BLOCKED_MIN_N = 64


@torch.no_grad()
def add_gram(S: Tensor, k: Tensor) -> None:
    """``S += kᵀ k`` in place, for a symmetric ``S`` ``(d, d)`` and keys ``k`` ``(n, d)`` of
    the same dtype.

    For large ``d`` only the block upper triangle is multiplied (``_BLOCKS`` column blocks:
    ``(b + 1) / 2b`` of the full product's FLOPs) and the strictly lower blocks are copied
    from it, so ``S`` stays exactly symmetric off the diagonal blocks.
    """
    n, d = k.shape
    if d < _BLOCKED_MIN_D or n < _BLOCKED_MIN_N:
        S.addmm_(k.T, k)  # (d, d) += (d, n) @ (n, d)
        return
    w = -(-d // _BLOCKS)
    for i in range(0, d, w):
        S[i:i + w, i:].addmm_(k[:, i:i + w].T, k[:, i:])  # (w, d - i) += (w, n) @ (n, d - i)
    for i in range(0, d - w, w):
        S[i + w:, i:i + w] = S[i:i + w, i + w:].T  # (d - i - w, w): the mirrored blocks


@dataclass
class SecondMoment:
    """Running sums for the second moment of the keys ``k`` entering one module.

    ROME's ``C`` is :attr:`mom2` ``= Σ k kᵀ / n``, the uncentred second moment over the ``n``
    real (non-padding) tokens of a text sample. The sums are kept (in float64 by default) so
    that partial results from shards, ranks or an interrupted run add up exactly:
    ``(a + b).mom2`` is the second moment over both samples.

    Attributes:
        mom2_sum: ``Σ k kᵀ``, ``(d, d)``.
        count: the number of tokens ``n``.
        k_sum: ``Σ k``, ``(d,)`` (for :attr:`mean` and :meth:`covariance`).
        n_texts: the number of corpus texts read to get these tokens.
        meta: where the numbers come from (module, model, corpus, ...); JSON-serialisable.

    Example:
        >>> m = SecondMoment.zeros(3)
        >>> m.update(torch.tensor([[1.0, 0.0, 2.0], [3.0, 1.0, 0.0]]))
        >>> m.mom2[0, 0].item(), m.count
        (5.0, 2)
    """

    mom2_sum: Tensor
    count: int = 0
    k_sum: Tensor | None = None
    n_texts: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mom2_sum.ndim != 2 or self.mom2_sum.shape[0] != self.mom2_sum.shape[1]:
            raise ValueError(f"mom2_sum must be square (d, d), got {tuple(self.mom2_sum.shape)}")
        if self.k_sum is not None and tuple(self.k_sum.shape) != (self.d,):
            raise ValueError(f"k_sum must be ({self.d},), got {tuple(self.k_sum.shape)}")
        if int(self.count) < 0:
            raise ValueError(f"count must be non-negative, got {self.count}")
        self.count = int(self.count)
        self.n_texts = int(self.n_texts)

    @classmethod
    def zeros(cls, d: int, dtype: torch.dtype = torch.float64,
              device: torch.device | str | None = None, **meta: Any) -> SecondMoment:
        """Empty sums for keys of dimension ``d``."""
        return cls(torch.zeros(d, d, dtype=dtype, device=device), 0,
                   torch.zeros(d, dtype=dtype, device=device), 0, dict(meta))

    @property
    def d(self) -> int:
        """The key dimension (``d_ff`` for an MLP output projection)."""
        return int(self.mom2_sum.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.mom2_sum.dtype

    @property
    def mom2(self) -> Tensor:
        """``C = E[k kᵀ] = Σ k kᵀ / n``, ``(d, d)``, in the sums' dtype."""
        self._check_nonempty()
        return self.mom2_sum / self.count  # (d, d)

    @property
    def mean(self) -> Tensor:
        """``E[k]``, ``(d,)``."""
        self._check_nonempty()
        if self.k_sum is None:
            raise ValueError("these statistics were saved without Σ k: no mean available")
        return self.k_sum / self.count  # (d,)

    def covariance(self) -> Tensor:
        """The centred covariance ``E[k kᵀ] − E[k] E[k]ᵀ``, ``(d, d)``."""
        mu = self.mean  # (d,)
        return self.mom2 - torch.outer(mu, mu)  # (d, d)

    def _check_nonempty(self) -> None:
        if self.count == 0:
            raise ValueError("no tokens were accumulated: the second moment is undefined")

    @torch.no_grad()
    def update(self, k: Tensor, mask: Tensor | None = None) -> int:
        """Add keys, in place.

        Args:
            k: ``(..., d)`` keys in any dtype; they are cast to the sums' dtype before the
                product, so a bfloat16 model still accumulates in float64.
            mask: ``(...)`` (the leading shape of ``k``), true/1 on real tokens; padding is
                left out.

        Returns:
            The number of tokens added.
        """
        if k.shape[-1] != self.d:
            raise ValueError(f"keys have dimension {k.shape[-1]}, expected {self.d}")
        k = k.reshape(-1, self.d)  # (N, d)
        if mask is not None:
            k = k[mask.reshape(-1).to(device=k.device, dtype=torch.bool)]  # (n, d)
        k = k.to(device=self.mom2_sum.device, dtype=self.mom2_sum.dtype)  # (n, d)
        add_gram(self.mom2_sum, k)  # (d, d) += (d, n) @ (n, d)
        if self.k_sum is not None:
            self.k_sum.add_(k.sum(0))  # (d,)
        self.count += int(k.shape[0])
        return int(k.shape[0])

    def merge(self, other: SecondMoment) -> SecondMoment:
        """A new :class:`SecondMoment` over both samples (sums add, counts add).

        Raises:
            ValueError: the two are of different dimensions or of different modules.
        """
        if other.d != self.d:
            raise ValueError(f"cannot merge second moments of dimension {self.d} and {other.d}")
        a, b = self.meta.get("module"), other.meta.get("module")
        if a is not None and b is not None and a != b:
            raise ValueError(f"cannot merge statistics of different modules {a!r} and {b!r}")
        k_sum = None
        if self.k_sum is not None and other.k_sum is not None:
            k_sum = self.k_sum + other.k_sum.to(self.k_sum)
        return SecondMoment(self.mom2_sum + other.mom2_sum.to(self.mom2_sum),
                            self.count + other.count, k_sum, self.n_texts + other.n_texts,
                            dict(self.meta))

    __add__ = merge

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
           ) -> SecondMoment:
        """A copy with the sums in ``dtype`` and/or on ``device``."""
        return SecondMoment(self.mom2_sum.to(dtype=dtype, device=device, copy=True), self.count,
                            None if self.k_sum is None else
                            self.k_sum.to(dtype=dtype, device=device, copy=True),
                            self.n_texts, copy.deepcopy(self.meta))

    def clone(self) -> SecondMoment:
        """A deep copy."""
        return self.to()

    def __repr__(self) -> str:
        module = self.meta.get("module", "?")
        return (f"SecondMoment(module={module!r}, d={self.d}, count={self.count}, "
                f"n_texts={self.n_texts}, dtype={self.dtype})")
