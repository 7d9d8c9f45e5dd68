"""The record types that the COUNTERFACT, zsRE and known-facts DataModules yield, and the batch
that carries them through a Lightning loop unchanged."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

from lightning_rome.requests import EditRequest

__all__ = [
    "CaseId",
    "EditCase",
    "KnownFact",
    "MalformedRecordError",
    "MalformedRecordWarning",
    "RecordBatch",
    "collate_records",
]

CaseId = int | str


class MalformedRecordError(ValueError):
    """Records of a data file that cannot be turned into valid records.

    Attributes:
        problems: ``(case_id, reason)`` for each bad record; ``case_id`` is ``"#i"`` (the record's
            position in the file) when the record has no usable id.
        source: the file or split the records came from.
    """

    def __init__(self, problems: Sequence[tuple[CaseId, str]], source: str = "") -> None:
        self.problems = list(problems)
        self.source = source
        shown = "; ".join(f"case {cid}: {why}" for cid, why in self.problems[:20])
        more = f"; ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        where = f" in {source}" if source else ""
        super().__init__(f"{len(self.problems)} malformed record(s){where}: {shown}{more}")


class MalformedRecordWarning(UserWarning):
    """Malformed records were skipped (``strict=False``); the message lists their case ids."""


def _str_tuple(name: str, values: Any) -> tuple[str, ...]:
    if type(values) is not tuple and type(values) is not list and (
            isinstance(values, str) or not isinstance(values, Sequence)):
        raise TypeError(f"{name} must be a sequence of str, got {type(values).__name__}")
    out = tuple(values)
    for v in out:
        if type(v) is not str or not v.strip():
            raise ValueError(f"{name} must hold non-empty strings, got {v!r}")
    return out


@dataclass(frozen=True)
class EditCase:
    """One evaluation case: the requested rewrite and the prompts that measure its effect.

    COUNTERFACT (ROME's ``counterfact.json``, MEMIT's ``multi_counterfact.json`` and the reduced
    EasyEdit-style files) and zsRE (MEND's format) are all read into this one type.

    Args:
        request: the rewrite ``(s, r, o*)`` with the true object ``o^c`` as ``target_true`` and the
            case id as ``case_id``. ``request.prompt`` is a template with ``{}`` for the subject.
        paraphrase_prompts: full texts (subject filled in) that state the same fact differently;
            after the edit they should predict ``target_new`` (PS/PM, zsRE paraphrase).
        neighborhood_prompts: full texts about *other* subjects that the edit must not change
            (NS/NM, zsRE specificity).
        neighborhood_answers: the gold answer of each neighborhood prompt, same length. In
            COUNTERFACT it is the true object ``o^c`` of the case; in the reduced files it is
            ``locality_ground_truth``; in zsRE it is the Natural Questions answer ``loc_ans``.
        attribute_prompts: texts about other subjects whose true answer is ``target_new``
            (original COUNTERFACT only; empty otherwise).
        generation_prompts: prompts for free generation (GE, RS; original COUNTERFACT only).
        relation_id: the Wikidata relation, e.g. ``"P103"`` (original COUNTERFACT only).
        target_new_id: the Wikidata id of ``o*`` (original COUNTERFACT only; RS needs it).
        target_true_id: the Wikidata id of ``o^c`` (original COUNTERFACT only).
        source: ``"counterfact"``, ``"counterfact-reduced"`` or ``"zsre"``.

    Raises:
        TypeError, ValueError: a prompt list holds something other than non-empty strings, or
            ``neighborhood_answers`` does not match ``neighborhood_prompts`` in length.

    Example:
        >>> case = EditCase(EditRequest("{}, the", "Toko Yasuda", "piano", "guitar", case_id=2),
        ...                 paraphrase_prompts=("Toko Yasuda is incredible at",))
        >>> case.case_id, case.request.text
        (2, 'Toko Yasuda, the')
    """

    request: EditRequest
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    neighborhood_answers: tuple[str, ...] = ()
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    relation_id: str | None = None
    target_new_id: str | None = None
    target_true_id: str | None = None
    source: str = "counterfact"

    def __post_init__(self) -> None:
        if not isinstance(self.request, EditRequest):
            raise TypeError(f"EditCase.request must be an EditRequest, got {self.request!r}")
        for name in ("paraphrase_prompts", "neighborhood_prompts", "neighborhood_answers",
                     "attribute_prompts", "generation_prompts"):
            object.__setattr__(self, name, _str_tuple(f"EditCase.{name}", getattr(self, name)))
        if len(self.neighborhood_answers) != len(self.neighborhood_prompts):
            raise ValueError(
                f"EditCase.neighborhood_answers has {len(self.neighborhood_answers)} entries for "
                f"{len(self.neighborhood_prompts)} neighborhood prompts (case {self.case_id})")
        for name in ("relation_id", "target_new_id", "target_true_id"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise TypeError(f"EditCase.{name} must be a str or None, got {v!r}")

    @property
    def case_id(self) -> CaseId | None:
        """The case id (the request's ``case_id``)."""
        return self.request.case_id

    @property
    def rewrite_prompts(self) -> tuple[str, ...]:
        """The edit prompt with the subject filled in, as a one-element tuple (ES/EM, efficacy)."""
        return (self.request.text,)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (for results files)."""
        return {
            "case_id": self.case_id,
            "request": self.request.to_dict(),
            "paraphrase_prompts": list(self.paraphrase_prompts),
            "neighborhood_prompts": list(self.neighborhood_prompts),
            "neighborhood_answers": list(self.neighborhood_answers),
            "attribute_prompts": list(self.attribute_prompts),
            "generation_prompts": list(self.generation_prompts),
            "relation_id": self.relation_id,
            "target_new_id": self.target_new_id,
            "target_true_id": self.target_true_id,
            "source": self.source,
        }


@dataclass(frozen=True)
class KnownFact:
    """A fact the model is known to predict (ROME's ``known_1000.json``), for causal tracing.

    Args:
        known_id: the record's id (used as its case id).
        prompt: the full prompt, e.g. ``"Vinson Massif is located in the continent of"``.
        subject: the subject as it appears in ``prompt``, e.g. ``"Vinson Massif"``.
        attribute: the expected answer, e.g. ``"Antarctica"``.
        template: ROME's relation template, e.g. ``"{} is located in the continent"``. It may be
            shorter than ``prompt``; trace ``prompt`` (or :attr:`prompt_template`), not this.
        prediction: GPT-2 XL's greedy continuation recorded in the release, if present.
        relation_id: the Wikidata relation, e.g. ``"P30"``, if present.

    Example:
        >>> f = KnownFact(0, "Vinson Massif is located in the continent of", "Vinson Massif",
        ...               "Antarctica")
        >>> f.prompt_template
        '{} is located in the continent of'
    """

    known_id: int
    prompt: str
    subject: str
    attribute: str
    template: str | None = None
    prediction: str | None = None
    relation_id: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.known_id, int) or isinstance(self.known_id, bool):
            raise TypeError(f"KnownFact.known_id must be an int, got {self.known_id!r}")
        for name in ("prompt", "subject", "attribute"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"KnownFact.{name} is empty or not a str: {v!r}")
        if self.subject not in self.prompt:
            raise ValueError(f"KnownFact.subject {self.subject!r} is not in the prompt "
                             f"{self.prompt!r}")
        if "{" in self.prompt or "}" in self.prompt:
            raise ValueError(f"KnownFact.prompt may not contain braces: {self.prompt!r}")

    @property
    def case_id(self) -> int:
        """The record's id (``known_id``)."""
        return self.known_id

    @property
    def prompt_template(self) -> str:
        """``prompt`` with the (first) occurrence of the subject replaced by ``{}``."""
        s = self.prompt.index(self.subject)
        return self.prompt[:s] + "{}" + self.prompt[s + len(self.subject):]

    def to_dict(self) -> dict[str, Any]:
        """The record in ROME's schema (JSON-serialisable)."""
        return {"known_id": self.known_id, "subject": self.subject, "attribute": self.attribute,
                "template": self.template, "prediction": self.prediction, "prompt": self.prompt,
                "relation_id": self.relation_id}


R = TypeVar("R", EditCase, KnownFact)


class RecordBatch(Generic[R]):
    """A batch of records, kept as Python objects (no tensors).

    Prompt lists have different lengths from case to case, so a batch is just the list of records.
    This class wraps that list so that Lightning moves it to the device untouched: Lightning's
    ``apply_to_collection`` refuses frozen dataclasses inside lists, and this class is opaque to it.
    It behaves like a read-only list.

    Example:
        >>> batch = collate_records([EditCase(EditRequest("{}, the", "Toko Yasuda", "piano",
        ...                                               case_id=2))])
        >>> batch.case_ids, [r.subject for r in batch.requests]
        ([2], ['Toko Yasuda'])
    """

    __slots__ = ("records",)

    def __init__(self, records: Sequence[R]) -> None:
        self.records: list[R] = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[R]:
        return iter(self.records)

    @overload
    def __getitem__(self, i: int) -> R: ...

    @overload
    def __getitem__(self, i: slice) -> RecordBatch[R]: ...

    def __getitem__(self, i: int | slice) -> R | RecordBatch[R]:
        if isinstance(i, slice):
            return RecordBatch(self.records[i])
        return self.records[i]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RecordBatch) and self.records == other.records

    def __hash__(self) -> int:
        return hash(tuple(self.records))

    def __repr__(self) -> str:
        return f"RecordBatch(case_ids={self.case_ids!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"records": self.records}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.records = state["records"]

    @property
    def case_ids(self) -> list[CaseId | None]:
        """The case id of each record."""
        return [r.case_id for r in self.records]

    @property
    def requests(self) -> list[EditRequest]:
        """The edit requests of the cases (only for batches of :class:`EditCase`)."""
        out = []
        for r in self.records:
            if not isinstance(r, EditCase):
                raise TypeError(f"RecordBatch.requests needs EditCase records, got "
                                f"{type(r).__name__}")
            out.append(r.request)
        return out


def collate_records(records: Sequence[R]) -> RecordBatch[R]:
    """The DataModules' default ``collate_fn``: keep the records as they are, in a
    :class:`RecordBatch`."""
    return RecordBatch(records)
