"""Layer statistics: the second moment ``C = E[k kᵀ]`` of a module's input over a text corpus.

The entry point is :func:`get_second_moment` (cached, resumable). :class:`SecondMomentModule`
and :func:`compute_second_moments_distributed` run the same collection as a Lightning job
across ranks (they are imported lazily, so the core does not need Lightning).
"""

from __future__ import annotations

from typing import Any

from lightning_rome.stats.cache import (
    CacheWriteError,
    load_second_moments,
    model_fingerprint,
    save_second_moments,
    stats_key,
    stats_path,
)
from lightning_rome.stats.collect import (
    collect_second_moments,
    get_second_moment,
    get_second_moments,
    resolve_modules,
)
from lightning_rome.stats.moments import SecondMoment

__all__ = [
    "CacheWriteError",
    "SecondMoment",
    "SecondMomentModule",
    "collect_second_moments",
    "compute_second_moments_distributed",
    "get_second_moment",
    "get_second_moments",
    "load_second_moments",
    "model_fingerprint",
    "resolve_modules",
    "save_second_moments",
    "stats_key",
    "stats_path",
]

_LAZY = {"SecondMomentModule", "compute_second_moments_distributed"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from lightning_rome.stats import lightning as _lightning

        return getattr(_lightning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
