"""The request to rewrite one fact: the object every editor, dataset and metric shares."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["EditRequest", "as_requests", "check_batch"]

_WARNED_TRAILING = False  # the trailing-whitespace warning is given once per process


def _check_str(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, str):
        raise TypeError(f"EditRequest.{name} must be a str, got {type(value).__name__}: {value!r}")


@dataclass(frozen=True)
class EditRequest:
    """A requested rewrite ``(s, r, o*)`` of a fact ``(s, r, o)``.

    Args:
        prompt: the relation rendered as text, with ``{}`` exactly once where the subject goes,
            e.g. ``"{} is located in the city of"``. Trailing whitespace is stripped (with a
            warning, once per process): the target is tokenized as a continuation with its own
            leading space, so a prompt ending in a space would teach it after a stray space
            token and weaken the edit.
        subject: the subject ``s``, e.g. ``"Eiffel Tower"``.
        target_new: the new object ``o*``, e.g. ``"Rome"``. A leading space is added when it is
            tokenized as a continuation (see :func:`lightning_rome.tokens.continuation_ids`).
        target_true: the true object ``o^c``, when known (needed for the COUNTERFACT metrics).
        case_id: an identifier carried through to results files.

    Raises:
        TypeError: a field has the wrong type.
        ValueError: the prompt does not contain ``{}`` exactly once, the subject or a target is
            empty or whitespace. The message names the field.

    Example:
        >>> r = EditRequest("{} is located in the city of", "Eiffel Tower", "Rome")
        >>> r.text
        'Eiffel Tower is located in the city of'
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: int | str | None = None

    def __post_init__(self) -> None:
        _check_str("prompt", self.prompt)
        _check_str("subject", self.subject)
        _check_str("target_new", self.target_new)
        _check_str("target_true", self.target_true, allow_none=True)
        if self.case_id is not None and not isinstance(self.case_id, int | str):
            raise TypeError(f"EditRequest.case_id must be an int or str, got {self.case_id!r}")
        if self.prompt != self.prompt.rstrip():
            _warn_trailing(self.prompt)
            object.__setattr__(self, "prompt", self.prompt.rstrip())
        n = self.prompt.count("{}")
        if n != 1:
            raise ValueError(
                f"EditRequest.prompt must contain '{{}}' exactly once (where the subject goes), "
                f"found {n} in {self.prompt!r}"
            )
        rest = self.prompt.replace("{}", "")
        if "{" in rest or "}" in rest:
            raise ValueError(
                f"EditRequest.prompt may contain no brace other than the one '{{}}': {self.prompt!r}"
            )
        if not self.subject.strip():
            raise ValueError(f"EditRequest.subject is empty or whitespace: {self.subject!r}")
        if self.subject != self.subject.strip():
            raise ValueError(
                f"EditRequest.subject has leading or trailing whitespace: {self.subject!r}; "
                "put spaces in the prompt instead"
            )
        if not self.target_new.strip():
            raise ValueError(f"EditRequest.target_new is empty or whitespace: {self.target_new!r}")
        if self.target_true is not None and not self.target_true.strip():
            raise ValueError(f"EditRequest.target_true is empty or whitespace: {self.target_true!r}")

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the inverse of :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EditRequest:
        """Build a request from a flat dict, or from ROME's ``requested_rewrite`` schema
        (``{"prompt", "subject", "target_new": {"str": ...}, "target_true": {"str": ...}}``)."""
        if not isinstance(d, Mapping):
            raise TypeError(f"an edit request must be a mapping, got {type(d).__name__}")
        if "requested_rewrite" in d:
            case_id = d.get("case_id")
            d = dict(d["requested_rewrite"], case_id=case_id)
        unknown = set(d) - {"prompt", "subject", "target_new", "target_true", "case_id",
                            "relation_id"}
        if unknown:
            raise ValueError(f"unknown EditRequest field(s): {sorted(unknown)}")
        for field in ("prompt", "subject", "target_new"):
            if field not in d:
                raise ValueError(f"EditRequest field {field!r} is missing in {dict(d)!r}")

        def _str(v: Any) -> Any:
            return v["str"] if isinstance(v, Mapping) and "str" in v else v

        return cls(
            prompt=d["prompt"],
            subject=d["subject"],
            target_new=_str(d["target_new"]),
            target_true=_str(d.get("target_true")),
            case_id=d.get("case_id"),
        )


def _warn_trailing(prompt: str) -> None:
    global _WARNED_TRAILING
    if not _WARNED_TRAILING:
        _WARNED_TRAILING = True
        warnings.warn(f"EditRequest.prompt {prompt!r} ends in whitespace; trailing whitespace is "
                      "stripped from every prompt (the target is added with its own leading "
                      "space; a stray space token before it would weaken the edit)",
                      UserWarning, stacklevel=4)


def as_requests(requests: Any) -> list[EditRequest]:
    """Normalise one request, a dict, or a list of either into a list of :class:`EditRequest`."""
    if isinstance(requests, EditRequest | Mapping):
        requests = [requests]
    if isinstance(requests, str | bytes) or not isinstance(requests, Iterable):
        raise TypeError(f"expected an edit request, a mapping or a list of edit requests, got "
                        f"{type(requests).__name__}: {requests!r:.80}")
    out: list[EditRequest] = []
    for r in requests:
        out.append(r if isinstance(r, EditRequest) else EditRequest.from_dict(r))
    if not out:
        raise ValueError("no edit requests given")
    return out


def _describe(i: int, r: EditRequest) -> str:
    return (f"request #{i} (case_id={r.case_id!r}): {r.text!r} -> {r.target_new!r}"
            + (f" (true {r.target_true!r})" if r.target_true is not None else ""))


def check_batch(requests: Iterable[EditRequest], method: str = "this editor",
                ) -> list[EditRequest]:
    """The requests of one batch edit, checked: two requests for the same fact (the same prompt
    and subject) with different targets are refused, and exact duplicates (the same prompt,
    subject and targets; ``case_id`` may differ) are kept once, with a warning.

    A batch editor (MEMIT, FT, MEND, KE) fits all requests at once, so two targets for one
    fact would split the edit between them.

    Raises:
        ValueError: two requests conflict; the message names both.
    """
    seen: dict[tuple[str, str], tuple[int, EditRequest]] = {}
    out: list[EditRequest] = []
    dropped: list[str] = []
    for i, r in enumerate(requests):
        key = (r.prompt, r.subject)
        if key not in seen:
            seen[key] = (i, r)
            out.append(r)
            continue
        j, first = seen[key]
        if (first.target_new, first.target_true) != (r.target_new, r.target_true):
            raise ValueError(f"{method}: conflicting requests for the same fact (prompt and "
                             f"subject): {_describe(j, first)} and {_describe(i, r)}; edit them "
                             "in separate batches or drop one")
        dropped.append(f"{_describe(i, r)} repeats #{j} (case_id={first.case_id!r})")
    if dropped:
        warnings.warn(f"{method}: duplicate requests are edited once: " + "; ".join(dropped),
                      UserWarning, stacklevel=3)
    return out
