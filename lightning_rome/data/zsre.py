"""zsRE (MEND's format) as a LightningDataModule."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from typing_extensions import override

from lightning_rome.data.base import EditCaseDataModule, SplitArg
from lightning_rome.data.parsing import parse_zsre_record
from lightning_rome.records import EditCase

__all__ = ["ZSRE_URL", "ZsREDataModule"]

#: ROME's public copy of MEND's zsRE evaluation split (MEND's format).
ZSRE_URL = "https://rome.baulab.info/data/dsets/zsre_mem.json"


class ZsREDataModule(EditCaseDataModule):
    """zsRE question-answering edits (MEND's format) as :class:`~lightning_rome.data.EditCase`.

    MEND's records (``subject, src, pred, rephrase, alt, answers, loc, loc_ans, cond``) become
    requests with the convention of ROME's and MEMIT's zsRE evaluation:

    * prompt: the question ``src`` with the subject replaced by ``{}``, e.g.
      ``"What is the product made by {}?"``. If the subject appears in ``src`` only up to letter
      case, the subject is taken as written in ``src`` and a warning lists those cases; if it is
      not there at all the record is malformed.
    * ``target_new = alt``, ``target_true = answers[0]``;
    * paraphrase: ``rephrase``;
    * neighborhood (specificity): ``loc + loc_suffix`` (``"nq question: ...?"``) with gold answer
      ``loc_ans``;
    * case id: the record's position in the file (MEND's files have no ids), or its
      ``case_id`` field when present.

    Records with an empty ``alt`` (two in MEND's 1k training sample) are malformed: skipped with
    a warning, or an error with ``strict=True``.

    Args:
        path: the zsRE file; without it, ``zsre_mem.json``, ``zsre/zsre_mem.json`` or
            ``zsre/zsre_mend_eval.json`` under the data folder, else ``url``.
        loc_suffix: appended to the ``loc`` question (ROME/MEMIT use ``"?"``; ``""`` keeps it
            verbatim).
        **others: as for :class:`~lightning_rome.data.CounterFactDataModule`.

    Example:
        >>> dm = ZsREDataModule("zsre/zsre_mend_train_1k.json", limit=1)
        >>> dm.setup("test")
        >>> dm.test_dataset[0].request.prompt
        'What is the product made by {}?'
    """

    what: ClassVar[str] = "zsRE"
    default_files: ClassVar[tuple[str, ...]] = (
        "zsre_mem.json", "zsre/zsre_mem.json", "zsre/zsre_mend_eval.json")
    position_ids: ClassVar[bool] = True

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        data_dir: str | os.PathLike[str] | None = None,
        url: str | None = ZSRE_URL,
        loc_suffix: str = "?",
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
        self.loc_suffix = loc_suffix

    @override
    def parse(self, raw: Mapping[str, Any], index: int) -> EditCase:
        """One MEND zsRE record (see :func:`~lightning_rome.data.parse_zsre_record`)."""
        case = parse_zsre_record(raw, index, self.loc_suffix)
        if case.request.subject != raw["subject"]:
            self.note(case.case_id,  # type: ignore[arg-type]
                      f"subject {raw['subject']!r} matched {case.request.subject!r} in src only "
                      "ignoring case; the subject as written in src is used")
        return case
