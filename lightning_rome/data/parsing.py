"""Turn raw JSON records (COUNTERFACT in ROME's or the reduced schema, MEND's zsRE, ROME's known
facts) into :class:`EditCase` and :class:`KnownFact`, and collect the malformed ones.

These functions need no Trainer; the DataModules call them at ``setup``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lightning_rome.records import CaseId, EditCase, KnownFact, MalformedRecordError, R
from lightning_rome.requests import EditRequest

__all__ = [
    "parse_counterfact_record",
    "parse_known_fact",
    "parse_records",
    "parse_zsre_record",
    "record_case_id",
]


def _missing(raw: Mapping[str, Any], fields: Sequence[str]) -> None:
    absent = [f for f in fields if raw.get(f) is None]
    if absent:
        raise ValueError(f"missing field(s) {absent}")


def _text(raw: Mapping[str, Any], name: str) -> str:
    v = raw.get(name)
    if not isinstance(v, str):
        raise ValueError(f"field {name!r} must be a str, got {v!r}")
    if not v.strip():
        raise ValueError(f"field {name!r} is empty")
    return v


def _opt_text(raw: Mapping[str, Any], name: str) -> str | None:
    v = raw.get(name)
    if v is None:
        return None
    if not isinstance(v, str):
        raise ValueError(f"field {name!r} must be a str, got {v!r}")
    return v


def _template(text: str, subject: str, field: str) -> str:
    """``text`` with the first occurrence of ``subject`` replaced by ``{}``."""
    i = text.find(subject)
    if i < 0:
        raise ValueError(f"subject {subject!r} is not in the {field} {text!r}")
    return text[:i] + "{}" + text[i + len(subject):]


def record_case_id(raw: Mapping[str, Any], index: int, key: str = "case_id",
                   ) -> CaseId:
    """The record's id from ``raw[key]``, or its position ``index`` in the file when the schema
    has no id field (MEND's zsRE).

    Raises:
        ValueError: the id is present but is neither an int nor a non-empty str.
    """
    if key not in raw or raw.get(key) is None:
        raise ValueError(f"missing field {key!r}")
    cid = raw[key]
    if isinstance(cid, bool) or not isinstance(cid, int | str) or (isinstance(cid, str)
                                                                      and not cid.strip()):
        raise ValueError(f"{key} must be an int or a non-empty str, got {cid!r}")
    return cid


def _str_or_id(v: Any, field: str) -> tuple[str, str | None]:
    """ROME's ``{"str": ..., "id": ...}`` objects, or a bare string."""
    if isinstance(v, Mapping):
        s, i = v.get("str"), v.get("id")
        if not isinstance(s, str):
            raise ValueError(f"{field}.str must be a str, got {s!r}")
        return s, (i if isinstance(i, str) else None)
    if isinstance(v, str):
        return v, None
    raise ValueError(f"{field} must be a str or {{'str': ...}}, got {v!r}")


def _prompt_list(raw: Mapping[str, Any], name: str, required: bool) -> list[Any]:
    v = raw.get(name)
    if v is None:
        if required:
            raise ValueError(f"missing field(s) [{name!r}]")
        return []
    if isinstance(v, str) or not isinstance(v, Sequence):
        raise ValueError(f"field {name!r} must be a list, got {type(v).__name__}")
    return list(v)


def parse_counterfact_record(raw: Mapping[str, Any], index: int = 0) -> EditCase:
    """One COUNTERFACT record, in either schema, as an :class:`EditCase`.

    * ROME's ``counterfact.json`` / MEMIT's ``multi_counterfact.json``: ``case_id``,
      ``requested_rewrite`` (``prompt`` with ``{}``, ``subject``, ``target_new.str``,
      ``target_true.str``, ``relation_id``), ``paraphrase_prompts``, ``neighborhood_prompts``
      (strings, or ``{"prompt", "target"}`` objects), and optionally ``attribute_prompts``,
      ``generation_prompts``, ``pararel_idx``. Neighborhood answers are ``target_true``.
    * The reduced EasyEdit-style files: ``case_id``, ``prompt`` (subject filled in),
      ``subject``, ``target_new``, ``ground_truth``, and optionally ``rephrase_prompt``,
      ``locality_prompt``, ``locality_ground_truth`` (default: ``ground_truth``). The edit
      template is ``prompt`` with the first occurrence of the subject replaced by ``{}``.

    Raises:
        ValueError: a required field is missing or empty, the subject is not in the prompt, or
            the prompt has braces other than the subject slot. The message names the field.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"a record must be a JSON object, got {type(raw).__name__}")
    cid = record_case_id(raw, index)
    if raw.get("requested_rewrite") is not None:
        rw = raw["requested_rewrite"]
        if not isinstance(rw, Mapping):
            raise ValueError(f"requested_rewrite must be an object, got {rw!r}")
        _missing(rw, ["prompt", "subject", "target_new", "target_true"])
        new, new_id = _str_or_id(rw["target_new"], "target_new")
        true, true_id = _str_or_id(rw["target_true"], "target_true")
        request = EditRequest(prompt=_text(rw, "prompt"), subject=_text(rw, "subject"),
                              target_new=new, target_true=true, case_id=cid)
        neighbors, answers = [], []
        for n in _prompt_list(raw, "neighborhood_prompts", required=True):
            if isinstance(n, Mapping):  # {"prompt": ..., "target": ...}
                neighbors.append(_text(n, "prompt"))
                answers.append(_text(n, "target").strip())
            else:
                neighbors.append(n)
                answers.append(true)
        rel = rw.get("relation_id")
        return EditCase(
            request=request,
            paraphrase_prompts=tuple(_prompt_list(raw, "paraphrase_prompts", required=True)),
            neighborhood_prompts=tuple(neighbors),
            neighborhood_answers=tuple(answers),
            attribute_prompts=tuple(_prompt_list(raw, "attribute_prompts", required=False)),
            generation_prompts=tuple(_prompt_list(raw, "generation_prompts", required=False)),
            relation_id=rel if isinstance(rel, str) else None,
            target_new_id=new_id,
            target_true_id=true_id,
            source="counterfact",
        )
    # The reduced EasyEdit-style schema.
    _missing(raw, ["prompt", "subject", "target_new", "ground_truth"])
    subject = _text(raw, "subject")
    template = _template(_text(raw, "prompt"), subject, "prompt")
    request = EditRequest(prompt=template, subject=subject, target_new=_text(raw, "target_new"),
                          target_true=_text(raw, "ground_truth"), case_id=cid)
    rephrase = _opt_text(raw, "rephrase_prompt")
    loc = _opt_text(raw, "locality_prompt")
    loc_gt = _opt_text(raw, "locality_ground_truth") or request.target_true
    return EditCase(
        request=request,
        paraphrase_prompts=(rephrase,) if rephrase else (),
        neighborhood_prompts=(loc,) if loc else (),
        neighborhood_answers=(loc_gt,) if loc else (),
        source="counterfact-reduced",
    )


def parse_zsre_record(raw: Mapping[str, Any], index: int = 0, loc_suffix: str = "?",
                      ) -> EditCase:
    """One record of MEND's zsRE files as an :class:`EditCase`, with ROME/MEMIT's conventions.

    * The edit prompt is the question ``src`` with the subject replaced by ``{}``; when ``src``
      holds the subject only up to letter case, the subject is taken as written in ``src``.
    * ``target_new`` is ``alt``; ``target_true`` is ``answers[0]``.
    * The paraphrase is ``rephrase``.
    * The neighborhood prompt is the Natural Questions question ``loc`` (``"nq question: ..."``)
      followed by ``loc_suffix`` (ROME and MEMIT append ``"?"``), with gold answer ``loc_ans``.
    * The case id is ``case_id`` if the record has one, else its position ``index`` in the file.

    Raises:
        ValueError: a field is missing or empty (e.g. ``alt == ""``), or the subject is not in
            ``src`` even ignoring case.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"a record must be a JSON object, got {type(raw).__name__}")
    cid = record_case_id(raw, index) if raw.get("case_id") is not None else index
    _missing(raw, ["src", "subject", "alt", "answers", "rephrase", "loc", "loc_ans"])
    src, subject = _text(raw, "src"), _text(raw, "subject")
    if subject not in src:
        m = re.search(re.escape(subject), src, flags=re.IGNORECASE)
        if m is None:
            raise ValueError(f"subject {subject!r} is not in src {src!r} (even ignoring case)")
        subject = m.group(0)
    answers = raw["answers"]
    if isinstance(answers, str) or not isinstance(answers, Sequence) or not answers:
        raise ValueError(f"field 'answers' must be a non-empty list, got {answers!r}")
    if not isinstance(answers[0], str) or not answers[0].strip():
        raise ValueError(f"answers[0] is empty or not a str: {answers[0]!r}")
    alt = _opt_text(raw, "alt")
    if not alt or not alt.strip():
        raise ValueError(f"the new target 'alt' is empty: {alt!r}")
    request = EditRequest(prompt=_template(src, subject, "src"), subject=subject,
                          target_new=alt, target_true=answers[0], case_id=cid)
    return EditCase(
        request=request,
        paraphrase_prompts=(_text(raw, "rephrase"),),
        neighborhood_prompts=(_text(raw, "loc") + loc_suffix,),
        neighborhood_answers=(_text(raw, "loc_ans").strip(),),
        source="zsre",
    )


def parse_known_fact(raw: Mapping[str, Any], index: int = 0) -> KnownFact:
    """One record of ROME's ``known_1000.json`` (``known_id, subject, attribute, template,
    prediction, prompt, relation_id``) as a :class:`KnownFact`.

    Raises:
        ValueError: ``known_id``, ``subject``, ``prompt`` or ``attribute`` is missing or empty,
            or the subject is not in the prompt.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"a record must be a JSON object, got {type(raw).__name__}")
    kid = record_case_id(raw, index, key="known_id")
    if not isinstance(kid, int):
        raise ValueError(f"known_id must be an int, got {kid!r}")
    _missing(raw, ["subject", "prompt", "attribute"])
    return KnownFact(known_id=kid, prompt=_text(raw, "prompt"), subject=_text(raw, "subject"),
                     attribute=_text(raw, "attribute").strip(),
                     template=_opt_text(raw, "template"),
                     prediction=_opt_text(raw, "prediction"),
                     relation_id=_opt_text(raw, "relation_id"))


def _fallback_id(raw: Any, index: int, key: str, position_ids: bool) -> CaseId:
    if isinstance(raw, Mapping):
        cid = raw.get(key)
        if isinstance(cid, int | str) and not isinstance(cid, bool) and str(cid).strip():
            return cid
    return index if position_ids else f"#{index}"


def parse_records(raws: Sequence[Any], parse: Callable[[Any, int], R], *, source: str = "",
                  strict: bool = False, id_key: str = "case_id", position_ids: bool = False,
                  ) -> tuple[list[R], list[tuple[CaseId, str]]]:
    """Parse every raw record, collecting the malformed ones instead of stopping at the first.

    A record is malformed when ``parse`` raises ``ValueError``/``TypeError``, or when its case id
    repeats an earlier record's (the later one is reported).

    Args:
        raws: the raw JSON records, in file order.
        parse: ``parse(raw, index) -> record``.
        source: the file name, for messages.
        strict: raise on the first malformed record set instead of returning them.
        id_key: the raw field to name a record by when it cannot be parsed.
        position_ids: the schema's case ids are file positions (MEND's zsRE): a record without
            ``id_key`` is named by its position ``i`` rather than ``"#i"``.

    Returns:
        The valid records in file order, and ``(case_id, reason)`` for each malformed record
        (``case_id`` is ``"#i"``, the position in the file, when the record has no usable id).

    Raises:
        MalformedRecordError: ``strict`` and some records are malformed; it lists them all.
    """
    records: list[R] = []
    problems: list[tuple[CaseId, str]] = []
    seen: set[CaseId] = set()
    for i, raw in enumerate(raws):
        try:
            rec = parse(raw, i)
        except (ValueError, TypeError) as e:
            problems.append((_fallback_id(raw, i, id_key, position_ids), str(e)))
            continue
        if rec.case_id in seen:
            problems.append((rec.case_id, f"duplicate case id {rec.case_id!r}"))
            continue
        seen.add(rec.case_id)
        records.append(rec)
    if strict and problems:
        raise MalformedRecordError(problems, source)
    return records, problems
