"""Where a data file comes from (a local path, the data folder, or a download), how it is read
(``datasets.load_dataset("json")``), and how a split is specified (a file or a case-id range)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_rome.utils.io import CorruptFileError, atomic_path, cache_dir
from lightning_rome.utils.paths import DATA_ENV, data_root

__all__ = [
    "OFFLINE_ENVS",
    "SplitSpec",
    "download_json",
    "downloaded_path",
    "is_offline",
    "load_json_records",
    "parse_split",
    "resolve_file",
]

OFFLINE_ENVS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
_TRUE = {"1", "on", "yes", "true"}


def is_offline() -> bool:
    """Whether downloads are disabled (``HF_DATASETS_OFFLINE`` or ``HF_HUB_OFFLINE`` set to 1)."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in OFFLINE_ENVS)


def resolve_file(path: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None,
                 what: str = "data file") -> Path:
    """An existing local file: ``path`` itself if absolute, else ``data_root(data_dir) / path``
    if that exists, else ``path`` relative to the working directory.

    Raises:
        FileNotFoundError: none of these exist; the message lists what was tried.
    """
    p = Path(path).expanduser()
    tried = []
    if not p.is_absolute():
        root = data_root(data_dir)
        if root is not None:
            if (root / p).is_file():
                return root / p
            tried.append(str(root / p))
    if p.is_file():
        return p
    tried.append(str(p.resolve()))
    raise FileNotFoundError(
        f"{what} not found: {str(path)!r} (tried {', '.join(tried)}); pass an existing file, or "
        f"set data_dir=... or the environment variable {DATA_ENV} to the folder that holds it")


def download_json(url: str, dest: Path, timeout: float = 60.0) -> Path:
    """Download a JSON file to ``dest`` atomically, checking that it parses as a non-empty JSON
    list of objects (or JSON Lines) before it is put in place.

    Raises:
        ConnectionError: the download failed (no network, bad URL).
        CorruptFileError: what came back is not a JSON list of records.
    """
    with atomic_path(dest) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ConnectionError(f"could not download {url}: {e}") from e
        _check_json_records(tmp, url)
    return dest


def _check_json_records(path: Path, origin: str) -> None:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:  # JSON Lines
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise CorruptFileError(f"{origin} is not JSON or JSON Lines: {e}") from e
    if not isinstance(data, list) or not data or not all(isinstance(d, dict) for d in data):
        raise CorruptFileError(f"{origin} is not a non-empty JSON list of records")


def downloaded_path(url: str) -> Path:
    """Where :func:`download_json` keeps ``url``: ``cache_dir("data")/<hash>-<name>``."""
    name = url.rstrip("/").rsplit("/", 1)[-1] or "data.json"
    digest = hashlib.sha256(url.encode()).hexdigest()[:10]
    return cache_dir("data") / f"{digest}-{name}"


def load_json_records(path: str | os.PathLike[str], cache: str | os.PathLike[str] | None = None,
                      ) -> list[dict[str, Any]]:
    """Read a JSON list (or JSON Lines) file of records with ``datasets.load_dataset("json")``.

    Records that lack a field other records have get ``None`` for it (Arrow fills the column).

    Args:
        path: a local file.
        cache: the ``datasets`` cache folder (default: ``datasets``' own, ``$HF_DATASETS_CACHE``).

    Raises:
        CorruptFileError: the file cannot be read as JSON records (the message names it).
    """
    import datasets

    try:
        ds = datasets.load_dataset("json", data_files=str(path), split="train",
                                   cache_dir=None if cache is None else str(cache))
    except Exception as e:  # datasets wraps Arrow and JSON errors in several types
        raise CorruptFileError(
            f"could not read {path} as a JSON list of records: {type(e).__name__}: {e}") from e
    return ds.to_list()


_RANGE = re.compile(r"^\s*(-?\d*)\s*:\s*(-?\d*)\s*$")


@dataclass(frozen=True)
class SplitSpec:
    """Which cases a split holds: those of ``file`` (``None``: the DataModule's ``path``) whose
    case id is in ``[start, stop)`` (``None`` bounds are open)."""

    file: str | None = None
    start: int | None = None
    stop: int | None = None

    @property
    def is_range(self) -> bool:
        return self.start is not None or self.stop is not None

    def contains(self, case_id: Any) -> bool:
        """Whether ``case_id`` is in the range (always true without a range).

        Raises:
            ValueError: a range is set and the case id is not an int.
        """
        if not self.is_range:
            return True
        if isinstance(case_id, bool) or not isinstance(case_id, int):
            raise ValueError(f"a case-id range split needs int case ids, got {case_id!r}")
        return (self.start is None or case_id >= self.start) and (
            self.stop is None or case_id < self.stop)

    def __str__(self) -> str:
        rng = "" if not self.is_range else (f"[{'' if self.start is None else self.start}:"
                                            f"{'' if self.stop is None else self.stop}]")
        return f"{self.file or '<path>'}{rng}"


def _bound(v: Any, what: str) -> int | None:
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    if isinstance(v, bool):
        raise ValueError(f"split {what} must be an int or None, got {v!r}")
    try:
        return int(v)
    except (TypeError, ValueError) as e:
        raise ValueError(f"split {what} must be an int or None, got {v!r}") from e


def parse_split(spec: Any) -> SplitSpec | None:
    """Normalise a split argument.

    Accepted forms:

    * ``None``: the split is not configured.
    * ``"all"`` or ``":"``: every case of the DataModule's ``path``.
    * ``"start:stop"`` (either side may be empty), ``(start, stop)``, ``[start, stop]`` or
      ``range(start, stop)``: the cases of ``path`` whose case id is in ``[start, stop)``.
    * any other string or path: a file of its own (all of its cases).
    * ``{"path": ..., "start": ..., "stop": ...}``: a range of a file of its own.

    Raises:
        ValueError: a form not listed here, or ``stop <= start``.
    """
    if spec is None:
        return None
    if isinstance(spec, SplitSpec):
        out = spec
    elif isinstance(spec, range):
        if spec.step != 1:
            raise ValueError(f"a case-id range split needs step 1, got {spec!r}")
        out = SplitSpec(None, spec.start, spec.stop)
    elif isinstance(spec, os.PathLike):
        out = SplitSpec(os.fspath(spec))
    elif isinstance(spec, str):
        if spec.strip().lower() in ("all", ""):
            out = SplitSpec()
        elif m := _RANGE.match(spec):
            out = SplitSpec(None, _bound(m.group(1), "start"), _bound(m.group(2), "stop"))
        else:
            out = SplitSpec(spec)
    elif isinstance(spec, Mapping):
        unknown = set(spec) - {"path", "start", "stop"}
        if unknown:
            raise ValueError(f"unknown split key(s) {sorted(unknown)}; use path, start, stop")
        path = spec.get("path")
        out = SplitSpec(None if path is None else os.fspath(path), _bound(spec.get("start"),
                        "start"), _bound(spec.get("stop"), "stop"))
    elif isinstance(spec, Sequence) and len(spec) == 2:
        out = SplitSpec(None, _bound(spec[0], "start"), _bound(spec[1], "stop"))
    else:
        raise ValueError(
            f"cannot read the split {spec!r}: give 'all', 'start:stop', (start, stop), a file "
            "path, or {'path': ..., 'start': ..., 'stop': ...}")
    if out.start is not None and out.stop is not None and out.stop <= out.start:
        raise ValueError(f"empty case-id range {out}: stop must be greater than start")
    return out
