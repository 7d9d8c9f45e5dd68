"""One progress bar for the package's long loops (test-model training, statistics, editing,
evaluation): tqdm with an ETA, on stderr, only when stderr is a terminal (then only once the
loop has run for a few seconds) or when asked."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["DELAY_SECONDS", "progress_bar"]

#: A bar appears only once its loop has run this long, so short loops print nothing.
DELAY_SECONDS = 3.0


class _NoBar:
    """Stands in for a disabled bar: every method does nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def progress_bar(total: int | None, desc: str, *, enabled: bool | None = None,
                 unit: str = "it", delay: float | None = None) -> Any:
    """A tqdm bar over ``total`` steps (an ETA when ``total`` is known), or a no-op stand-in.

    Args:
        total: the number of steps (``None``: unknown, no ETA).
        desc: the bar's label.
        enabled: show it; ``None`` (default): when stderr is a terminal.
        unit: what one step is.
        delay: seconds before the bar first appears (default: ``DELAY_SECONDS`` when shown
            because stderr is a terminal, none when ``enabled=True``).

    Returns:
        An object with ``update(n)``, ``set_postfix_str(s)``, ``close()``, usable in ``with``.
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
        delay = DELAY_SECONDS if delay is None else delay
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, delay=delay or 0.0,
                leave=False, file=sys.stderr)
