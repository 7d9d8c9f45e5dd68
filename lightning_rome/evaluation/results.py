"""The per-case record schema and the results folder of an edit evaluation.

A folder holds ``run.json`` (what its results are determined by: :func:`run_signature`), one
``cases.rank{r}.jsonl`` per process (:class:`CaseResultsFile`: one checksummed record per case,
flushed as written) and, at the end, ``summary.json`` / ``summary.md``. :func:`prepare_folder`
checks a folder before a run resumes from it, :func:`load_results` reads (and repairs) its
records.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from lightning_rome.evaluation.editors import (
    case_fingerprint,
    editor_fingerprint,
    editor_hparams,
    editor_name,
    model_checksum,
)
from lightning_rome.evaluation.options import EvalOptions, Kind
from lightning_rome.records import EditCase
from lightning_rome.utils.io import atomic_path, atomic_write_json

if TYPE_CHECKING:
    from lightning_rome.editing import Editor

__all__ = [
    "RECORD_FORMAT",
    "RUN_FORMAT",
    "START_OVER",
    "CaseResultsFile",
    "Record",
    "case_key",
    "check_label",
    "check_stored_cases",
    "describe_changes",
    "generation_table",
    "load_results",
    "new_record",
    "no_edit_took",
    "prepare_folder",
    "record_checksum",
    "run_signature",
    "write_summary",
]

#: Version of the per-case record layout (the ``format`` field of every results line). 2: each
#: record carries ``case_sha256``, the fingerprint of the case it was computed from.
RECORD_FORMAT = 2
#: Version of ``run.json``, what a results folder belongs to. 2: the weights' SHA-256, the
#: editor's fingerprint, the dataset and the package version.
RUN_FORMAT = 2
#: How to start over, named in every refusal to resume (the Python argument and the CLI flag).
START_OVER = ("to start over, pass resume=False (CLI: --no-resume), which deletes the stored "
              "results, or write to another folder (results_dir=, CLI: --out)")
Record = dict[str, Any]


def record_checksum(record: Mapping[str, Any]) -> str:
    """SHA-256 of a record's canonical JSON, without its ``checksum`` field."""
    body = {k: v for k, v in record.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def new_record(case: EditCase, method: str) -> Record:
    """A case's record before it is measured (``status="ok"``, nothing scored yet)."""
    return {
        "format": RECORD_FORMAT,
        "case_id": case.case_id,
        "case_sha256": case_fingerprint(case),
        "source": case.source,
        "method": method,
        "request": case.request.to_dict(),
        "relation_id": case.relation_id,
        "target_new_id": case.target_new_id,
        "status": "ok",
        "error": None,
        "group": None,
        "pre": None,
        "post": None,
        "patch_norm": None,
        "patch_norms": None,
        "edit_seconds": None,
        "eval_seconds": None,
    }


# ---------------------------------------------------------------------------------- results file
class CaseResultsFile:
    """Per-case results of one process as JSON lines, written as they come.

    Each line is one record (see :func:`evaluate_cases`) with a ``checksum`` field (the SHA-256
    of the rest of the record, :func:`record_checksum`), so a truncated or altered line is
    detected when read. Every line is flushed as soon as it is written.

    Example:
        >>> with CaseResultsFile("results/cases.rank0.jsonl") as f:  # doctest: +SKIP
        ...     f.append(record)
        >>> records, problems = CaseResultsFile.read("results/cases.rank0.jsonl")  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fh: Any = None

    def open(self) -> CaseResultsFile:
        """Open for appending. A file whose last line was cut short gets a newline first, so
        that the next record starts on a line of its own (the cut line stays invalid)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cut = False
        if self.path.is_file() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                cut = fh.read(1) != b"\n"
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        if cut:
            self._fh.write("\n")
        return self

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> CaseResultsFile:
        return self.open() if self._fh is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one record as a checksummed line and flush it."""
        if self._fh is None:
            self.open()
        rec = dict(record)
        rec.pop("checksum", None)
        rec["checksum"] = record_checksum(rec)
        self._fh.write(json.dumps(rec, sort_keys=True, default=str) + "\n")
        self._fh.flush()

    @staticmethod
    def read(path: str | os.PathLike[str]) -> tuple[list[Record], list[tuple[int, str]]]:
        """The valid records of a file, and ``(line number, reason)`` for each invalid line
        (unparseable, truncated, a failed checksum, an unknown format)."""
        records: list[Record] = []
        problems: list[tuple[int, str]] = []
        path = Path(path)
        if not path.is_file():
            return records, problems
        with open(path, encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    why = "truncated line" if not line.endswith("\n") else "not valid JSON"
                    problems.append((n, why))
                    continue
                if not isinstance(rec, dict) or "checksum" not in rec:
                    problems.append((n, "not a results record (no checksum)"))
                elif rec["checksum"] != record_checksum(rec):
                    problems.append((n, f"checksum mismatch (case {rec.get('case_id')!r})"))
                elif rec.get("format") != RECORD_FORMAT or "case_id" not in rec:
                    problems.append((n, f"unknown record format {rec.get('format')!r}"))
                else:
                    records.append(rec)
        return records, problems


def _group_complete(rec: Record, by_id: Mapping[Any, Record]) -> bool:
    group = rec.get("group")
    if not group:
        return True
    return all(case_key(c) in by_id and by_id[case_key(c)].get("group") == group for c in group)


def case_key(case_id: Any) -> str:
    """A dict key that keeps ``1`` and ``"1"`` apart: ``json.dumps(case_id)``."""
    return json.dumps(case_id)


def load_results(folder: str | os.PathLike[str], pattern: str = "cases.rank*.jsonl", *,
                 retry_errors: bool = False, repair: bool = True) -> dict[str, Record]:
    """The valid per-case records of every results file in ``folder``, keyed by
    ``json.dumps(case_id)``.

    Invalid lines (a truncated last line, a failed checksum), duplicates (the first valid line
    wins), error records (with ``retry_errors``) and the records of incomplete sequential groups
    are dropped with a warning, so that their cases are evaluated again. With ``repair`` the
    files are rewritten (atomically) without the dropped lines.
    """
    folder = Path(folder)
    files = sorted(folder.glob(pattern))
    by_id: dict[str, Record] = {}
    kept: dict[Path, list[Record]] = {}
    dropped: dict[Path, int] = {}
    for path in files:
        records, problems = CaseResultsFile.read(path)
        for n, why in problems:
            _warn(f"{path}, line {n}: {why}; that case will be evaluated again")
        dropped[path] = len(problems)
        kept[path] = []
        for rec in records:
            k = case_key(rec["case_id"])
            if k in by_id:
                _warn(f"{path}: case {rec['case_id']!r} appears more than once; keeping "
                               "the first valid record")
                dropped[path] += 1
                continue
            if retry_errors and rec.get("status") == "error":
                _warn(f"{path}: case {rec['case_id']!r} failed before "
                               f"({rec.get('error')}); evaluating it again")
                dropped[path] += 1
                continue
            by_id[k] = rec
            kept[path].append(rec)
    incomplete = {k for k, rec in by_id.items() if not _group_complete(rec, by_id)}
    if incomplete:
        _warn(f"{folder}: {len(incomplete)} record(s) belong to incomplete sequential "
                       "groups; those groups will be evaluated again")
        for path in files:
            before = len(kept[path])
            kept[path] = [r for r in kept[path] if case_key(r["case_id"]) not in incomplete]
            dropped[path] += before - len(kept[path])
        by_id = {k: v for k, v in by_id.items() if k not in incomplete}
    if repair:
        for path in files:
            if dropped[path]:
                with atomic_path(path) as tmp:
                    tmp.write_text("".join(json.dumps(r, sort_keys=True, default=str) + "\n"
                                           for r in kept[path]), encoding="utf-8")
    return by_id


# ---------------------------------------------------------------------------------- module
_RUN_FIELDS = {
    "model_sha256": "the model's weights",
    "package_version": "the lightning_rome version",
    "editor": "the editor or its hyperparameters",
    "hparams": "the editor's hyperparameters",
    "method": "the editing method",
    "dataset": "the dataset",
    "model": "the model's name",
    "n_params": "the model's size",
}


def _short(v: Any) -> str:
    text = json.dumps(v, sort_keys=True, default=str) if not isinstance(v, str) else repr(v)
    if isinstance(v, str) and len(v) == 64 and all(ch in "0123456789abcdef" for ch in v):
        text = repr(v[:12] + "…")  # a SHA-256
    return text if len(text) <= 80 else text[:77] + "..."


def _dict_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted keys at which two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            out += _dict_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def describe_changes(old: Any, new: Mapping[str, Any]) -> str:
    """``run.json``'s differences, in words: ``the model's weights (model_sha256: 'ab12…' ->
    'cd34…')``, ``the editor or its hyperparameters (editor: hparams.v_lr)``, ..."""
    if not isinstance(old, dict):
        return "run.json is unreadable (cut short or not JSON)"
    parts = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<not recorded>"), new.get(key, "<not recorded>")
        if a == b:
            continue
        what = _RUN_FIELDS.get(key, "the option")
        if isinstance(a, dict) and isinstance(b, dict):
            detail = ", ".join(_dict_diff(a, b)[:6])
            parts.append(f"{what} ({key}: {detail})")
        else:
            parts.append(f"{what} ({key}: {_short(a)} -> {_short(b)})")
    return "; ".join(parts)

def check_stored_cases(folder: Any, stored: Mapping[str, Record],
                        cases: Sequence[EditCase]) -> None:
    """Refuse to resume when a stored record of one of ``cases`` (same case id) was computed
    from different data: another dataset with the same ids, or edited prompts."""
    for case in cases:
        rec = stored.get(case_key(case.case_id))
        if rec is None or rec.get("case_sha256") == case_fingerprint(case):
            continue
        if rec.get("source") != case.source:
            why = (f"it comes from the {rec.get('source')!r} dataset, this run's case from "
                   f"{case.source!r}")
        elif rec.get("request") != case.request.to_dict():
            why = "its edit request differs"
        else:
            why = "its prompts or answers differ"
        raise ValueError(f"{folder} holds a result for case {case.case_id!r} computed from other "
                         f"data ({why}); {START_OVER}")


def check_label(label: str) -> str:
    """``label`` if it can name a results folder under ``edit_eval/``; path-like labels (empty,
    ``.``, ``..``, separators, NUL), which would put the results (and the deletion of old ones by
    ``resume=False``) outside that folder, are refused."""
    if not isinstance(label, str):
        raise TypeError(f"label must be a string, got {type(label).__name__}")
    bad = [ch for ch in ("/", "\\", "\0", os.sep, os.altsep) if ch and ch in label]
    if not label.strip() or label.strip(". ") == "" or bad:
        raise ValueError(
            f"label {label!r} is path-like: it names the results folder "
            "{default_root_dir}/edit_eval/{label}, so it must not be empty, '.' or '..', or "
            "contain '/', '\\' or NUL; pass results_dir= to choose the folder itself")
    return label



def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


# ---------------------------------------------------------------------------------- run.json
def run_signature(model: nn.Module, editor: Editor | None, options: EvalOptions,
                  dataset: Kind | None) -> dict[str, Any]:
    """What the results in a folder are determined by (its ``run.json``): the package version,
    the model (name, size and the SHA-256 of every weight), the editor's fingerprint
    (:func:`~lightning_rome.evaluation.editor_fingerprint`: method, hyperparameters, networks),
    the dataset and the options that change the numbers. The data are checked per case (the
    ``case_sha256`` of each record). Hashes every weight: call it once per run."""
    from lightning_rome import __version__

    cfg = getattr(model, "config", None)
    return json.loads(json.dumps({
        "format": "lightning_rome.edit_eval", "version": RUN_FORMAT,
        "package_version": __version__,
        "method": editor_name(editor), "hparams": editor_hparams(editor),
        "editor": editor_fingerprint(editor), "mode": options.mode,
        "dataset": dataset,
        "baseline": options.baseline, "generation": options.generation,
        "generation_kwargs": options.generation_settings(),
        "seed": options.seed,
        "model": getattr(cfg, "_name_or_path", None) or getattr(cfg, "model_type", None),
        "n_params": sum(p.numel() for p in model.parameters()),
        "model_sha256": model_checksum(model),
    }, sort_keys=True, default=str))


def prepare_folder(folder: str | os.PathLike[str], signature: Mapping[str, Any], *,
                   resume: bool, retry_errors: bool = False,
                   cases: Sequence[EditCase] | None = None) -> Path:
    """Make ``folder`` ready for a run with ``signature`` (one process: rank zero).

    Without ``resume`` the stored results and summaries are deleted. With it, a folder of
    another run (another ``run.json``), or with results but no ``run.json``, is refused with a
    message naming what changed; the results files are repaired (:func:`load_results`); and
    when ``cases`` are known, a stored record computed from other data than its case is
    refused before any work. Then ``run.json`` is written (atomically).

    Raises:
        ValueError: the folder cannot be resumed (the message says how to start over).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    run = folder / "run.json"
    files = sorted(folder.glob("cases.rank*.jsonl"))
    if not resume:
        for f in [*files, folder / "summary.json", folder / "summary.md"]:
            if f.exists():
                f.unlink()
    elif run.is_file():
        try:
            old = json.loads(run.read_text())
        except ValueError:
            old = None
        if old != signature:
            raise ValueError(f"{folder} holds results of a different run; what changed: "
                             f"{describe_changes(old, signature)}; {START_OVER}")
    elif files:
        raise ValueError(f"{folder} holds results files but no run.json, so what they were "
                         f"computed from is unknown; {START_OVER}")
    if resume:
        stored = load_results(folder, retry_errors=retry_errors, repair=True)
        if cases is not None:
            check_stored_cases(folder, stored, cases)
    atomic_write_json(run, dict(signature))
    return folder


def write_summary(folder: str | os.PathLike[str], results: Mapping[str, Any],
                  markdown: str) -> None:
    """``summary.json`` (the raw numbers) and ``summary.md`` (``markdown``), each atomically."""
    folder = Path(folder)
    atomic_write_json(folder / "summary.json", dict(results))
    with atomic_path(folder / "summary.md") as tmp:
        tmp.write_text(markdown, encoding="utf-8")


def no_edit_took(method: str, editor: Editor | None, post: Mapping[str, Any]) -> str | None:
    """The warning to give when no edit succeeded on any case (ES, or zsRE efficacy, 0 in the
    ``post/`` results): the editor's settings (the layer above all) most likely do not fit the
    model, which would otherwise be a silent 0. ``None`` when some edit took."""
    key = "post/ES" if "post/ES" in post else "post/efficacy"
    r = post.get(key)
    if r is None or r["mean"] > 0.0:
        return None
    hp = getattr(editor, "hparams", None)
    where = ""
    if hp is not None:
        fields = hp.to_dict() if hasattr(hp, "to_dict") else {}
        layers = fields.get("layer", fields.get("layers"))
        where = f" (edited layer(s) {layers})" if layers is not None else ""
    return (f"{method}: efficacy is 0 on all {r['n']} cases{where}: the hyperparameters probably "
            "do not fit this model (a preset for another model, the wrong layer or token); trace "
            "the model to choose the layer, or pass hparams (CLI: --hparams, --layer)")


# ---------------------------------------------------------------------------------- generations
def _cell(text: str) -> str:
    """``text`` as one Markdown table cell: no line breaks, ``|`` escaped."""
    flat = " ".join(text.split())
    return flat.replace("\\", "\\\\").replace("|", "\\|") or " "


def generation_table(records: Sequence[Mapping[str, Any]], limit: int = 5, *,
                     phases: Sequence[tuple[str, str]] = (("pre", "before"), ("post", "after")),
                     ) -> str:
    """A Markdown table of sample generations: per generation prompt of the first ``limit``
    successful records that hold generated text, the case, the prompt and, per phase in
    ``phases`` (``(record field, column title)``), the continuation the model wrote (the text
    after the prompt); a phase that no record generated for is left out. ``""`` when there is
    nothing to show.

    Example:
        >>> rec = {"status": "ok", "case_id": 0, "pre": {"generation": {
        ...     "prompts": ["Paris is"], "texts": ["Paris is in France."]}}, "post": {
        ...     "generation": {"prompts": ["Paris is"], "texts": ["Paris is in | Rome."]}}}
        >>> print(generation_table([rec]))
        | case | prompt | before | after |
        |---|---|---|---|
        | 0 | Paris is | in France. | in \\| Rome. |
    """
    rows = [r for r in records if r.get("status") == "ok"
            and any(isinstance(r.get(p), Mapping) and "generation" in r[p] for p, _ in phases)]
    rows = rows[:max(0, limit)]
    shown = [(p, title) for p, title in phases
             if any(isinstance(r.get(p), Mapping) and "generation" in r[p] for r in rows)]
    if not rows or not shown:
        return ""
    lines = ["| case | prompt | " + " | ".join(t for _, t in shown) + " |",
             "|---|---|" + "---|" * len(shown)]
    for r in rows:
        gens = {p: r[p]["generation"] for p, _ in shown
                if isinstance(r.get(p), Mapping) and "generation" in r[p]}
        prompts = next(iter(gens.values()))["prompts"]
        for i, prompt in enumerate(prompts):
            cells = []
            for p, _ in shown:
                texts = gens[p]["texts"] if p in gens else []
                text = texts[i] if i < len(texts) else ""
                cells.append(_cell(text[len(prompt):] if text.startswith(prompt) else text))
            lines.append(f"| {_cell(str(r.get('case_id')))} | {_cell(prompt)} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)
