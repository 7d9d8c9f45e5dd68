"""Where local data lives: one place for every loader."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATA_ENV", "data_path", "data_root"]

DATA_ENV = "LIGHTNING_ROME_DATA"


def data_root(root: str | os.PathLike[str] | None = None) -> Path | None:
    """The local data folder: ``root`` if given, else ``$LIGHTNING_ROME_DATA``, else ``None``."""
    if root is not None:
        return Path(root)
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else None


def data_path(relative: str, root: str | os.PathLike[str] | None = None,
              what: str = "data file") -> Path:
    """``data_root(root) / relative``, with an error that says how to point at local data.

    Raises:
        FileNotFoundError: no root is configured, or the file is not there.
    """
    base = data_root(root)
    if base is None:
        raise FileNotFoundError(
            f"no local data folder for the {what} {relative!r}: pass a path (e.g. data_dir=...) "
            f"or set the environment variable {DATA_ENV} to the folder that holds it")
    path = base / relative
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path} (from {DATA_ENV} or data_dir)")
    return path
