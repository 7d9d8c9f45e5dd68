"""Layer statistics: the second moment ``C = E[k kᵀ]`` of a module's input over a text corpus.

The entry point is :func:`get_second_moment` (cached, resumable).
:class:`lightning_rome.modules.SecondMomentModule` and
:func:`lightning_rome.modules.compute_second_moments_distributed` run the same collection as a
Lightning job across ranks.
"""

from __future__ import annotations

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
    "collect_second_moments",
    "get_second_moment",
    "get_second_moments",
    "load_second_moments",
    "model_fingerprint",
    "resolve_modules",
    "save_second_moments",
    "stats_key",
    "stats_path",
]
