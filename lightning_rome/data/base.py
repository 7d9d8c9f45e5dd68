"""The shared machinery of the COUNTERFACT, zsRE and known-facts DataModules: sources, splits,
validation at ``setup``, and loaders that shard evaluation without repeating cases."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_rome.data.parsing import parse_records
from lightning_rome.data.sources import (
    SplitSpec,
    download_json,
    downloaded_path,
    is_offline,
    load_json_records,
    parse_split,
    resolve_file,
)
from lightning_rome.records import (
    CaseId,
    EditCase,
    MalformedRecordError,
    MalformedRecordWarning,
    R,
    collate_records,
)
from lightning_rome.utils.paths import DATA_ENV, data_root

__all__ = ["SPLITS", "EditCaseDataModule", "RecordDataModule", "RecordDataset"]

Split = Literal["train", "val", "test", "predict"]
SPLITS: tuple[Split, ...] = ("train", "val", "test", "predict")
_STAGE_SPLITS: dict[str | None, tuple[Split, ...]] = {
    "fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",),
    None: SPLITS,
}
SplitArg = str | tuple[int | None, int | None] | dict[str, Any] | None


class RecordDataset(Dataset, Generic[R]):
    """The validated records of one split, in order (a map-style ``Dataset``).

    Attributes:
        records: the records.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"predict"``.
        source: the file they were read from.
        malformed: ``(case_id, reason)`` for each record that was skipped.
    """

    def __init__(self, records: Sequence[R], split: str = "", source: str = "",
                 malformed: Sequence[tuple[CaseId, str]] = ()) -> None:
        self.records = list(records)
        self.split = split
        self.source = source
        self.malformed = list(malformed)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> R:
        return self.records[i]

    @property
    def case_ids(self) -> list[CaseId]:
        """The case id of each record, in order."""
        return [r.case_id for r in self.records]

    def __repr__(self) -> str:
        return f"RecordDataset(split={self.split!r}, n={len(self)}, source={self.source!r})"


class RecordDataModule(LightningDataModule, Generic[R]):
    """Base class: reads a JSON records file into validated records, per split.

    Subclasses set :attr:`what`, :attr:`default_files`, :attr:`default_url` and implement
    :meth:`parse`. See :class:`~lightning_rome.data.CounterFactDataModule` for the arguments.
    """

    #: The dataset's name, for messages.
    what: ClassVar[str] = "data"
    #: Names looked up under the data folder when no path is given.
    default_files: ClassVar[tuple[str, ...]] = ()
    #: The id field that names a raw record in messages.
    id_key: ClassVar[str] = "case_id"
    #: Records without ``id_key`` are identified by their position in the file.
    position_ids: ClassVar[bool] = False

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        data_dir: str | os.PathLike[str] | None = None,
        url: str | None = None,
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
        super().__init__()
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be a positive int or None, got {limit}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.path = None if path is None else os.fspath(path)
        self.data_dir = None if data_dir is None else os.fspath(data_dir)
        self.url = url
        self.splits: dict[Split, SplitSpec | None] = {
            "train": parse_split(train_split), "val": parse_split(val_split),
            "test": parse_split(test_split), "predict": parse_split(predict_split)}
        self.limit = limit
        self.shuffle = shuffle
        self.seed = seed
        self.strict = strict
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        self.datasets: dict[Split, RecordDataset[R]] = {}
        self._notes: list[tuple[CaseId, str]] = []

    # ----------------------------------------------------------------------------- parsing
    def parse(self, raw: Mapping[str, Any], index: int) -> R:
        """Turn one raw record (at position ``index`` in its file) into a record; raise
        ``ValueError`` naming the problem when it is malformed."""
        raise NotImplementedError

    def note(self, case_id: CaseId, message: str) -> None:
        """Record that a record was read with an adjustment (reported as a warning at setup)."""
        self._notes.append((case_id, message))

    # ----------------------------------------------------------------------------- sources
    def _source(self, spec: SplitSpec) -> tuple[Path | None, str | None]:
        """The local file of a split, or ``(None, url)`` when it must be downloaded."""
        if spec.file is not None:
            return resolve_file(spec.file, self.data_dir, f"{self.what} file"), None
        if self.path is not None:
            return resolve_file(self.path, self.data_dir, f"{self.what} file"), None
        root = data_root(self.data_dir)
        if root is not None:
            for name in self.default_files:
                if (root / name).is_file():
                    return root / name, None
        if self.url:
            cached = downloaded_path(self.url)
            return (cached, None) if cached.is_file() else (None, self.url)
        raise FileNotFoundError(self._missing_message("no download URL is configured"))

    def _missing_message(self, why: str) -> str:
        root = data_root(self.data_dir)
        where = (f"{DATA_ENV} (or data_dir) is {str(root)!r} and holds none of "
                 f"{list(self.default_files)}" if root is not None else f"{DATA_ENV} is not set")
        return (f"no {self.what} file: no path was given (path=... or a split file), {where}, and "
                f"it cannot be downloaded: {why}. Pass path=... or set the environment variable "
                f"{DATA_ENV} to a folder holding one of {list(self.default_files)}")

    def _configured(self, stage: str | None) -> list[Split]:
        if stage not in _STAGE_SPLITS:
            raise ValueError(f"unknown stage {stage!r}; expected one of {list(_STAGE_SPLITS)}")
        return [s for s in _STAGE_SPLITS[stage] if self.splits[s] is not None]

    @override
    def prepare_data(self) -> None:
        """Download the release when no local file is configured (called by Lightning on one
        process per node), and build the ``datasets`` cache of each file. Assigns no state."""
        done: set[str] = set()
        for split in self._configured(None):
            local, url = self._source(self.splits[split])  # type: ignore[arg-type]
            if local is None:
                assert url is not None
                if is_offline():
                    raise FileNotFoundError(self._missing_message(
                        f"downloads are disabled (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE=1), "
                        f"URL {url}"))
                try:
                    local = download_json(url, downloaded_path(url))
                except ConnectionError as e:
                    raise FileNotFoundError(self._missing_message(str(e))) from e
            if str(local) not in done:
                load_json_records(local, self.cache_dir)
                done.add(str(local))

    @override
    def setup(self, stage: str | None = None) -> None:
        """Read, validate, split, shuffle and limit the splits that ``stage`` uses, on every
        process. Malformed records are reported here, before any step runs: with ``strict`` a
        :class:`MalformedRecordError` lists them; otherwise they are skipped with a
        :class:`MalformedRecordWarning` that lists their case ids."""
        loaded: dict[str, tuple[list, list, list]] = {}
        for split in self._configured(stage):
            if split not in self.datasets:
                self.datasets[split] = self._build(split, loaded)
        if stage in ("fit", None) and "train" in self.datasets and "val" in self.datasets:
            shared = set(self.datasets["train"].case_ids) & set(self.datasets["val"].case_ids)
            if shared and self.datasets["train"].source == self.datasets["val"].source:
                rank_zero_warn(f"{self.what}: the train and val splits share {len(shared)} "
                               f"case(s), e.g. {sorted(shared, key=str)[:5]}")

    def _build(self, split: Split, loaded: dict[str, tuple[list, list, list]],
               ) -> RecordDataset[R]:
        spec = self.splits[split]
        assert spec is not None
        local, url = self._source(spec)
        if local is None:
            why = ("downloads are disabled (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE=1)" if is_offline()
                   else f"{url} has not been downloaded yet; call prepare_data() first (the "
                        "Trainer does)")
            raise FileNotFoundError(self._missing_message(why))
        key = str(local)
        if key not in loaded:  # each file is read and validated once per setup call
            self._notes = []
            parsed = parse_records(load_json_records(local, self.cache_dir), self.parse,
                                   source=key, id_key=self.id_key,
                                   position_ids=self.position_ids)
            loaded[key] = (*parsed, self._notes)
            self._notes = []
        records, problems, notes = (list(x) for x in loaded[key])
        if spec.is_range:
            records = [r for r in records if spec.contains(r.case_id)]
            problems = [(c, w) for c, w in problems
                        if not isinstance(c, int) or spec.contains(c)]
            notes = [(c, w) for c, w in notes if not isinstance(c, int) or spec.contains(c)]
        which = (f"case ids [{'' if spec.start is None else spec.start}:"
                 f"{'' if spec.stop is None else spec.stop}) of" if spec.is_range else "all of")
        where = f"the {split} split ({which} {key})"
        if problems and self.strict:
            raise MalformedRecordError(problems, f"{self.what} {where}")
        if problems:
            shown = "; ".join(f"case {c}: {w}" for c, w in problems[:20])
            more = f"; ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            rank_zero_warn(f"{self.what}: skipped {len(problems)} malformed record(s) in {where}: "
                           f"{shown}{more} (strict=True raises instead)",
                           category=MalformedRecordWarning)
        if notes:
            shown = "; ".join(f"case {c}: {w}" for c, w in notes[:20])
            rank_zero_warn(f"{self.what}: {len(notes)} record(s) in {where} were adjusted: {shown}")
        if self.shuffle:
            random.Random(self.seed).shuffle(records)
        if self.limit is not None:
            records = records[: self.limit]
        if not records:
            raise ValueError(f"{self.what}: {where} holds no valid record")
        return RecordDataset(records, split, key, problems)

    # ----------------------------------------------------------------------------- loaders
    def dataset(self, split: Split) -> RecordDataset[R]:
        """The records of a split (after :meth:`setup`).

        Raises:
            MisconfigurationException: the split is not configured or not set up yet.
        """
        if self.splits.get(split) is None:
            raise MisconfigurationException(
                f"{type(self).__name__} has no {split} split: pass {split}_split=... "
                "('all', 'start:stop' case ids, or a file)")
        if split not in self.datasets:
            raise MisconfigurationException(
                f"the {split} split of {type(self).__name__} is not set up: call setup() first "
                "(the Trainer does)")
        return self.datasets[split]

    @property
    def train_dataset(self) -> RecordDataset[R] | None:
        return self.datasets.get("train")

    @property
    def val_dataset(self) -> RecordDataset[R] | None:
        return self.datasets.get("val")

    @property
    def test_dataset(self) -> RecordDataset[R] | None:
        return self.datasets.get("test")

    @property
    def predict_dataset(self) -> RecordDataset[R] | None:
        return self.datasets.get("predict")

    def collate_fn(self, split: Split) -> Callable[[list[R]], Any]:
        """The ``collate_fn`` of a split (default: :func:`collate_records`)."""
        return collate_records

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return int(trainer.world_size), int(trainer.global_rank)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def _loader(self, split: Split) -> DataLoader:
        ds = self.dataset(split)
        kwargs: dict[str, Any] = {}
        if split == "train":
            kwargs.update(shuffle=True, generator=torch.Generator().manual_seed(self.seed))
        elif split in ("test", "predict"):
            world, rank = self._world()
            if world > 1:
                if len(ds) < world:
                    raise MisconfigurationException(
                        f"the {split} split has {len(ds)} case(s) for {world} processes; every "
                        "process needs at least one")
                # Each case exactly once: no padding (ranks may run one batch fewer).
                kwargs["sampler"] = UnrepeatedDistributedSampler(
                    ds, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(ds, batch_size=self.batch_size, num_workers=self.num_workers,
                          collate_fn=self.collate_fn(split),
                          persistent_workers=self.num_workers > 0, **kwargs)

    @override
    def train_dataloader(self) -> DataLoader:
        """Batches of the train split, reshuffled every epoch (seeded by ``seed``)."""
        return self._loader("train")

    @override
    def val_dataloader(self) -> DataLoader | list:
        """Batches of the val split in order, or no loader (``[]``) when it is not configured.
        Under DDP, Lightning's ``DistributedSampler`` shards it (padding with repeats)."""
        if self.splits["val"] is None:
            return []
        return self._loader("val")

    @override
    def test_dataloader(self) -> DataLoader:
        """Batches of the test split in order. Under DDP each process gets a disjoint share and
        together they see every case exactly once (no padding; one process may run one batch
        fewer, so do not call collective operations per step)."""
        return self._loader("test")

    @override
    def predict_dataloader(self) -> DataLoader:
        """Batches of the predict split, sharded like :meth:`test_dataloader`."""
        return self._loader("predict")


class EditCaseDataModule(RecordDataModule[EditCase]):
    """Base class of the COUNTERFACT and zsRE DataModules: adds the ``edit_train`` mode, in
    which the train and val loaders yield tokenized :class:`EditTrainingBatch` for MEND and KE.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        mode: Literal["cases", "edit_train"] = "cases",
        tokenizer: Any = None,
        collator_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(path, **kwargs)
        if mode not in ("cases", "edit_train"):
            raise ValueError(f"mode must be 'cases' or 'edit_train', got {mode!r}")
        if mode == "edit_train" and tokenizer is None:
            raise MisconfigurationException(
                "mode='edit_train' tokenizes batches: pass tokenizer=... (a tokenizer or a path)")
        self.mode = mode
        self.tokenizer = tokenizer
        self.collator_kwargs = dict(collator_kwargs or {})
        if "pool" in self.collator_kwargs or "tokenizer" in self.collator_kwargs:
            raise ValueError("collator_kwargs may not set 'pool' or 'tokenizer'")

    @override
    def collate_fn(self, split: Split) -> Callable[[list[EditCase]], Any]:
        """Train and val batches are :class:`EditTrainingBatch` in ``edit_train`` mode (other
        cases are drawn from the same split); test and predict batches are always a
        :class:`RecordBatch` of cases."""
        if self.mode == "edit_train" and split in ("train", "val"):
            from lightning_rome.data.batches import EditTrainingCollator

            if isinstance(self.tokenizer, str | os.PathLike):
                from lightning_rome.models import load_tokenizer

                self.tokenizer = load_tokenizer(self.tokenizer)
            return EditTrainingCollator(self.tokenizer, pool=self.dataset(split).records,
                                        **self.collator_kwargs)
        return collate_records

