"""Keeping a command's console output to its own progress and results.

Used by the ``lightning-rome`` command line only (a library never changes its caller's logging
or warning filters). Two things come from the libraries below us, not from our calls:

* Lightning logs, at INFO level, advertisement tips ("💡 Tip: ... litlogger / litmodels") on
  every ``Trainer``, whatever its options, and the device summary ("GPU available: ...").
  :func:`quiet_console` drops the tips, and (``lightning_info=False``) every INFO record that
  Lightning's own code logs, through a :class:`logging.Filter` on Lightning's ``rank_zero``
  loggers, Lightning's documented way to configure its console output. Warnings and our own
  ``rank_zero_info`` messages pass.
* Lightning 2.6's ``utilities/_pytree.py`` constructs ``torch.utils._pytree.LeafSpec``, which
  torch 2.13 deprecates (a ``FutureWarning`` on every ``Trainer`` run with a dataloader): a
  Lightning/torch incompatibility that no option avoids. :func:`quiet_console` ignores exactly
  that message (``PYTREE_DEPRECATION``), nothing else.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LIGHTNING_LOGGERS", "PYTREE_DEPRECATION", "quiet_console"]

#: The loggers through which Lightning's ``rank_zero_info`` / ``rank_zero_warn`` go.
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero",
                     "lightning.fabric.utilities.rank_zero",
                     "pytorch_lightning.utilities.rank_zero",
                     "lightning_fabric.utilities.rank_zero")
#: The one third-party deprecation the CLI does not show (see the module docstring).
PYTREE_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def _lightning_dirs() -> tuple[str, ...]:
    """Where Lightning's packages are installed (found without importing them: importing
    ``pytorch_lightning`` would re-point Lightning's ``rank_zero`` logger)."""
    dirs = []
    for name in ("lightning", "lightning_fabric", "pytorch_lightning"):
        spec = importlib.util.find_spec(name)
        for loc in (spec.submodule_search_locations or []) if spec is not None else []:
            dirs.append(str(Path(loc).resolve()))
    return tuple(dirs)


class _LightningChatter(logging.Filter):
    """Drops Lightning's tips, and with ``all_info`` every INFO record its own code logs."""

    def __init__(self, all_info: bool) -> None:
        super().__init__()
        self.all_info = all_info
        self.dirs = _lightning_dirs()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO:
            return True
        if record.getMessage().lstrip().startswith("💡"):
            return False
        if self.all_info:
            path = str(Path(record.pathname).resolve())
            return not any(path.startswith(d) for d in self.dirs)
        return True


@contextmanager
def quiet_console(lightning_info: bool = True) -> Iterator[None]:
    """While inside: no Lightning tips, no Lightning INFO lines unless ``lightning_info``, and
    not the one Lightning/torch pytree deprecation. Everything is restored on exit."""
    chatter = _LightningChatter(all_info=not lightning_info)
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    for lg in loggers:
        lg.addFilter(chatter)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=PYTREE_DEPRECATION, category=FutureWarning)
            yield
    finally:
        for lg in loggers:
            lg.removeFilter(chatter)
