"""Text corpora: streaming, sharded sources of plain text (no Lightning here: the statistics core
uses them; the DataModule over them is :class:`lightning_rome.data.text.TextCorpusDataModule`).

A :class:`TextCorpus` is a re-iterable stream of non-empty texts (documents or paragraphs). It
can come from

- a local plain-text file, one text per line (:class:`TextFileCorpus`; WikiText's
  `` = Heading = `` lines can be skipped),
- a Hugging Face dataset with a text column, given as an object or loaded by name
  (:class:`HFTextCorpus`),
- any sequence or re-iterable of strings (:class:`IterableTextCorpus`),
- a named shortcut (``"wikitext"``, ``"wikitext-2"``, ...; see :func:`as_corpus`).

Every corpus can be truncated (:meth:`TextCorpus.take`) and sharded across ranks
(:meth:`TextCorpus.shard`): rank ``r`` of ``W`` gets the texts whose position in the stream is
``r`` modulo ``W``, so the shards are disjoint, together complete, and deterministic. A corpus has
an :attr:`~TextCorpus.identity` (a content fingerprint where one can be computed cheaply) that the
statistics cache uses as part of its key.

Example:
    >>> corpus = as_corpus("wikitext-2")            # ../shared/data/wikitext-2/valid.txt
    >>> texts = list(corpus.take(4).shard(0, 2))    # texts 0 and 2
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from lightning_rome.utils.paths import DATA_ENV, data_path, data_root

__all__ = [
    "NAMED_CORPORA",
    "CorpusSpec",
    "HFTextCorpus",
    "IterableTextCorpus",
    "TextCorpus",
    "TextFileCorpus",
    "as_corpus",
    "is_heading",
]

_HEADING = re.compile(r"^(= )+.*?( =)+$")


def is_heading(line: str) -> bool:
    """True for a WikiText section heading such as `` = Homarus gammarus = `` or
    `` = = Description = = ``."""
    return bool(_HEADING.match(line.strip()))


class TextCorpus(ABC):
    """A re-iterable stream of non-empty texts.

    Subclasses implement :meth:`_texts` (the full stream, blank texts already removed) and
    :attr:`identity`. Iterating a corpus yields ``str``.
    """

    #: A short human-readable description, used in error messages.
    description: str = "text corpus"

    @abstractmethod
    def _texts(self) -> Iterator[str]:
        """The texts in order."""

    @property
    @abstractmethod
    def identity(self) -> str | None:
        """A string that identifies the stream's content (``None`` when it cannot be known
        without reading it all, e.g. a one-shot generator); part of statistics cache keys."""

    def __iter__(self) -> Iterator[str]:
        return self._texts()

    def take(self, n: int | None) -> TextCorpus:
        """The first ``n`` texts (the whole corpus when ``n`` is ``None``)."""
        if n is None:
            return self
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"take(n) needs a non-negative int, got {n!r}")
        return _TakeCorpus(self, n)

    def shard(self, rank: int, world_size: int) -> TextCorpus:
        """The texts at stream positions ``rank, rank + world_size, ...``.

        The ``world_size`` shards are disjoint, together give the whole stream, and are the same
        on every run. Truncate first (``corpus.take(n).shard(r, W)``) to split the first ``n``
        texts among the ranks.
        """
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank!r}")
        if world_size == 1:
            return self
        return _ShardCorpus(self, rank, world_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description})"


class _TakeCorpus(TextCorpus):
    def __init__(self, base: TextCorpus, n: int) -> None:
        self.base, self.n = base, n
        self.description = f"{base.description}, first {n} texts"

    def _texts(self) -> Iterator[str]:
        return itertools.islice(iter(self.base), self.n)

    @property
    def identity(self) -> str | None:
        base = self.base.identity
        return None if base is None else f"{base}|take={self.n}"


class _ShardCorpus(TextCorpus):
    def __init__(self, base: TextCorpus, rank: int, world_size: int) -> None:
        self.base, self.rank, self.world_size = base, rank, world_size
        self.description = f"{base.description}, shard {rank}/{world_size}"

    def _texts(self) -> Iterator[str]:
        return itertools.islice(iter(self.base), self.rank, None, self.world_size)

    @property
    def identity(self) -> str | None:
        base = self.base.identity
        return None if base is None else f"{base}|shard={self.rank}/{self.world_size}"


_FILE_PRINTS: dict[tuple[str, int, int, int, int], str] = {}


def _file_fingerprint(path: Path, block: int = 1 << 20) -> str:
    """SHA-256 of a file's whole content (streamed in ``block``-byte reads), memoised by the
    file's path, size, inode, modification and status-change times: a rewrite of the file is
    seen even when it keeps the size and the modification time."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _FILE_PRINTS:
        h = hashlib.sha256(str(st.st_size).encode())
        with path.open("rb") as f:
            while chunk := f.read(block):
                h.update(chunk)
        _FILE_PRINTS[key] = h.hexdigest()[:16]
    return _FILE_PRINTS[key]


class TextFileCorpus(TextCorpus):
    """A local plain-text file with one text (document or paragraph) per line.

    Lines are stripped; blank lines are skipped, and so are WikiText headings
    (`` = Heading = ``) when ``skip_headings`` is true.

    Args:
        path: the file.
        skip_headings: drop WikiText heading lines.
        min_chars: drop texts shorter than this (after stripping).
        encoding: the file's encoding.

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a file.
    """

    def __init__(self, path: str | os.PathLike[str], *, skip_headings: bool = True,
                 min_chars: int = 1, encoding: str = "utf-8") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            what = "is a directory, not a file" if self.path.is_dir() else "does not exist"
            raise FileNotFoundError(f"text corpus file {str(self.path)!r} {what}")
        self.skip_headings = skip_headings
        self.min_chars = max(1, int(min_chars))
        self.encoding = encoding
        self.description = f"file {str(self.path)!r}"

    def _texts(self) -> Iterator[str]:
        with self.path.open(encoding=self.encoding) as f:
            for line in f:
                text = line.strip()
                if len(text) < self.min_chars or (self.skip_headings and is_heading(text)):
                    continue
                yield text

    @property
    def identity(self) -> str:
        # Not memoised here: the file may change; _file_fingerprint memoises by its stat.
        return (f"file:{self.path.name}:{_file_fingerprint(self.path)}"
                f":headings={'skip' if self.skip_headings else 'keep'}"
                f":min_chars={self.min_chars}")


class HFTextCorpus(TextCorpus):
    """The text column of a Hugging Face dataset.

    Args:
        dataset: a ``datasets.Dataset``, ``IterableDataset`` or ``DatasetDict`` (then ``split``
            picks one), or a dataset name for ``datasets.load_dataset`` (needs the hub unless the
            dataset is cached or packaged, e.g. ``"text"`` with ``data_files=``).
        config: the dataset configuration (``load_dataset``'s second argument).
        split: the split to use (default ``"train"`` when loading by name).
        text_column: the column holding the text.
        skip_headings: drop WikiText heading lines.
        streaming: load by name as an ``IterableDataset`` (nothing is downloaded up front).
        **load_kwargs: passed to ``load_dataset`` (``data_files=``, ``cache_dir=``, ...).

    Raises:
        KeyError: the dataset has no ``text_column`` (or no such split).
        RuntimeError: loading by name failed (e.g. offline); the message says how to use local
            data instead.
    """

    def __init__(self, dataset: Any, config: str | None = None, *, split: str | None = None,
                 text_column: str = "text", skip_headings: bool = False, streaming: bool = False,
                 **load_kwargs: Any) -> None:
        import datasets

        self.name: str | None = None
        if isinstance(dataset, str):
            self.name = dataset
            split = split or "train"
            try:
                dataset = datasets.load_dataset(dataset, config, split=split, streaming=streaming,
                                                **load_kwargs)
            except Exception as err:  # offline, unknown name, missing files, ...
                raise RuntimeError(
                    f"could not load the Hugging Face dataset {self.name!r} (config {config!r}, "
                    f"split {split!r}): {err}. Offline, point the corpus at a local text file "
                    f"or set {DATA_ENV} and use a local named corpus such as 'wikitext-2'"
                ) from err
        if isinstance(dataset, datasets.DatasetDict | datasets.IterableDatasetDict):
            if split is None or split not in dataset:
                raise KeyError(f"the dataset has splits {sorted(dataset)}; pass split= one of them"
                               f" (got {split!r})")
            dataset = dataset[split]
        if not isinstance(dataset, datasets.Dataset | datasets.IterableDataset):
            raise TypeError(f"expected a datasets.Dataset or IterableDataset, got "
                            f"{type(dataset).__name__}")
        columns = dataset.column_names
        if columns is not None and text_column not in columns:
            raise KeyError(f"the dataset has no text column {text_column!r}; its columns are "
                           f"{columns}: pass text_column=")
        self.dataset = dataset
        self.config, self.split, self.text_column = config, split, text_column
        self.skip_headings = skip_headings
        self.load_kwargs = load_kwargs
        label = self.name or getattr(dataset.info, "dataset_name", None) or "dataset"
        self.description = f"Hugging Face dataset {label!r} column {text_column!r}"

    def _texts(self) -> Iterator[str]:
        for row in self.dataset:
            if self.text_column not in row:
                raise KeyError(f"the dataset has no text column {self.text_column!r}; its "
                               f"columns are {sorted(row)}: pass text_column=")
            value = row[self.text_column]
            if not isinstance(value, str):
                raise TypeError(f"column {self.text_column!r} holds {type(value).__name__}, "
                                "not str")
            text = value.strip()
            if not text or (self.skip_headings and is_heading(text)):
                continue
            yield text

    @property
    def identity(self) -> str | None:
        head = f"column={self.text_column}:headings={'skip' if self.skip_headings else 'keep'}"
        fingerprint = getattr(self.dataset, "_fingerprint", None)
        if fingerprint:  # map-style datasets: a content fingerprint
            return f"hf-fingerprint:{fingerprint}:{head}"
        files = self.load_kwargs.get("data_files")
        if isinstance(files, str | os.PathLike):
            files = [files]
        extra = set(self.load_kwargs) - {"data_files", "cache_dir"}
        if self.name and not extra and isinstance(files, list) and all(
                Path(f).is_file() for f in files):  # local files: their content
            prints = ",".join(_file_fingerprint(Path(f)) for f in files)
            return f"hf:{self.name}:{self.config}:{self.split}:files={prints}:{head}"
        if self.name and not self.load_kwargs:
            return f"hf:{self.name}:{self.config}:{self.split}:{head}"
        info = self.dataset.info
        if info.dataset_name and not self.load_kwargs:
            return (f"hf:{info.dataset_name}:{info.config_name}:"
                    f"{self.split or self.dataset.split}:{head}")
        return None


class IterableTextCorpus(TextCorpus):
    """Texts from any iterable of strings.

    A sequence (``list``, ``tuple``) or a zero-argument callable that returns a fresh iterable
    can be read any number of times; a one-shot iterator (a generator) only once. Blank texts
    are skipped and texts are stripped.

    Args:
        texts: the strings, or a factory of them.
        name: an identity for the statistics cache. Sequences get a content hash by default;
            other iterables have none unless ``name`` is given (so they are not cached).
    """

    def __init__(self, texts: Iterable[str] | Callable[[], Iterable[str]], *,
                 name: str | None = None) -> None:
        if isinstance(texts, str):
            raise TypeError("expected an iterable of strings, got a single str (wrap it in a list"
                            " or pass a file path to as_corpus)")
        self.texts = texts
        self.name = name
        self._one_shot = not callable(texts) and iter(texts) is texts  # type: ignore[arg-type]
        self._consumed = False
        self._identity: str | None = None
        self.description = f"iterable {name!r}" if name else f"iterable {type(texts).__name__}"

    def _texts(self) -> Iterator[str]:
        if self._one_shot:
            if self._consumed:
                raise RuntimeError("this corpus wraps a one-shot iterator that has already been "
                                   "read; pass a list or a callable that returns a new iterator")
            self._consumed = True
        source = self.texts() if callable(self.texts) else self.texts
        for value in source:
            if not isinstance(value, str):
                raise TypeError(f"text corpus items must be str, got {type(value).__name__}")
            text = value.strip()
            if text:
                yield text

    @property
    def identity(self) -> str | None:
        if self.name is not None:
            return f"iterable:{self.name}"
        if isinstance(self.texts, Sequence):
            if self._identity is None or not isinstance(self.texts, tuple):  # lists may change
                h = hashlib.sha256()
                for t in self.texts:
                    h.update(hashlib.sha256(str(t).strip().encode()).digest())
                self._identity = f"texts:{len(self.texts)}:{h.hexdigest()[:16]}"
            return self._identity
        return None


def _wikitext(split: str) -> Callable[[str | os.PathLike[str] | None], TextCorpus]:
    def build(root: str | os.PathLike[str] | None) -> TextCorpus:
        return TextFileCorpus(data_path(f"wikitext-2/{split}.txt", root, what="WikiText-2 file"))

    return build


def _online(name: str, config: str | None, offline_hint: str, skip_headings: bool = False,
            ) -> Callable[[str | os.PathLike[str] | None], TextCorpus]:
    def build(root: str | os.PathLike[str] | None) -> TextCorpus:
        if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
            raise RuntimeError(f"the corpus {name!r} comes from the Hugging Face hub, but "
                               f"HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set; {offline_hint}")
        return HFTextCorpus(name, config, split="train", streaming=True,
                            skip_headings=skip_headings)

    return build


def _wikitext_default(root: str | os.PathLike[str] | None) -> TextCorpus:
    if data_root(root) is not None:
        return _wikitext("valid")(root)
    return _online("wikitext", "wikitext-103-raw-v1",
                   f"set {DATA_ENV} to a folder holding wikitext-2/valid.txt", True)(root)


#: Named corpora for :func:`as_corpus`. ``"wikitext"`` is the local WikiText-2 copy when
#: ``$LIGHTNING_ROME_DATA`` (or ``data_dir``) is set, else ``wikitext-103-raw-v1`` (train) from
#: the hub. ``"wikipedia"`` is the English Wikipedia from the hub (what the ROME paper sampled).
NAMED_CORPORA: dict[str, Callable[[str | os.PathLike[str] | None], TextCorpus]] = {
    "wikitext": _wikitext_default,
    "wikitext-2": _wikitext("valid"),
    "wikitext-2-valid": _wikitext("valid"),
    "wikitext-2-test": _wikitext("test"),
    "wikitext-103": _online("wikitext", "wikitext-103-raw-v1",
                            f"use 'wikitext-2' with {DATA_ENV} instead", True),
    "wikipedia": _online("wikimedia/wikipedia", "20231101.en",
                         f"use 'wikitext-2' with {DATA_ENV} instead"),
}

CorpusSpec = TextCorpus | str | os.PathLike | Iterable[str] | Any
"""What :func:`as_corpus` accepts."""


def as_corpus(spec: CorpusSpec, *, data_dir: str | os.PathLike[str] | None = None,
              text_column: str = "text", split: str | None = None,
              skip_headings: bool = True) -> TextCorpus:
    """Resolve a corpus specification.

    Args:
        spec: one of
            - a :class:`TextCorpus` (returned as is);
            - a name in :data:`NAMED_CORPORA` (``"wikitext"``, ``"wikitext-2"``, ...);
            - ``"hf:NAME"`` or ``"hf:NAME:CONFIG"``: a Hugging Face dataset by name (train
              split unless ``split`` is given; needs the hub);
            - the path of a local text file, one text per line;
            - a ``datasets.Dataset``/``IterableDataset``/``DatasetDict``;
            - any sequence or iterable of strings.
        data_dir: the local data folder for named corpora (default ``$LIGHTNING_ROME_DATA``).
        text_column: the text column of a Hugging Face dataset.
        split: the split of a ``DatasetDict`` or of a dataset loaded by name.
        skip_headings: drop WikiText `` = Heading = `` lines from local files.

    Raises:
        FileNotFoundError: a path that does not exist, or a local named corpus whose file is
            missing.
        RuntimeError: a hub corpus requested while offline.
        TypeError: anything else.
    """
    if isinstance(spec, TextCorpus):
        return spec
    # A Hugging Face dataset object exists only once its module is imported: a string or path
    # spec does not import ``datasets`` (half a second) just to be told it is not one.
    datasets = sys.modules.get("datasets")
    hf_types: tuple[type, ...] = () if datasets is None else (
        datasets.Dataset, datasets.IterableDataset, datasets.DatasetDict,
        datasets.IterableDatasetDict)
    if hf_types and isinstance(spec, hf_types):
        return HFTextCorpus(spec, split=split, text_column=text_column)
    if isinstance(spec, str) and spec in NAMED_CORPORA:
        return NAMED_CORPORA[spec](data_dir)
    if isinstance(spec, str) and spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        if not name:
            raise ValueError(f"expected 'hf:NAME[:CONFIG]', got {spec!r}")
        return HFTextCorpus(name, config or None, split=split or "train",
                            text_column=text_column, streaming=True)
    if isinstance(spec, str | os.PathLike):
        path = Path(spec)
        if path.exists():
            return TextFileCorpus(path, skip_headings=skip_headings)
        raise FileNotFoundError(
            f"text corpus not found: {str(spec)!r} is neither an existing file nor a named corpus"
            f" ({', '.join(sorted(NAMED_CORPORA))}); for a Hugging Face dataset by name use "
            "'hf:NAME[:CONFIG]'")
    if isinstance(spec, Iterable) or callable(spec):
        return IterableTextCorpus(spec)
    raise TypeError(f"cannot use a {type(spec).__name__} as a text corpus")


# --------------------------------------------------------------------------------------------
# Tokenized datasets and the DataModule
# --------------------------------------------------------------------------------------------



