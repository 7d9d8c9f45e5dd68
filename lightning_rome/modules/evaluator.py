"""COUNTERFACT and zsRE evaluation of any editor: the per-case core and the ``EditEvaluator``.

The core (:func:`evaluate_cases`, :func:`evaluate_sequential`, :func:`score_cases`,
:func:`update_metrics`, :class:`CaseResultsFile`) needs no Trainer; :class:`EditEvaluator` runs it
under ``Trainer.test`` with :class:`~lightning_rome.data.CounterFactDataModule` or
:class:`~lightning_rome.data.ZsREDataModule`, and :class:`~lightning_rome.callbacks.EditEvaluation`
runs it periodically during ``fit``.

For each case the evaluation

1. scores the unedited model (the ``pre/`` baseline; for a batch of cases in one forward pass);
2. computes the edit with the editor (``editor.edit(model, tokenizer, [request]) -> WeightPatch``,
   which leaves the model unchanged), applies it, and scores the rewrite, paraphrase,
   neighborhood and attribute prompts for both targets in one batched forward pass
   (:func:`lightning_rome.scoring.candidate_scores`), optionally generating text for GE and RS;
3. reverts the patch, bit-exactly, whatever happened in step 2.

What is scored, per prompt kind (``o*`` = ``target_new``, ``o^c`` = ``target_true``):

=============  ======================================  ==========================================
kind           prompts                                 the "true" candidate
=============  ======================================  ==========================================
rewrite        the edit prompt with the subject        ``o^c``
paraphrase     ``paraphrase_prompts``                  ``o^c``
neighborhood   ``neighborhood_prompts``                ``neighborhood_answers[i]`` (``o^c`` in
                                                       COUNTERFACT; NQ's gold answer in zsRE)
attribute      ``attribute_prompts``                   ``o^c`` (their true answer is ``o*``)
=============  ======================================  ==========================================

Every prompt is scored for ``o*`` and for its "true" candidate: the mean per-token NLL, ``P =
exp(-mean NLL)``, and the per-token teacher-forced argmax correctness (zsRE's accuracy). A case's
results are a JSON-serialisable *record* (see :func:`evaluate_cases`), from which the metrics are
fed (:func:`update_metrics`), so results read back from a results file give exactly the numbers
of a fresh run.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import Metric, MetricCollection
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from lightning_rome.metrics import CaseMean, counterfact_metrics, summary_table, zsre_metrics
from lightning_rome.metrics.functional import MetricCI
from lightning_rome.models.modes import eval_mode
from lightning_rome.patches import WeightPatch
from lightning_rome.records import CaseId, EditCase, RecordBatch
from lightning_rome.scoring import candidate_scores, generate, model_device
from lightning_rome.utils.io import atomic_path, atomic_write_json, tensor_checksum
from lightning_rome.utils.modules import unwrap_model

__all__ = [
    "PROMPT_KINDS",
    "RECORD_FORMAT",
    "CaseResultsFile",
    "EditEvaluator",
    "case_fingerprint",
    "compute_results",
    "dataset_kind",
    "editor_fingerprint",
    "editor_name",
    "eval_mode",
    "evaluate_cases",
    "evaluate_sequential",
    "load_results",
    "make_metrics",
    "model_checksum",
    "record_checksum",
    "resolve_editor",
    "score_cases",
    "update_metrics",
]

#: The prompt kinds of a case, in the order they are scored.
PROMPT_KINDS = ("rewrite", "paraphrase", "neighborhood", "attribute")
#: Version of the per-case record layout (the ``format`` field of every results line). 2: each
#: record carries ``case_sha256``, the fingerprint of the case it was computed from.
RECORD_FORMAT = 2
#: Version of ``run.json``, what a results folder belongs to. 2: the weights' SHA-256, the
#: editor's fingerprint, the dataset and the package version.
RUN_FORMAT = 2
#: How to start over, named in every refusal to resume (the Python argument and the CLI flag).
START_OVER = ("to start over, pass resume=False (CLI: --no-resume), which deletes the stored "
              "results, or write to another folder (results_dir=, CLI: --out)")
#: Generation defaults of ROME's GE/RS evaluation: top-k = 5 sampling of 100 new tokens.
GENERATION_DEFAULTS: dict[str, Any] = {"max_new_tokens": 100, "top_k": 5}

Kind = Literal["counterfact", "zsre"]
OnError = Literal["raise", "skip"]
Mode = Literal["independent", "sequential"]
Record = dict[str, Any]


# ---------------------------------------------------------------------------------- editors
def resolve_editor(editor: Any, hparams: Any = None) -> Any:
    """An editor object from what the user passed.

    Args:
        editor: ``None`` (or ``"none"``) for the unedited baseline; a method name
            (``"rome"``, ``"memit"``, ``"ft"``, ``"ft-l"``, ``"kn"``, ... as
            :func:`lightning_rome.editing.get_editor` knows them); or any object with
            ``edit(model, tokenizer, requests) -> WeightPatch``.
        hparams: the method's hyperparameters (only with a method name).

    Raises:
        ValueError: an unknown method name, or ``hparams`` given with an editor object.
        TypeError: an object without an ``edit`` method.
    """
    if editor is None or (isinstance(editor, str) and editor.lower() in ("none", "baseline")):
        if hparams is not None:
            raise ValueError("hparams were given but no editor (editor=None evaluates the "
                             "unedited model)")
        return None
    if isinstance(editor, str):
        from lightning_rome.editing import get_editor

        return get_editor(editor, hparams)
    if not callable(getattr(editor, "edit", None)):
        raise TypeError(f"editor must be None, a method name or an object with "
                        f"edit(model, tokenizer, requests) -> WeightPatch; got "
                        f"{type(editor).__name__}")
    if hparams is not None:
        raise ValueError(f"hparams are only used with a method name; the editor object "
                         f"{type(editor).__name__} brings its own")
    return editor


def editor_name(editor: Any) -> str:
    """A short name for results and tables: ``"none"``, the editor's ``method`` attribute, or
    its class name in lower case."""
    if editor is None:
        return "none"
    name = getattr(editor, "method", None)
    return name if isinstance(name, str) and name else type(editor).__name__.lower()


def _editor_hparams(editor: Any) -> Any:
    hp = getattr(editor, "hparams", None)
    if hp is None:
        return None
    if callable(getattr(hp, "to_dict", None)):
        return hp.to_dict()
    return hp


def _public_settings(obj: Any, depth: int = 0) -> dict[str, Any]:
    """What identifies an editor object beyond its class: its hyperparameters, its simple public
    attributes, the SHA-256 of the weights of any module it holds (a trained MEND/KE network),
    the qualified names of the functions it was given (``second_moment``), and the same for
    any editor it wraps (one level deep)."""
    out: dict[str, Any] = {"class": f"{type(obj).__module__}.{type(obj).__qualname__}",
                           "method": editor_name(obj)}
    hp = _editor_hparams(obj)
    if hp is not None:
        out["hparams"] = hp
    try:
        attrs = dict(vars(obj))
    except TypeError:  # __slots__
        attrs = {}
    weights: dict[str, str] = {}
    if isinstance(obj, nn.Module):
        weights["self"] = model_checksum(obj)
    for k, v in sorted(attrs.items()):
        if k.startswith("_") or k == "hparams":
            continue
        if isinstance(v, bool | int | float | str) or v is None:
            out.setdefault("settings", {})[k] = v
        elif k == "fingerprint" and isinstance(v, Mapping):
            out["fingerprint"] = dict(v)
        elif isinstance(v, nn.Module):
            weights[k] = model_checksum(v)
        elif isinstance(v, torch.Tensor):
            weights[k] = tensor_checksum(v)
        elif callable(getattr(v, "edit", None)) and depth == 0:
            out.setdefault("wraps", {})[k] = _public_settings(v, depth + 1)
        elif callable(v) and not isinstance(v, type):
            out.setdefault("functions", {})[k] = (f"{getattr(v, '__module__', '?')}."
                                                  f"{getattr(v, '__qualname__', type(v).__name__)}")
    if weights:
        out["weights_sha256"] = weights
    return out


def editor_fingerprint(editor: Any) -> dict[str, Any] | None:
    """A JSON-serialisable identity of an editor (``None`` for the unedited baseline): its class,
    method and hyperparameters, its simple public settings, the SHA-256 of any network it holds
    (MEND, KE) and the names of the functions it was given. Two editors with the same
    fingerprint produce the same patches on the same model; results files are keyed by it."""
    if editor is None:
        return None
    return json.loads(json.dumps(_public_settings(editor), sort_keys=True, default=str))


def case_fingerprint(case: EditCase) -> str:
    """SHA-256 of everything a case's record is computed from: the request, every prompt and
    answer, the ids and the source dataset (canonical JSON of :meth:`EditCase.to_dict`)."""
    body = {**case.to_dict(), "source": case.source}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def dataset_kind(case: EditCase) -> Kind:
    """``"zsre"`` for zsRE cases, ``"counterfact"`` for the others."""
    return "zsre" if case.source == "zsre" else "counterfact"


def model_checksum(model: nn.Module) -> str:
    """SHA-256 over the bits of every parameter and buffer of ``model`` (in name order); a
    ``torch.compile`` wrapper has the checksum of the module it wraps."""
    model = unwrap_model(model)
    h = hashlib.sha256()
    for name, t in sorted([*model.named_parameters(), *model.named_buffers()],
                          key=lambda x: x[0]):
        h.update(f"{name}={tensor_checksum(t)};".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------- scoring
def _kind_pairs(case: EditCase) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Per prompt kind: the prompts and the "true" candidate of each."""
    true = case.request.target_true
    if true is None:
        raise ValueError(f"case {case.case_id!r} has no target_true: the evaluation compares "
                         "o* with the true object o^c")
    return {
        "rewrite": (case.rewrite_prompts, (true,)),
        "paraphrase": (case.paraphrase_prompts, (true,) * len(case.paraphrase_prompts)),
        "neighborhood": (case.neighborhood_prompts, case.neighborhood_answers),
        "attribute": (case.attribute_prompts, (true,) * len(case.attribute_prompts)),
    }


def score_cases(model: nn.Module, tokenizer: PreTrainedTokenizerBase, cases: Sequence[EditCase],
                *, batch_size: int | None = None) -> list[dict[str, dict[str, list[Any]]]]:
    """Score every prompt of every case for ``o*`` and its true candidate, in one batched call.

    All ``(prompt, candidate)`` pairs of all the cases go through one
    :func:`~lightning_rome.scoring.candidate_scores` call (chunks of ``batch_size`` rows).

    Returns:
        Per case, per prompt kind with at least one prompt: ``{"nll_new", "nll_true"}`` (mean
        per-token NLL per prompt), ``{"p_new", "p_true"}`` (``exp(-mean NLL)``) and
        ``{"correct_new", "correct_true"}`` (per prompt, the per-token argmax correctness).
    """
    prompts: list[str] = []
    cands: list[str] = []
    where: list[tuple[int, str, str]] = []  # (case, kind, "new" | "true") per pair
    for c_i, case in enumerate(cases):
        for kind, (ps, trues) in _kind_pairs(case).items():
            for p, t in zip(ps, trues):
                prompts += [p, p]
                cands += [case.request.target_new, t]
                where += [(c_i, kind, "new"), (c_i, kind, "true")]
    scores = candidate_scores(model, tokenizer, prompts, cands, batch_size=batch_size)
    out: list[dict[str, dict[str, list[Any]]]] = [{} for _ in cases]
    for (c_i, kind, which), sc in zip(where, scores):
        entry = out[c_i].setdefault(kind, {f"{k}_{w}": [] for k in ("nll", "p", "correct")
                                           for w in ("new", "true")})
        nll = sc.mean_nll
        entry[f"nll_{which}"].append(nll)
        entry[f"p_{which}"].append(math.exp(-nll))
        entry[f"correct_{which}"].append([bool(x) for x in sc.correct.tolist()])
    return out


def _generation_seed(seed: int, case_id: CaseId | None) -> int:
    digest = hashlib.sha256(f"{seed}|{case_id!r}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63 - 1)


def _generate_for(model: nn.Module, tokenizer: PreTrainedTokenizerBase, case: EditCase,
                  phase: str, seed: int, kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
    """Texts from the case's generation prompts, sampled with a generator seeded by the case id:
    a resumed run samples what a fresh run would, and the pre- and post-edit texts share their
    random numbers (so GE's change is the edit's, not the sampling's). ``phase`` is unused by
    the seed on purpose."""
    if not case.generation_prompts:
        return None
    gen = torch.Generator(device=model_device(model))
    gen.manual_seed(_generation_seed(seed, case.case_id))
    texts = generate(model, tokenizer, list(case.generation_prompts), generator=gen,
                     **dict(kwargs))
    return {"prompts": list(case.generation_prompts), "texts": texts}


# ---------------------------------------------------------------------------------- records
def record_checksum(record: Mapping[str, Any]) -> str:
    """SHA-256 of a record's canonical JSON, without its ``checksum`` field."""
    body = {k: v for k, v in record.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _new_record(case: EditCase, method: str) -> Record:
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


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class _Evaluation:
    """Shared state of one evaluation call: the model, the editor and the options."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, editor: Any, *,
                 hparams: Any, baseline: bool, generation: bool,
                 generation_kwargs: Mapping[str, Any] | None, score_batch_size: int | None,
                 seed: int, on_error: OnError, verify_revert: bool,
                 metrics: Mapping[str, MetricCollection] | None,
                 on_result: Callable[[Record], None] | None) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.model, self.tok = unwrap_model(model), tokenizer
        self.editor = resolve_editor(editor, hparams)
        self.method = editor_name(self.editor)
        self.baseline = baseline
        self.generation = generation
        self.gen_kwargs = {**GENERATION_DEFAULTS, **dict(generation_kwargs or {})}
        self.batch_size = score_batch_size
        self.seed = seed
        self.on_error = on_error
        self.verify = verify_revert
        self.metrics = metrics
        self.on_result = on_result
        self.reference = model_checksum(model) if verify_revert else None

    def check_restored(self, what: str) -> None:
        if self.reference is not None and model_checksum(self.model) != self.reference:
            raise RuntimeError(f"the model's weights were not restored exactly after {what}")

    def measure(self, cases: Sequence[EditCase], phase: str) -> list[dict[str, Any]]:
        """Scores (and generations) of ``cases`` on the model as it is now."""
        scored = score_cases(self.model, self.tok, cases, batch_size=self.batch_size)
        if self.generation:
            for case, s in zip(cases, scored):
                g = _generate_for(self.model, self.tok, case, phase, self.seed, self.gen_kwargs)
                if g is not None:
                    s["generation"] = g  # type: ignore[assignment]
        return scored

    def edit(self, case: EditCase) -> WeightPatch:
        patch = self.editor.edit(self.model, self.tok, [case.request])
        if not isinstance(patch, WeightPatch):
            raise TypeError(f"{type(self.editor).__name__}.edit returned "
                            f"{type(patch).__name__}, expected a WeightPatch")
        return patch.to(model_device(self.model))

    def finish(self, record: Record) -> Record:
        if self.metrics is not None:
            update_metrics(self.metrics, record)
        if self.on_result is not None:
            self.on_result(record)
        return record


def _with_norms(record: Record, patch: WeightPatch) -> None:
    norms = patch.norms()
    record["patch_norms"] = norms
    record["patch_norm"] = math.sqrt(sum(v * v for v in norms.values()))


def evaluate_cases(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cases: Sequence[EditCase],
    editor: Any = None,
    *,
    hparams: Any = None,
    baseline: bool = True,
    generation: bool = False,
    generation_kwargs: Mapping[str, Any] | None = None,
    score_batch_size: int | None = None,
    seed: int = 0,
    on_error: OnError = "raise",
    verify_revert: bool = False,
    metrics: Mapping[str, MetricCollection] | None = None,
    on_result: Callable[[Record], None] | None = None,
) -> list[Record]:
    """Evaluate each case on its own: edit, apply, score, (generate), revert.

    The pre-edit scores of all the cases come from one batched forward pass (the model is the
    same for all of them); each case's post-edit scores from one more. With ``editor=None`` the
    unedited model is measured once and its scores are both ``pre`` and ``post``.

    Args:
        model: a Hugging Face causal LM (left in the state it was found in, bit for bit).
        tokenizer: its tokenizer.
        cases: the cases.
        editor: ``None``, a method name, or an object with ``edit(model, tokenizer, requests)
            -> WeightPatch`` (see :func:`resolve_editor`).
        hparams: the method's hyperparameters, with a method name.
        baseline: measure the unedited model too (``pre``).
        generation: sample text from the generation prompts for GE and RS (COUNTERFACT).
        generation_kwargs: passed to :func:`~lightning_rome.scoring.generate` (default
            ``max_new_tokens=100, top_k=5``); the sampling is seeded per case.
        score_batch_size: rows per scoring forward pass (``None``: all at once).
        seed: the seed of the generation sampling.
        on_error: ``"raise"`` (default): an exception in the editor, in applying the patch or in
            scoring stops the evaluation (after the model is restored); ``"skip"``: the case is
            recorded with ``status="error"`` and the error message, and the evaluation goes on.
        verify_revert: check, with a checksum of every parameter and buffer, that the model is
            bit-identical to its start after every case (costly for large models).
        metrics: ``{"pre": collection, "post": collection}`` (either optional) to update with
            each successful case (see :func:`make_metrics` and :func:`update_metrics`).
        on_result: called with each case's record as soon as it is complete (e.g. to write it).

    Returns:
        One record per case, a JSON-serialisable dict: ``format``, ``case_id``, ``source``,
        ``method``, ``request``, ``relation_id``, ``target_new_id``, ``status`` (``"ok"`` or
        ``"error"``), ``error`` (the message), ``group`` (``None`` here), ``pre`` and ``post``
        (per prompt kind the scores of :func:`score_cases`, plus ``generation``: ``{"prompts",
        "texts"}``), ``patch_norm`` (the Frobenius norm of the whole patch), ``patch_norms``
        (per parameter), ``edit_seconds`` and ``eval_seconds``.

    Raises:
        Whatever the editor raises, with ``on_error="raise"``; the model is restored first.
        RuntimeError: ``verify_revert`` found the weights changed after a case.

    Example:
        >>> records = evaluate_cases(model, tok, cases, "rome", hparams="gpt2-xl")
        >>> records[0]["post"]["rewrite"]["p_new"]   # doctest: +SKIP
        [0.93]
    """
    ev = _Evaluation(model, tokenizer, editor, hparams=hparams, baseline=baseline,
                     generation=generation, generation_kwargs=generation_kwargs,
                     score_batch_size=score_batch_size, seed=seed, on_error=on_error,
                     verify_revert=verify_revert, metrics=metrics, on_result=on_result)
    cases = list(cases)
    for case in cases:
        _kind_pairs(case)  # every case must have a target_true; checked before any work
    if not cases:
        return []
    with eval_mode(model):
        return _independent(ev, cases)


def _independent(ev: _Evaluation, cases: list[EditCase]) -> list[Record]:
    model, baseline, on_error = ev.model, ev.baseline, ev.on_error
    t0 = time.perf_counter()
    pre = ev.measure(cases, "pre") if (baseline or ev.editor is None) else [None] * len(cases)
    pre_seconds = (time.perf_counter() - t0) / len(cases)
    records = []
    for case, pre_scores in zip(cases, pre):
        record = _new_record(case, ev.method)
        record["pre"] = pre_scores if baseline else None
        if ev.editor is None:
            record["post"] = pre_scores
            record["eval_seconds"] = pre_seconds
            records.append(ev.finish(record))
            continue
        t1 = time.perf_counter()
        patch: WeightPatch | None = None
        try:
            patch = ev.edit(case)
            record["edit_seconds"] = time.perf_counter() - t1
            _with_norms(record, patch)
            patch.apply(model)  # all or nothing: a patch that cannot apply writes nothing
            try:
                t2 = time.perf_counter()
                record["post"] = ev.measure([case], "post")[0]
                record["eval_seconds"] = time.perf_counter() - t2
            finally:
                patch.revert(model)
        except Exception as e:
            if on_error == "raise":
                raise
            record.update(status="error", error=_error_text(e), post=None)
            rank_zero_warn(f"evaluation of case {case.case_id!r} failed and is skipped: "
                           f"{_error_text(e)}")
        ev.check_restored(f"case {case.case_id!r}")
        records.append(ev.finish(record))
    return records


def evaluate_sequential(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cases: Sequence[EditCase],
    editor: Any = None,
    *,
    hparams: Any = None,
    baseline: bool = True,
    generation: bool = False,
    generation_kwargs: Mapping[str, Any] | None = None,
    score_batch_size: int | None = None,
    seed: int = 0,
    on_error: OnError = "raise",
    verify_revert: bool = False,
    metrics: Mapping[str, MetricCollection] | None = None,
    on_result: Callable[[Record], None] | None = None,
) -> list[Record]:
    """ROME's multiple-rewrites experiment: apply the N edits one after another without
    reverting (each computed on the model edited by the previous ones), then evaluate all N at
    once on the model holding all of them, then revert them all.

    Arguments and records are as in :func:`evaluate_cases`; each record's ``group`` lists the
    case ids edited together, and ``pre`` is the unedited model. With ``on_error="skip"``, a
    case whose edit fails is recorded as an error and the others go on. The model ends
    bit-identical to its start, on success, on error and on interrupt.

    Example:
        >>> for n in (1, 10, 20):
        ...     records = evaluate_sequential(model, tok, cases[:n], "rome", hparams="gpt2-xl")
    """
    ev = _Evaluation(model, tokenizer, editor, hparams=hparams, baseline=baseline,
                     generation=generation, generation_kwargs=generation_kwargs,
                     score_batch_size=score_batch_size, seed=seed, on_error=on_error,
                     verify_revert=verify_revert, metrics=metrics, on_result=on_result)
    cases = list(cases)
    for case in cases:
        _kind_pairs(case)
    if not cases:
        return []
    with eval_mode(model):
        return _sequential(ev, cases)


def _sequential(ev: _Evaluation, cases: list[EditCase]) -> list[Record]:
    model, baseline, on_error = ev.model, ev.baseline, ev.on_error
    group = [c.case_id for c in cases]
    records = [_new_record(c, ev.method) for c in cases]
    for r in records:
        r["group"] = group
    pre = ev.measure(cases, "pre") if (baseline or ev.editor is None) else [None] * len(cases)
    for r, p in zip(records, pre):
        r["pre"] = p if baseline else None
    applied: list[WeightPatch] = []
    try:
        if ev.editor is not None:
            for case, r in zip(cases, records):
                t1 = time.perf_counter()
                try:
                    patch = ev.edit(case)
                    _with_norms(r, patch)
                    patch.apply(model)
                    applied.append(patch)
                    r["edit_seconds"] = time.perf_counter() - t1
                except Exception as e:
                    if on_error == "raise":
                        raise
                    r.update(status="error", error=_error_text(e))
                    rank_zero_warn(f"the edit of case {case.case_id!r} failed and is skipped "
                                   f"(sequential group of {len(cases)}): {_error_text(e)}")
        ok = [i for i, r in enumerate(records) if r["status"] == "ok"]
        if ev.editor is None:
            post = pre
        else:
            t2 = time.perf_counter()
            scored = ev.measure([cases[i] for i in ok], "post") if ok else []
            post = [None] * len(cases)
            for i, s in zip(ok, scored):
                post[i] = s
            per_case = (time.perf_counter() - t2) / max(1, len(ok))
            for i in ok:
                records[i]["eval_seconds"] = per_case
        for i in ok:
            records[i]["post"] = post[i]
    finally:
        for p in reversed(applied):
            p.revert(model)
    ev.check_restored(f"the sequential group {group!r}")
    return [ev.finish(r) for r in records]


# ---------------------------------------------------------------------------------- metrics
def make_metrics(kind: Kind, prefix: str = "", *, generation: bool = False, tfidf: Any = None,
                 snippets: Any = None) -> MetricCollection:
    """The metric collection of a dataset kind: :func:`~lightning_rome.metrics.counterfact_metrics`
    (with GE, and RS when ``tfidf`` or ``snippets`` are given, if ``generation``) or
    :func:`~lightning_rome.metrics.zsre_metrics`."""
    if kind == "zsre":
        return zsre_metrics(prefix=prefix)
    if kind != "counterfact":
        raise ValueError(f"dataset kind must be 'counterfact' or 'zsre', got {kind!r}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*reference score RS is left out.*")
        return counterfact_metrics(prefix=prefix, generation=generation, score_type="nll",
                                   tfidf=tfidf, snippets=snippets)


# What each COUNTERFACT metric needs from a case (the prompt kinds, or generated text).
_CF_NEEDS: dict[str, tuple[str, ...]] = {
    "ES": ("rewrite",), "EM": ("rewrite",), "PS": ("paraphrase",), "PM": ("paraphrase",),
    "NS": ("neighborhood",), "NM": ("neighborhood",),
    "S": ("rewrite", "paraphrase", "neighborhood"), "GE": ("generation",),
    "RS": ("generation", "rs_reference"),
}


def _cf_inputs(scores: Mapping[str, Any], record: Mapping[str, Any]) -> dict[str, Any]:
    inputs: dict[str, Any] = {}
    for kind in ("rewrite", "paraphrase", "neighborhood"):
        if kind in scores:
            inputs[f"{kind}_new"] = [list(scores[kind]["nll_new"])]
            inputs[f"{kind}_true"] = [list(scores[kind]["nll_true"])]
    if "generation" in scores:
        inputs["generated_texts"] = [list(scores["generation"]["texts"])]
        if record.get("relation_id") and record.get("target_new_id"):
            inputs["relation_ids"] = [record["relation_id"]]
            inputs["target_new_ids"] = [record["target_new_id"]]
    return inputs


def _zsre_inputs(scores: Mapping[str, Any]) -> dict[str, Any]:
    """Token accuracy inputs: a case pools the answer tokens of all its prompts."""
    inputs: dict[str, Any] = {}
    for kind, which in (("rewrite", "new"), ("paraphrase", "new"), ("neighborhood", "true")):
        if kind in scores:
            flat = [x for row in scores[kind][f"correct_{which}"] for x in row]
            inputs[f"{kind}_correct"] = [flat]
    return inputs


def _has(kind: str, scores: Mapping[str, Any], inputs: Mapping[str, Any]) -> bool:
    if kind == "rs_reference":
        return "relation_ids" in inputs
    return kind in scores


def _base_name(key: str, collection: MetricCollection) -> str:
    prefix = getattr(collection, "prefix", None) or ""
    postfix = getattr(collection, "postfix", None) or ""
    name = key[len(prefix):] if prefix and key.startswith(prefix) else key
    return name[: len(name) - len(postfix)] if postfix and name.endswith(postfix) else name


def update_metrics(metrics: Mapping[str, MetricCollection], record: Mapping[str, Any]) -> None:
    """Feed one case's record into ``{"pre": collection, "post": collection}``.

    Error records are skipped. Each metric gets only the inputs it needs, and a metric whose
    prompts the case lacks (e.g. PS for a reduced COUNTERFACT record without a paraphrase, GE
    without generation prompts) is not updated for this case.
    """
    if record.get("status") != "ok":
        return
    zsre = record.get("source") == "zsre"
    for phase, collection in metrics.items():
        scores = record.get(phase)
        if scores is None or collection is None:
            continue
        if zsre:
            inputs = _zsre_inputs(scores)
            for key, metric in collection.items(keep_base=False):
                base = _base_name(key, collection)
                kind = {"efficacy": "rewrite", "paraphrase": "paraphrase",
                        "specificity": "neighborhood"}.get(base)
                if kind is not None and f"{kind}_correct" in inputs:
                    metric.update(**{f"{kind}_correct": inputs[f"{kind}_correct"]})
            continue
        inputs = _cf_inputs(scores, record)
        for key, metric in collection.items(keep_base=False):
            needs = _CF_NEEDS.get(_base_name(key, collection))
            if needs is None or not all(_has(n, scores, inputs) for n in needs):
                continue
            metric.update(**_filter_kwargs(metric, inputs))


def _filter_kwargs(metric: Metric, inputs: Mapping[str, Any]) -> dict[str, Any]:
    params = inspect.signature(metric.update).parameters
    return {k: v for k, v in inputs.items() if k in params}


def compute_results(collection: Mapping[str, Metric] | MetricCollection) -> dict[str, MetricCI]:
    """``compute_with_ci()`` of every metric that saw at least one case (on any process).

    Under DDP this is collective: call it on every rank. Metrics without cases are left out.
    """
    items = (collection.items(keep_base=False) if isinstance(collection, MetricCollection)
             else collection.items())
    out: dict[str, MetricCI] = {}
    for key, metric in items:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
                out[key] = metric.compute_with_ci()  # type: ignore[operator]
        except ValueError as e:
            if "no cases" not in str(e):
                raise
    return out


# ---------------------------------------------------------------------------------- results file
class CaseResultsFile:
    """Per-case results of one process as JSON lines, written as they come.

    Each line is one record (see :func:`evaluate_cases`) with a ``checksum`` field (the SHA-256
    of the rest of the record, :func:`record_checksum`), so a truncated or altered line is
    detected when read. Every line is flushed as soon as it is written.

    Example:
        >>> with CaseResultsFile("results/cases.rank0.jsonl") as f:
        ...     f.append(record)
        >>> records, problems = CaseResultsFile.read("results/cases.rank0.jsonl")
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
    return all(_key(c) in by_id and by_id[_key(c)].get("group") == group for c in group)


def _key(case_id: Any) -> str:
    """A dict key that keeps ``1`` and ``"1"`` apart."""
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
            rank_zero_warn(f"{path}, line {n}: {why}; that case will be evaluated again")
        dropped[path] = len(problems)
        kept[path] = []
        for rec in records:
            k = _key(rec["case_id"])
            if k in by_id:
                rank_zero_warn(f"{path}: case {rec['case_id']!r} appears more than once; keeping "
                               "the first valid record")
                dropped[path] += 1
                continue
            if retry_errors and rec.get("status") == "error":
                rank_zero_warn(f"{path}: case {rec['case_id']!r} failed before "
                               f"({rec.get('error')}); evaluating it again")
                dropped[path] += 1
                continue
            by_id[k] = rec
            kept[path].append(rec)
    incomplete = {k for k, rec in by_id.items() if not _group_complete(rec, by_id)}
    if incomplete:
        rank_zero_warn(f"{folder}: {len(incomplete)} record(s) belong to incomplete sequential "
                       "groups; those groups will be evaluated again")
        for path in files:
            before = len(kept[path])
            kept[path] = [r for r in kept[path] if _key(r["case_id"]) not in incomplete]
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


def _describe_changes(old: Any, new: Mapping[str, Any]) -> str:
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


def _datamodule_cases(trainer: pl.Trainer) -> list[EditCase] | None:
    """The test cases of the Trainer's DataModule, when it exposes them (``test_dataset.records``
    of the COUNTERFACT and zsRE DataModules), to check stored results before any work."""
    dm = getattr(trainer, "datamodule", None)
    records = getattr(getattr(dm, "test_dataset", None), "records", None)
    if records is None:
        return None
    cases = list(records)
    return cases if all(isinstance(c, EditCase) for c in cases) else None


def _check_stored_cases(folder: Any, stored: Mapping[str, Record],
                        cases: Sequence[EditCase]) -> None:
    """Refuse to resume when a stored record of one of ``cases`` (same case id) was computed
    from different data: another dataset with the same ids, or edited prompts."""
    for case in cases:
        rec = stored.get(_key(case.case_id))
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


def _check_label(label: str) -> str:
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


def _warn_if_no_edit_took(method: str, editor: Any, post: Mapping[str, MetricCI]) -> None:
    """Warn when no edit succeeded on any case (ES, or zsRE efficacy, 0): the editor's settings
    (the layer above all) most likely do not fit the model, which is otherwise a silent 0."""
    key = "post/ES" if "post/ES" in post else "post/efficacy"
    r = post.get(key)
    if r is None or r["mean"] > 0.0:
        return
    hp = getattr(editor, "hparams", None)
    where = ""
    if hp is not None:
        fields = hp.to_dict() if hasattr(hp, "to_dict") else {}
        layers = fields.get("layer", fields.get("layers"))
        where = f" (edited layer(s) {layers})" if layers is not None else ""
    rank_zero_warn(
        f"{method}: efficacy is 0 on all {r['n']} cases{where}: the hyperparameters probably do "
        "not fit this model (a preset for another model, the wrong layer or token); trace the "
        "model to choose the layer, or pass hparams (CLI: --hparams, --layer)")


def _strip(results: Mapping[str, MetricCI], prefix: str) -> dict[str, MetricCI]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in results.items()}


class EditEvaluator(pl.LightningModule):
    """Evaluate an editor on COUNTERFACT or zsRE with ``Trainer.test``.

    Every test case is edited on its own (or, with ``mode="sequential"``, each test batch is
    edited in sequence), scored before and after the edit in batched forward passes, and
    reverted bit-exactly. The metrics of the papers' tables are logged to the Trainer's logger
    as ``pre/ES``, ``post/ES``, ... (zsRE: ``pre/efficacy``, ``post/efficacy``, ...), with
    ``edit/patch_norm``, ``edit/seconds`` and ``edit/error_rate``.

    Results go to ``results_dir``:

    * ``cases.rank{r}.jsonl``: one checksummed line per case per process, flushed as it is
      written, with every probability, the token accuracies, generated texts and the patch
      norm (see :func:`evaluate_cases`). A rerun with the same settings resumes: cases already
      in the files are not evaluated again, their stored values go into the metrics, and a
      truncated or corrupt line is dropped (with a warning) and its case redone.
    * ``run.json``: what the results are determined by: the SHA-256 of every weight of the model
      (hashed once per run), the editor's fingerprint (method, hyperparameters, the weights of a
      trained MEND/KE network), the dataset, the evaluation options and the package version.
      Each record also carries the fingerprint of its case's data (``case_sha256``). A rerun
      that differs in any of them, or a stored case whose data differ (another dataset with
      the same case ids, edited prompts), is refused with a message naming what changed, unless
      ``resume=False`` (CLI: ``--no-resume``).
    * ``summary.json`` and ``summary.md`` (rank zero, atomically): the table in the published
      layout (S, ES, PS, NS, EM, PM, NM, GE, RS, ± 95% intervals, × 100) and the raw numbers.

    Under DDP, each rank evaluates its own cases (the DataModules shard the test split with no
    repeats) on its own replica, and the metrics are synchronised at the end.

    Args:
        model: a Hugging Face causal LM, or its name or local path.
        tokenizer: its tokenizer (default: the model's, when ``model`` is a name or path).
        editor: ``None`` (the unedited model), a method name (``"rome"``, ``"memit"``, ``"ft"``,
            ``"ft-l"``, ``"kn"``, ...) or any object with ``edit(model, tokenizer, requests) ->
            WeightPatch`` (ROME, MEMIT, FT, FTL, KN, MEND, KE, ...).
        hparams: the method's hyperparameters (a dataclass, dict, preset name or YAML path), with
            a method name; ``None`` chooses them from the model
            (:func:`lightning_rome.presets.for_model`).
        mode: ``"independent"`` (each case edited alone; the COUNTERFACT/zsRE tables) or
            ``"sequential"`` (the cases of each test batch are edited one after another without
            reverting and then evaluated together: set the DataModule's ``batch_size`` to the
            number of edits N).
        dataset: ``"counterfact"``, ``"zsre"`` or ``"auto"`` (from the DataModule, else the
            cases' ``source``).
        baseline: also measure the unedited model (``pre/`` metrics).
        generation: generate text for GE (and RS with ``tfidf``/``snippets``).
        generation_kwargs: for :func:`~lightning_rome.scoring.generate` (default 100 new
            tokens, top-k 5).
        tfidf, snippets: RS's IDF table and attribute snippets (see
            :class:`~lightning_rome.metrics.ReferenceScore`).
        results_dir: where the results go (default
            ``{trainer.default_root_dir}/edit_eval/{label}``).
        resume: continue from the results already in ``results_dir``, when they were computed
            from the same weights, data, editor and version (``False``: start afresh, deleting
            them).
        retry_errors: when resuming, evaluate again the cases recorded as errors.
        on_error: ``"raise"`` (default) or ``"skip"`` (record the error for the case and go on).
            The model is restored in both cases.
        score_batch_size: rows per scoring forward pass (``None``: a case's prompts at once).
        seed: seeds the generation sampling (per case).
        verify_revert: checksum every parameter before and after each case and raise if the
            weights differ (slow for large models).
        label: the row label of the summary table and the name of the default results folder
            (default: the editor's name); path-like labels (empty, ``.``, ``..``, with ``/``,
            ``\\`` or NUL) are refused.
        verbose: print the summary table at the end (rank zero).

    Example:
        >>> evaluator = EditEvaluator("gpt2-xl", editor="rome", hparams="gpt2-xl")
        >>> dm = CounterFactDataModule(limit=100, batch_size=8)
        >>> L.Trainer(devices=2, strategy="ddp").test(evaluator, datamodule=dm)
    """

    def __init__(
        self,
        model: nn.Module | str,
        tokenizer: PreTrainedTokenizerBase | str | None = None,
        editor: Any = None,
        hparams: Any = None,
        *,
        mode: Mode = "independent",
        dataset: Literal["auto", "counterfact", "zsre"] = "auto",
        baseline: bool = True,
        generation: bool = False,
        generation_kwargs: dict[str, Any] | None = None,
        tfidf: Any = None,
        snippets: Any = None,
        results_dir: str | os.PathLike[str] | None = None,
        resume: bool = True,
        retry_errors: bool = False,
        on_error: OnError = "raise",
        score_batch_size: int | None = None,
        seed: int = 0,
        verify_revert: bool = False,
        label: str | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        from lightning_rome.models.loading import resolve_model

        if mode not in ("independent", "sequential"):
            raise ValueError(f"mode must be 'independent' or 'sequential', got {mode!r}")
        if dataset not in ("auto", "counterfact", "zsre"):
            raise ValueError(f"dataset must be 'auto', 'counterfact' or 'zsre', got {dataset!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.model, self.tokenizer = resolve_model(model, tokenizer)
        if (hparams is None and isinstance(editor, str)
                and editor.lower() not in ("none", "baseline")):
            from lightning_rome.presets import for_model

            # No settings: the preset for this model's family and size, else settings from
            # its depth (one PresetNotice saying which), never GPT-2 XL's on another model.
            hparams = for_model(editor, self.model)
        self.editor = resolve_editor(editor, hparams)
        self.method = editor_name(self.editor)
        self.mode = mode
        self.dataset = dataset
        self.baseline = baseline
        self.generation = generation
        self.generation_kwargs = dict(generation_kwargs or {})
        self.tfidf, self.snippets = tfidf, snippets
        self.results_dir = None if results_dir is None else Path(results_dir)
        self.resume = resume
        self.retry_errors = retry_errors
        self.on_error = on_error
        self.score_batch_size = score_batch_size
        self.seed = seed
        self.verify_revert = verify_revert
        self.label = self.method if label is None else _check_label(label)
        self.verbose = verbose
        self.save_hyperparameters({
            "editor": self.method, "mode": mode, "dataset": dataset, "baseline": baseline,
            "generation": generation, "seed": seed, "on_error": on_error})
        self.kind: Kind | None = None if dataset == "auto" else dataset  # type: ignore[assignment]
        self.pre_metrics: MetricCollection | None = None
        self.post_metrics: MetricCollection | None = None
        self.edit_metrics = MetricCollection(
            {"patch_norm": CaseMean(), "seconds": CaseMean(), "error_rate": CaseMean()},
            prefix="edit/", compute_groups=False)
        self.results: dict[str, Any] = {}
        self._stored: dict[str, Record] = {}
        self._file: CaseResultsFile | None = None
        self._counts = {"evaluated": 0, "resumed": 0}

    # ------------------------------------------------------------------ setup
    def _signature(self) -> dict[str, Any]:
        """What the results in a folder are determined by (``run.json``): the package version,
        the model (name, size and the SHA-256 of every weight), the editor's fingerprint
        (:func:`editor_fingerprint`: method, hyperparameters, networks), the dataset and the
        evaluation options. The data are checked per case (``case_sha256`` of each record)."""
        from lightning_rome import __version__

        cfg = getattr(self.model, "config", None)
        return json.loads(json.dumps({
            "format": "lightning_rome.edit_eval", "version": RUN_FORMAT,
            "package_version": __version__,
            "method": self.method, "hparams": _editor_hparams(self.editor),
            "editor": editor_fingerprint(self.editor), "mode": self.mode,
            "dataset": self.kind,
            "baseline": self.baseline, "generation": self.generation,
            "generation_kwargs": {**GENERATION_DEFAULTS, **self.generation_kwargs},
            "seed": self.seed,
            "model": getattr(cfg, "_name_or_path", None) or getattr(cfg, "model_type", None),
            "n_params": sum(p.numel() for p in self.model.parameters()),
            "model_sha256": model_checksum(self.model),
        }, sort_keys=True, default=str))

    def _make_metrics(self, kind: Kind) -> None:
        """Create the pre/post collections for ``kind`` (once per run)."""
        if self.post_metrics is not None:
            if kind != self.kind:
                raise ValueError(f"EditEvaluator got {kind} cases in a {self.kind} evaluation; "
                                 "evaluate one dataset per run")
            return
        self.kind = kind
        opts = dict(generation=self.generation, tfidf=self.tfidf, snippets=self.snippets)
        if self.editor is None:  # the unedited model: its one measurement is named pre/
            self.pre_metrics = None
            self.post_metrics = make_metrics(kind, "pre/", **opts)
        else:
            self.pre_metrics = make_metrics(kind, "pre/", **opts) if self.baseline else None
            self.post_metrics = make_metrics(kind, "post/", **opts)
        for m in (self.pre_metrics, self.post_metrics):
            if m is not None:
                m.to(self.device)

    @override
    def setup(self, stage: str) -> None:
        name = type(self.trainer.strategy).__name__.lower()
        if "fsdp" in name or "deepspeed" in name:
            raise MisconfigurationException(
                f"EditEvaluator does not support sharded strategies ({name}): edits need the "
                "full parameters on each rank; use DDP or a single device")
        if self.dataset == "auto":
            from lightning_rome.data import CounterFactDataModule, ZsREDataModule

            dm = getattr(self.trainer, "datamodule", None)
            if isinstance(dm, ZsREDataModule):
                self.kind = "zsre"
            elif isinstance(dm, CounterFactDataModule):
                self.kind = "counterfact"
        else:
            self.kind = self.dataset  # type: ignore[assignment]

    def _resolve_dir(self) -> Path:
        if self.results_dir is not None:
            return self.results_dir
        root = Path(self.trainer.default_root_dir)
        safe = "".join(ch if ch.isalnum() or ch in "-_+." else "_" for ch in self.label)
        return root / "edit_eval" / safe

    @override
    def on_test_start(self) -> None:
        folder = self._resolve_dir()
        self.results_dir = folder
        strategy = self.trainer.strategy
        error: str | None = None
        if self.trainer.is_global_zero:
            try:
                # Hashes every weight: once per run, on rank zero only.
                self._prepare_folder(folder, self._signature())
            except Exception as e:  # raised on every rank below
                error = _error_text(e)
        error = strategy.broadcast(error, src=0)
        if error is not None:
            raise ValueError(f"EditEvaluator: {error}")
        strategy.barrier("edit_eval_prepared")
        self._stored = load_results(folder, retry_errors=False, repair=False) if self.resume \
            else {}
        self._file = CaseResultsFile(folder / f"cases.rank{self.global_rank}.jsonl").open()
        self._counts = {"evaluated": 0, "resumed": 0}
        self.pre_metrics = self.post_metrics = None  # fresh metrics for every run
        if self.kind is not None:
            self._make_metrics(self.kind)
        self.edit_metrics.reset()

    def _prepare_folder(self, folder: Path, sig: dict[str, Any]) -> None:
        """Rank zero: check or write ``run.json``, repair the results files (or delete them)."""
        folder.mkdir(parents=True, exist_ok=True)
        run = folder / "run.json"
        files = sorted(folder.glob("cases.rank*.jsonl"))
        if not self.resume:
            for f in [*files, folder / "summary.json", folder / "summary.md"]:
                if f.exists():
                    f.unlink()
        elif run.is_file():
            try:
                old = json.loads(run.read_text())
            except ValueError:
                old = None
            if old != sig:
                raise ValueError(f"{folder} holds results of a different run; what changed: "
                                 f"{_describe_changes(old, sig)}; {START_OVER}")
        elif files:
            raise ValueError(f"{folder} holds results files but no run.json, so what they were "
                             f"computed from is unknown; {START_OVER}")
        if self.resume:
            stored = load_results(folder, retry_errors=self.retry_errors, repair=True)
            cases = _datamodule_cases(self.trainer)
            if cases is not None:
                _check_stored_cases(folder, stored, cases)
        atomic_write_json(run, sig)

    # ------------------------------------------------------------------ steps
    def _feed(self, record: Record) -> None:
        metrics = {"post": self.post_metrics}
        if self.pre_metrics is not None:
            metrics["pre"] = self.pre_metrics
        update_metrics(metrics, record)  # type: ignore[arg-type]
        failed = record.get("status") != "ok"
        self.edit_metrics["error_rate"].update([float(failed)])
        if not failed and self.editor is not None:
            if record.get("patch_norm") is not None:
                self.edit_metrics["patch_norm"].update([record["patch_norm"]])
            if record.get("edit_seconds") is not None:
                self.edit_metrics["seconds"].update([record["edit_seconds"]])

    def _write(self, record: Record) -> None:
        assert self._file is not None
        self._file.append(record)

    @override
    def test_step(self, batch: RecordBatch, batch_idx: int) -> None:
        cases = list(batch)
        if not cases:
            return
        kinds = {dataset_kind(c) for c in cases}
        if len(kinds) > 1:
            raise ValueError("a test batch mixes zsRE and COUNTERFACT cases")
        self._make_metrics(kinds.pop())
        # Records read back from the results files are fed once, when their case comes up.
        stored = [self._stored.pop(_key(c.case_id), None) for c in cases]
        _check_stored_cases(self.results_dir, {_key(c.case_id): s for c, s in zip(cases, stored)
                                               if s is not None}, cases)
        if self.mode == "sequential":
            if all(s is not None for s in stored):
                for s in stored:
                    self._feed(s)  # type: ignore[arg-type]
                self._counts["resumed"] += len(cases)
                return
            if any(s is not None for s in stored):
                raise ValueError(
                    f"test batch {batch_idx} is partly in the stored sequential results (cases "
                    f"{[c.case_id for c, s in zip(cases, stored) if s is not None]}); the groups "
                    "differ from the stored run (another batch_size?): use resume=False")
            todo = cases
        else:
            todo = []
            for c, s in zip(cases, stored):
                if s is None:
                    todo.append(c)
                else:
                    self._feed(s)
                    self._counts["resumed"] += 1
        if not todo:
            return

        def on_result(record: Record) -> None:
            self._write(record)
            self._feed(record)

        run = evaluate_sequential if self.mode == "sequential" else evaluate_cases
        with torch.inference_mode(False), torch.no_grad():
            records = run(self.model, self.tokenizer, todo, self.editor,
                          baseline=self.baseline, generation=self.generation,
                          generation_kwargs=self.generation_kwargs,
                          score_batch_size=self.score_batch_size, seed=self.seed,
                          on_error=self.on_error, verify_revert=self.verify_revert,
                          on_result=on_result)
        self._counts["evaluated"] += len(records)

    # ------------------------------------------------------------------ summary
    @override
    def on_test_epoch_end(self) -> None:
        if self.post_metrics is None:  # no batch on this rank and no DataModule to tell
            self._make_metrics(self.kind or "counterfact")
        pre = compute_results(self.pre_metrics) if self.pre_metrics is not None else {}
        post = compute_results(self.post_metrics)  # type: ignore[arg-type]
        if self.editor is None:  # the unedited model's scores are its pre/ scores
            pre, post = post, {}
        edit = compute_results(self.edit_metrics)
        n_cases = edit.get("edit/error_rate", {}).get("n", 0)
        n_errors = round(edit.get("edit/error_rate", {}).get("mean", 0.0) * n_cases)
        values = {k: v["mean"] for k, v in {**pre, **post, **edit}.items()}
        for k, v in values.items():
            # Already reduced over every rank by the metrics: the mean of equal values is exact.
            self.log(k, float(v), sync_dist=True)
        if self.editor is not None and n_cases > n_errors:
            _warn_if_no_edit_took(self.method, self.editor, post)
        rows: dict[str, dict[str, MetricCI]] = {}
        if pre:
            rows[f"{self.label} (pre-edit)" if self.editor is not None else self.label] = \
                _strip(pre, "pre/")
        if self.editor is not None:
            rows[self.label] = _strip(post, "post/")
        table = summary_table(rows) if any(rows.values()) else ""
        self.results = {
            "method": self.method, "label": self.label, "dataset": self.kind, "mode": self.mode,
            "n_cases": int(n_cases), "n_errors": int(n_errors),
            "pre": pre, "post": post, "edit": edit, "table": table,
        }
        if self.trainer.is_global_zero and self.results_dir is not None:
            atomic_write_json(self.results_dir / "summary.json", self.results)
            md = (f"# Edit evaluation: {self.label} on {self.kind} ({self.mode})\n\n"
                  f"{n_cases} cases, {n_errors} errors. Values × 100, ± 95% CI.\n\n{table}\n")
            with atomic_path(self.results_dir / "summary.md") as tmp:
                tmp.write_text(md, encoding="utf-8")
        if self.trainer.is_global_zero and table:
            for logger in self.loggers:  # the table as text in TensorBoard (Markdown renders)
                experiment = getattr(logger, "experiment", None)
                if hasattr(experiment, "add_text"):
                    experiment.add_text(f"summary/{self.label}", table,
                                        global_step=self.global_step)
            if self.verbose:  # the console summary, like Trainer.test's own table
                rank_zero_info(f"\n{table}\n")

    @override
    def on_test_end(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @override
    def teardown(self, stage: str) -> None:
        self.on_test_end()
