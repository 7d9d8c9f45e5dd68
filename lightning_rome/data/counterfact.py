"""COUNTERFACT as a LightningDataModule."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from typing_extensions import override

from lightning_rome.data.base import EditCaseDataModule, SplitArg
from lightning_rome.data.parsing import parse_counterfact_record
from lightning_rome.records import EditCase

__all__ = ["COUNTERFACT_URL", "MULTI_COUNTERFACT_URL", "CounterFactDataModule"]

#: ROME's public release of COUNTERFACT (21,919 cases, about 45 MB).
COUNTERFACT_URL = "https://rome.baulab.info/data/dsets/counterfact.json"
#: MEMIT's release of the same cases in the same schema (pass as ``url=``).
MULTI_COUNTERFACT_URL = "https://memit.baulab.info/data/dsets/multi_counterfact.json"


class CounterFactDataModule(EditCaseDataModule):
    """COUNTERFACT cases (Meng et al. 2022) as :class:`~lightning_rome.data.EditCase` records.

    Reads ROME's ``counterfact.json``, MEMIT's ``multi_counterfact.json`` (same schema: a
    ``requested_rewrite`` plus paraphrase, neighborhood, attribute and generation prompts and
    relation ids) and the reduced EasyEdit-style files (one rephrase and one locality prompt per
    case), all into the same record type. Batches are a
    :class:`~lightning_rome.data.RecordBatch` of cases (``mode="cases"``), or for training MEND
    and KE, tokenized :class:`~lightning_rome.data.EditTrainingBatch` (``mode="edit_train"``).

    Where the data comes from, in order:

    1. a split's own file (``test_split="counterfact/counterfact-val.json"``), else ``path``;
       relative paths are looked up under ``data_dir`` / ``$LIGHTNING_ROME_DATA`` first;
    2. ``counterfact.json``, ``counterfact/counterfact.json`` or (the offline folder's
       evaluation split) ``counterfact/counterfact-val.json`` under ``data_dir`` /
       ``$LIGHTNING_ROME_DATA``;
    3. ``url`` (ROME's release), downloaded once by :meth:`prepare_data` into
       ``$LIGHTNING_ROME_CACHE/data``. Offline (``HF_DATASETS_OFFLINE=1``, or no network), an
       error says to pass ``path=`` or set ``LIGHTNING_ROME_DATA``.

    Files are read with ``datasets.load_dataset("json")``.

    Args:
        path: the COUNTERFACT file used by every split that has no file of its own.
        data_dir: the local data folder (default ``$LIGHTNING_ROME_DATA``).
        url: where to download from when no local file is found (``None`` disables downloads).
        train_split, val_split, test_split, predict_split: which cases each split holds:
            ``None`` (no such split), ``"all"``, a case-id range ``"0:10000"`` / ``(0, 10000)``
            (half-open, either bound may be empty/``None``), a file path, or
            ``{"path": ..., "start": ..., "stop": ...}``. The papers train MEND-CF/KE-CF on a
            10,000-case holdout and evaluate on other cases.
        limit: keep the first ``limit`` cases of each split (after validation and shuffling).
        shuffle: permute each split's cases once at setup, with ``seed`` (same seed, same order).
        seed: the seed of that permutation and of the train loader's per-epoch shuffling.
        strict: raise :class:`~lightning_rome.data.MalformedRecordError` naming every malformed
            record at setup, instead of skipping them with a warning that lists their case ids.
        batch_size: cases per batch.
        num_workers: DataLoader workers.
        cache_dir: the ``datasets`` cache (default: its own, ``$HF_DATASETS_CACHE``).
        mode: ``"cases"`` (train/val batches are cases) or ``"edit_train"`` (train/val batches are
            :class:`~lightning_rome.data.EditTrainingBatch`). Test and predict batches are
            always cases.
        tokenizer: the tokenizer (or its path) for ``mode="edit_train"``.
        collator_kwargs: extra arguments of :class:`~lightning_rome.data.EditTrainingCollator`
            (``locality``, ``n_loc``, ``n_equiv``, ``loc_answers``, ``side``, ``seed``).

    Under DDP, test and predict cases are sharded across processes without repeats
    (Lightning's ``UnrepeatedDistributedSampler``): each case is evaluated exactly once and
    processes may run one batch fewer than others. Train and val use Lightning's
    ``DistributedSampler``.

    Example:
        >>> dm = CounterFactDataModule("counterfact/counterfact-val.json", limit=2)
        >>> dm.setup("test")
        >>> [c.request.subject for c in dm.test_dataset]
        ['BBC One', 'Arun Nehru']
    """

    what: ClassVar[str] = "COUNTERFACT"
    default_files: ClassVar[tuple[str, ...]] = (
        "counterfact.json", "counterfact/counterfact.json",
        # The offline folder's evaluation split (`$LIGHTNING_ROME_DATA/counterfact/`).
        "counterfact/counterfact-val.json")

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        data_dir: str | os.PathLike[str] | None = None,
        url: str | None = COUNTERFACT_URL,
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
        mode: Literal["cases", "edit_train"] = "cases",
        tokenizer: Any = None,
        collator_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            path, data_dir=data_dir, url=url, train_split=train_split, val_split=val_split,
            test_split=test_split, predict_split=predict_split, limit=limit, shuffle=shuffle,
            seed=seed, strict=strict, batch_size=batch_size, num_workers=num_workers,
            cache_dir=cache_dir, mode=mode, tokenizer=tokenizer, collator_kwargs=collator_kwargs)

    @override
    def parse(self, raw: Mapping[str, Any], index: int) -> EditCase:
        """One record in either COUNTERFACT schema (see
        :func:`~lightning_rome.data.parse_counterfact_record`)."""
        return parse_counterfact_record(raw, index)
