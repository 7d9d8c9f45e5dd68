"""Unigram TF-IDF vectors and ROME's attribute snippets, the inputs of the reference score RS.

ROME releases three files for RS (none is available offline; both loaders are tested on fixtures
written in these formats):

- ``idf.npy``: a 1-D float array, the inverse document frequency of each vocabulary term;
- ``tfidf_vocab.json``: a JSON object mapping each term to its index in ``idf.npy``;
- ``attribute_snippets.json``: a JSON list of records ``{"name": <subject>, "relation_id":
  "P103", "target_id": "Q150", "samples": [{"name": <subject>, "text": <Wikipedia snippet>},
  ...]}``. ``snips[r][o]`` gathers the texts of every record with relation ``r`` and object
  ``o``: text about subjects ``s'`` for which ``(s', r, o)`` holds.

The released files come from scikit-learn's ``TfidfVectorizer()`` with default settings fitted
on the snippet texts, so :class:`TfidfTable` reproduces those settings exactly: lower-casing,
tokens matching ``(?u)\\b\\w\\w+\\b``, raw term counts, smoothed IDF
``ln((1 + n) / (1 + df)) + 1`` and terms sorted alphabetically for their indices.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_rome.utils.io import CorruptFileError, atomic_path, atomic_write_json

__all__ = ["IDF_FILE", "SNIPPETS_FILE", "VOCAB_FILE", "AttributeSnippets", "TfidfTable", "analyze"]

IDF_FILE = "idf.npy"
VOCAB_FILE = "tfidf_vocab.json"
SNIPPETS_FILE = "attribute_snippets.json"

_TOKEN = re.compile(r"(?u)\b\w\w+\b")


class TfidfTable:
    """An IDF table and its vocabulary: turns a text into a sparse unigram TF-IDF vector.

    Args:
        idf: ``(V,)`` inverse document frequencies.
        vocab: term → index into ``idf`` (indices distinct, in ``[0, V)``).

    Raises:
        ValueError: ``idf`` is not a finite 1-D array or ``vocab`` does not index it.

    Example:
        >>> table = TfidfTable.fit(["the cat sat", "the dog sat", "a bird sang"])
        >>> sorted(table.vocab)
        ['bird', 'cat', 'dog', 'sang', 'sat', 'the']
        >>> round(table.similarity("The cat sat.", "the dog sat"), 4)
        0.5363
    """

    def __init__(self, idf: np.ndarray | Sequence[float], vocab: Mapping[str, int]) -> None:
        arr = np.asarray(idf)
        if arr.ndim != 1 or arr.dtype.kind not in "fiu":
            raise ValueError(
                f"idf must be a 1-D float array, got dtype {arr.dtype}, shape {arr.shape}"
            )
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            raise ValueError("idf contains NaN or infinite values")
        if not isinstance(vocab, Mapping):
            raise ValueError(f"vocab must map term -> index, got {type(vocab).__name__}")
        index: dict[str, int] = {}
        for term, i in vocab.items():
            if (
                not isinstance(term, str)
                or isinstance(i, bool)
                or not isinstance(i, int | np.integer)
            ):
                raise ValueError(f"vocab must map str -> int, got {term!r}: {i!r}")
            if not 0 <= int(i) < arr.size:
                raise ValueError(
                    f"vocab index {int(i)} of {term!r} is outside idf (size {arr.size})"
                )
            index[term] = int(i)
        if len(set(index.values())) != len(index):
            raise ValueError("vocab maps two terms to the same index")
        self.idf = arr
        self.vocab = index

    def __len__(self) -> int:
        return len(self.vocab)

    def __repr__(self) -> str:
        return f"TfidfTable(terms={len(self.vocab)})"

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def fit(cls, documents: Iterable[str]) -> TfidfTable:
        """Fit the IDF table on a corpus, exactly as scikit-learn's default ``TfidfVectorizer``.

        Args:
            documents: the corpus, one string per document (ROME fits on the snippet texts).

        Raises:
            ValueError: the corpus is empty or has no term of two or more word characters.
        """
        df: Counter[str] = Counter()
        n = 0
        for doc in documents:
            if not isinstance(doc, str):
                raise TypeError(f"documents must be str, got {type(doc).__name__}")
            df.update(set(analyze(doc)))
            n += 1
        if n == 0 or not df:
            raise ValueError("cannot fit an IDF table on an empty corpus (or one without words)")
        terms = sorted(df)
        idf = np.array([math.log((1 + n) / (1 + df[t])) + 1.0 for t in terms])
        return cls(idf, {t: i for i, t in enumerate(terms)})

    @classmethod
    def load(
        cls, idf_path: str | os.PathLike[str], vocab_path: str | os.PathLike[str]
    ) -> TfidfTable:
        """Load ROME's ``idf.npy`` and ``tfidf_vocab.json`` (no pickle).

        Raises:
            FileNotFoundError: a file is missing.
            CorruptFileError: a file is unreadable or not in the documented format.
        """
        idf_path, vocab_path = Path(idf_path), Path(vocab_path)
        for p in (idf_path, vocab_path):
            if not p.is_file():
                raise FileNotFoundError(f"TF-IDF file not found: {p}")
        try:
            idf = np.load(idf_path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise CorruptFileError(f"{idf_path} is not a readable .npy array: {err}") from err
        try:
            vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CorruptFileError(f"{vocab_path} is not valid JSON: {err}") from err
        try:
            return cls(idf, vocab)
        except ValueError as err:
            raise CorruptFileError(f"{idf_path} / {vocab_path}: {err}") from err

    @classmethod
    def from_dir(cls, data_dir: str | os.PathLike[str]) -> TfidfTable:
        """Load ``idf.npy`` and ``tfidf_vocab.json`` from one folder (ROME's layout)."""
        return cls.load(Path(data_dir) / IDF_FILE, Path(data_dir) / VOCAB_FILE)

    def save(self, data_dir: str | os.PathLike[str]) -> None:
        """Write ``idf.npy`` and ``tfidf_vocab.json`` into ``data_dir`` (atomically)."""
        with atomic_path(Path(data_dir) / IDF_FILE) as tmp, open(tmp, "wb") as f:
            np.save(f, self.idf, allow_pickle=False)
        atomic_write_json(Path(data_dir) / VOCAB_FILE, self.vocab)

    # -- vectors ---------------------------------------------------------------------------
    def vector(self, text: str) -> dict[int, float]:
        """The sparse TF-IDF vector of ``text``: ``{index: count · idf}`` over known terms."""
        counts = Counter(t for t in analyze(text) if t in self.vocab)
        return {self.vocab[t]: c * float(self.idf[self.vocab[t]]) for t, c in counts.items()}

    def similarity(self, text_a: str, text_b: str) -> float:
        """Cosine similarity of the TF-IDF vectors of two texts.

        0.0 when either text has no in-vocabulary term (ROME's code gives NaN there).
        """
        a, b = self.vector(text_a), self.vector(text_b)
        norm_a = math.sqrt(sum(v * v for v in a.values()))
        norm_b = math.sqrt(sum(v * v for v in b.values()))
        if norm_a == 0.0 or norm_b == 0.0:
            return 0.0
        if len(b) < len(a):
            a, b = b, a
        dot = sum(v * b[i] for i, v in a.items() if i in b)
        return dot / (norm_a * norm_b)


def analyze(text: str) -> list[str]:
    """scikit-learn's default analyzer: lower-case, then words of two or more word characters.

    Example:
        >>> analyze("The Eiffel Tower, in Paris (France) is 330 m tall.")
        ['the', 'eiffel', 'tower', 'in', 'paris', 'france', 'is', '330', 'tall']
    """
    if not isinstance(text, str):
        raise TypeError(f"expected a str, got {type(text).__name__}")
    return _TOKEN.findall(text.lower())


class AttributeSnippets:
    """ROME's attribute snippets: Wikipedia texts indexed by ``(relation_id, target_id)``.

    Args:
        records: the parsed ``attribute_snippets.json`` (see the module docstring).

    Raises:
        ValueError: a record lacks ``relation_id``, ``target_id`` or ``samples[*].text``.

    Example:
        >>> snips = AttributeSnippets([{"name": "Paris", "relation_id": "P17", "target_id": "Q142",
        ...     "samples": [{"name": "Paris", "text": "Paris is the capital of France."}]}])
        >>> snips.texts("P17", "Q142")
        ['Paris is the capital of France.']
        >>> snips.texts("P17", "Q30")
        []
    """

    def __init__(self, records: Sequence[Mapping[str, Any]]) -> None:
        if not isinstance(records, Sequence) or isinstance(records, str | bytes):
            raise ValueError(
                f"attribute snippets must be a list of records, got {type(records).__name__}"
            )
        index: dict[tuple[str, str], list[str]] = defaultdict(list)
        for i, rec in enumerate(records):
            if not isinstance(rec, Mapping):
                raise ValueError(f"snippet record {i} must be an object, got {type(rec).__name__}")
            rid, tid, samples = rec.get("relation_id"), rec.get("target_id"), rec.get("samples")
            if not isinstance(rid, str) or not isinstance(tid, str):
                raise ValueError(
                    f"snippet record {i} needs str 'relation_id' and 'target_id', got "
                    f"{rid!r}, {tid!r}"
                )
            if not isinstance(samples, list):
                raise ValueError(f"snippet record {i} needs a list 'samples', got {samples!r}")
            for j, sample in enumerate(samples):
                text = sample.get("text") if isinstance(sample, Mapping) else None
                if not isinstance(text, str):
                    raise ValueError(
                        f"snippet record {i} sample {j} needs a str 'text', got {sample!r}"
                    )
                index[(rid, tid)].append(text)
        self._index = dict(index)
        self._n_records = len(records)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AttributeSnippets:
        """Read ``attribute_snippets.json``.

        Raises:
            FileNotFoundError: the file is missing.
            CorruptFileError: it is not valid JSON or not in the documented format.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"attribute snippets file not found: {path}")
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
            return cls(records)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
            raise CorruptFileError(f"{path} is not a valid attribute_snippets.json: {err}") from err

    def texts(self, relation_id: str, target_id: str) -> list[str]:
        """All snippet texts of subjects whose ``relation_id`` object is ``target_id``."""
        return list(self._index.get((relation_id, target_id), ()))

    def documents(self) -> list[str]:
        """Every snippet text, the corpus ROME fits its IDF table on."""
        return [t for texts in self._index.values() for t in texts]

    def __len__(self) -> int:
        return self._n_records

    def __repr__(self) -> str:
        return f"AttributeSnippets(records={self._n_records}, pairs={len(self._index)})"
