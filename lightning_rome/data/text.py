"""Text corpora for statistics and language-model training, as a LightningDataModule.

The corpora themselves live in :mod:`lightning_rome.corpora` (re-exported here);
:class:`TextCorpusDataModule` turns one into batches of token ids for language-model training
(fixed-length chunks of the concatenated stream) or for statistics (one row per text, truncated
and padded), sharded across ranks.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from lightning_rome.corpora import (
    NAMED_CORPORA,
    CorpusSpec,
    HFTextCorpus,
    IterableTextCorpus,
    TextCorpus,
    TextFileCorpus,
    as_corpus,
    is_heading,
)

Mode = Literal["chunks", "texts"]

__all__ = [
    "NAMED_CORPORA",
    "CorpusSpec",
    "HFTextCorpus",
    "IterableTextCorpus",
    "TextCorpus",
    "TextCorpusDataModule",
    "TextFileCorpus",
    "as_corpus",
    "collate_rows",
    "is_heading",
]


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, max_len: int | None) -> list[int]:
    if max_len is None:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text, add_special_tokens=False, truncation=True,
                          max_length=max_len)["input_ids"])


def _separator(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    eos = tokenizer.eos_token_id
    return [] if eos is None else [int(eos)]


def _chunk_stream(texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, seq_len: int,
                  ) -> Iterator[list[int]]:
    """Concatenate the tokenized texts (EOS between them) and cut into ``seq_len`` chunks; the
    last partial chunk is dropped."""
    buf: list[int] = []
    sep = _separator(tokenizer)
    for text in texts:
        buf.extend(_encode(tokenizer, text, None))
        buf.extend(sep)
        while len(buf) >= seq_len:
            yield buf[:seq_len]
            buf = buf[seq_len:]


def _text_rows(texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, seq_len: int,
               ) -> Iterator[list[int]]:
    for text in texts:
        ids = _encode(tokenizer, text, seq_len)
        if ids:
            yield ids


def collate_rows(rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad token rows: ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on
    padding), each ``(B, T)``."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = 1
    labels = ids.masked_fill(mask == 0, -100)  # (B, T)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class _RowDataset(Dataset):
    def __init__(self, rows: list[list[int]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[int]:
        return self.rows[i]


class _ShardedRowStream(IterableDataset):
    """Token rows from this rank's shard of the corpus (and this worker's share of it)."""

    def __init__(self, corpus: TextCorpus, tokenizer: PreTrainedTokenizerBase, seq_len: int,
                 mode: Mode, rank: int, world_size: int) -> None:
        self.corpus, self.tokenizer, self.seq_len, self.mode = corpus, tokenizer, seq_len, mode
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        # Worker w of rank r reads stream positions r + W * (w + k * workers).
        shard = self.corpus.shard(self.rank, self.world_size).shard(worker, workers)
        make = _chunk_stream if self.mode == "chunks" else _text_rows
        return make(shard, self.tokenizer, self.seq_len)


class TextCorpusDataModule(L.LightningDataModule):
    """Tokenized text for language-model training or statistics.

    In ``"chunks"`` mode the texts are tokenized, joined with the EOS token and cut into rows of
    exactly ``seq_len`` tokens (GPT-style LM training). In ``"texts"`` mode each text is one row,
    truncated to ``seq_len`` and right-padded in the batch (how layer statistics read a corpus).
    Batches are dicts of ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on padding),
    each ``(B, T)``.

    Sharding across ranks:
        - ``shard_by="sampler"`` (default): the first ``n_samples`` texts are tokenized in
          ``setup`` into a map-style dataset, and Lightning's distributed sampler splits it (it
          shuffles the training set; prediction is split without repeats).
        - ``shard_by="corpus"``: nothing is materialized; each rank streams its own
          :meth:`TextCorpus.shard`. Ranks may then get different numbers of batches, which
          suits ``predict``/statistics; for DDP training prefer the sampler.

    Args:
        corpus: anything :func:`as_corpus` accepts.
        tokenizer: a tokenizer or the path/name to load one from.
        seq_len: tokens per row.
        batch_size: rows per batch.
        mode: ``"chunks"`` or ``"texts"``.
        n_samples: use only the first ``n_samples`` texts.
        val_corpus: an optional validation corpus (same processing, never shuffled).
        shard_by: ``"sampler"`` or ``"corpus"``.
        num_workers: DataLoader workers.
        data_dir: the local data folder for named corpora.
    """

    def __init__(self, corpus: CorpusSpec = "wikitext", tokenizer: Any = None, *,
                 seq_len: int = 128, batch_size: int = 8, mode: Mode = "chunks",
                 n_samples: int | None = None, val_corpus: CorpusSpec | None = None,
                 shard_by: Literal["sampler", "corpus"] = "sampler", num_workers: int = 0,
                 data_dir: str | None = None) -> None:
        super().__init__()
        if mode not in ("chunks", "texts"):
            raise ValueError(f"mode must be 'chunks' or 'texts', got {mode!r}")
        if shard_by not in ("sampler", "corpus"):
            raise ValueError(f"shard_by must be 'sampler' or 'corpus', got {shard_by!r}")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len}, "
                             f"{batch_size}")
        if tokenizer is None:
            raise ValueError("TextCorpusDataModule needs a tokenizer (an object or a path)")
        self.corpus_spec, self.val_spec = corpus, val_corpus
        self._tokenizer = tokenizer
        self.seq_len, self.batch_size, self.mode = seq_len, batch_size, mode
        self.n_samples, self.shard_by, self.num_workers = n_samples, shard_by, num_workers
        self.data_dir = data_dir
        self._data: dict[str, Dataset | IterableDataset] = {}

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if not isinstance(self._tokenizer, PreTrainedTokenizerBase):
            from lightning_rome.models import load_tokenizer

            self._tokenizer = load_tokenizer(self._tokenizer)
        return self._tokenizer

    def _corpus(self, spec: CorpusSpec) -> TextCorpus:
        return as_corpus(spec, data_dir=self.data_dir).take(self.n_samples)

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _build(self, spec: CorpusSpec) -> Dataset | IterableDataset:
        corpus = self._corpus(spec)
        if self.shard_by == "corpus":
            rank, world = self._rank()
            return _ShardedRowStream(corpus, self.tokenizer, self.seq_len, self.mode, rank, world)
        make = _chunk_stream if self.mode == "chunks" else _text_rows
        rows = list(make(corpus, self.tokenizer, self.seq_len))
        if not rows:
            raise ValueError(f"the {corpus.description} gives no {self.mode} of {self.seq_len} "
                             "tokens: it is empty or too short")
        return _RowDataset(rows)

    def setup(self, stage: str | None = None) -> None:
        if self.shard_by == "corpus":  # streams are built per loader, for the current rank
            return
        if "train" not in self._data:
            self._data["train"] = self._build(self.corpus_spec)
        if self.val_spec is not None and "val" not in self._data:
            self._data["val"] = self._build(self.val_spec)

    def _loader(self, key: str, shuffle: bool) -> DataLoader:
        if self.shard_by == "corpus":
            data = self._build(self.corpus_spec if key == "train" else self.val_spec)
        else:
            if key not in self._data:
                self.setup()
            data = self._data[key]
        pad = self.tokenizer.pad_token_id
        pad = int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))
        return DataLoader(data, batch_size=self.batch_size,
                          shuffle=shuffle and not isinstance(data, IterableDataset),
                          num_workers=self.num_workers,
                          collate_fn=functools.partial(collate_rows, pad_id=pad))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_spec is None:
            return []  # type: ignore[return-value]
        return self._loader("val", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=False)
