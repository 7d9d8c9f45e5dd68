"""ROME's known facts (``known_1000.json``) as a LightningDataModule, for causal tracing."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar

from typing_extensions import override

from lightning_rome.data.base import RecordDataModule, SplitArg
from lightning_rome.data.parsing import parse_known_fact
from lightning_rome.records import KnownFact

__all__ = ["KNOWN_FACTS_URL", "KnownFactsDataModule"]

#: ROME's public release of the facts GPT-2 XL knows (1,209 records).
KNOWN_FACTS_URL = "https://rome.baulab.info/data/dsets/known_1000.json"


class KnownFactsDataModule(RecordDataModule[KnownFact]):
    """Facts a model is known to predict, as :class:`~lightning_rome.data.KnownFact` records
    (prompt, subject, expected attribute), for averaging causal traces.

    Reads ROME's ``known_1000.json`` (``known_id, subject, attribute, template, prediction,
    prompt, relation_id``). Case ids are the ``known_id``; case-id range splits use them. Batches
    are a :class:`~lightning_rome.data.RecordBatch` of facts (use ``test`` or ``predict``).

    Args:
        path: the file; without it, ``known_1000.json`` under the data folder
            (``$LIGHTNING_ROME_DATA``), else ``url``.
        **others: as for :class:`~lightning_rome.data.CounterFactDataModule` (no ``mode``).

    Example:
        >>> dm = KnownFactsDataModule(limit=1)
        >>> dm.setup("predict")
        >>> f = dm.predict_dataset[0]
        >>> f.prompt, f.subject, f.attribute
        ('Vinson Massif is located in the continent of', 'Vinson Massif', 'Antarctica')
    """

    what: ClassVar[str] = "known facts"
    default_files: ClassVar[tuple[str, ...]] = ("known_1000.json",)
    id_key: ClassVar[str] = "known_id"

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        data_dir: str | os.PathLike[str] | None = None,
        url: str | None = KNOWN_FACTS_URL,
        train_split: SplitArg = None,
        val_split: SplitArg = None,
        test_split: SplitArg = "all",
        predict_split: SplitArg = "all",
        limit: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        strict: bool = False,
        batch_size: int = 1,
        num_workers: int = 0,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(
            path, data_dir=data_dir, url=url, train_split=train_split, val_split=val_split,
            test_split=test_split, predict_split=predict_split, limit=limit, shuffle=shuffle,
            seed=seed, strict=strict, batch_size=batch_size, num_workers=num_workers,
            cache_dir=cache_dir)

    @override
    def parse(self, raw: Mapping[str, Any], index: int) -> KnownFact:
        """One record of ``known_1000.json`` (see :func:`~lightning_rome.data.parse_known_fact`)."""
        return parse_known_fact(raw, index)
