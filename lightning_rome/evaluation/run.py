"""The run loops of an edit evaluation: score, edit, score again, revert; no Trainer needed.

For each case the evaluation

1. scores the unedited model (the ``pre`` baseline; for a batch of cases in one forward pass);
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
fed (:func:`~lightning_rome.evaluation.update_metrics`), so results read back from a results file
give exactly the numbers of a fresh run.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lightning_rome.evaluation.editors import editor_name, model_checksum, resolve_editor
from lightning_rome.evaluation.feed import update_metrics
from lightning_rome.evaluation.options import EvalOptions
from lightning_rome.evaluation.results import Record, new_record
from lightning_rome.models.modes import eval_mode
from lightning_rome.patches import EditTransaction, WeightPatch
from lightning_rome.records import CaseId, EditCase
from lightning_rome.scoring import candidate_scores, generate, model_device
from lightning_rome.utils.modules import unwrap_model

__all__ = ["PROMPT_KINDS", "evaluate", "evaluate_cases", "evaluate_sequential", "score_cases"]

#: The prompt kinds of a case, in the order they are scored.
PROMPT_KINDS = ("rewrite", "paraphrase", "neighborhood", "attribute")


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



def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class _Run:
    """One evaluation call: the model, the editor, the options and where the records go."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, editor: Any,
                 hparams: Any, options: EvalOptions, metrics: Mapping[str, Any] | None,
                 on_result: Callable[[Record], None] | None) -> None:
        self.model, self.tok = unwrap_model(model), tokenizer
        self.editor = resolve_editor(editor, hparams)
        self.method = editor_name(self.editor)
        self.opts = options
        self.gen_kwargs = options.generation_settings()
        self.metrics = metrics
        self.on_result = on_result
        self.reference = model_checksum(model) if options.verify_revert else None

    def check_restored(self, what: str) -> None:
        if self.reference is not None and model_checksum(self.model) != self.reference:
            raise RuntimeError(f"the model's weights were not restored exactly after {what}")

    def measure(self, cases: Sequence[EditCase], phase: str) -> list[dict[str, Any]]:
        """Scores (and generations) of ``cases`` on the model as it is now."""
        scored = score_cases(self.model, self.tok, cases, batch_size=self.opts.score_batch_size)
        if self.opts.generation:
            for case, s in zip(cases, scored):
                g = _generate_for(self.model, self.tok, case, phase, self.opts.seed,
                                  self.gen_kwargs)
                if g is not None:
                    s["generation"] = g  # type: ignore[assignment]
        return scored

    def edit(self, case: EditCase) -> WeightPatch:
        patch = self.editor.edit(self.model, self.tok, [case.request])
        if not isinstance(patch, WeightPatch):
            raise TypeError(f"{type(self.editor).__name__}.edit returned "
                            f"{type(patch).__name__}, expected a WeightPatch")
        return patch.to(model_device(self.model))

    def failed(self, record: Record, e: Exception, message: str) -> None:
        """Record the error of a case under ``on_error="skip"`` (re-raise under ``"raise"``)."""
        if self.opts.on_error == "raise":
            raise e
        record.update(status="error", error=_error_text(e), post=None)
        warnings.warn(f"{message}: {_error_text(e)}", UserWarning, stacklevel=4)

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


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cases: Sequence[EditCase],
    editor: Any = None,
    *,
    hparams: Any = None,
    options: EvalOptions | None = None,
    metrics: Mapping[str, Any] | None = None,
    on_result: Callable[[Record], None] | None = None,
    **settings: Any,
) -> list[Record]:
    """Evaluate an editor on ``cases`` as ``options.mode`` says: each case on its own
    (:func:`evaluate_cases`) or all of them edited in sequence (:func:`evaluate_sequential`).

    Args:
        model: a Hugging Face causal LM (left in the state it was found in, bit for bit, and in
            its train/eval mode).
        tokenizer: its tokenizer.
        cases: the cases.
        editor: ``None`` (the unedited model), a method name, or an object with
            ``edit(model, tokenizer, requests) -> WeightPatch`` (see
            :func:`~lightning_rome.evaluation.resolve_editor`).
        hparams: the method's hyperparameters, with a method name.
        options: the :class:`~lightning_rome.evaluation.EvalOptions` (default: the defaults).
        metrics: ``{"pre": collection, "post": collection}`` (either optional) to update with
            each successful case (:func:`~lightning_rome.evaluation.update_metrics`).
        on_result: called with each case's record as soon as it is complete (e.g. to write it).
        **settings: fields of :class:`~lightning_rome.evaluation.EvalOptions` to set or
            override (``generation=True``, ``on_error="skip"``, ...).

    Returns:
        One record per case, a JSON-serialisable dict: ``format``, ``case_id``,
        ``case_sha256``, ``source``, ``method``, ``request``, ``relation_id``,
        ``target_new_id``, ``status`` (``"ok"`` or ``"error"``), ``error`` (the message),
        ``group`` (the case ids edited together in sequential mode, else ``None``), ``pre`` and
        ``post`` (per prompt kind the scores of :func:`score_cases`, plus ``generation``:
        ``{"prompts", "texts"}``), ``patch_norm`` (the Frobenius norm of the whole patch),
        ``patch_norms`` (per parameter), ``edit_seconds`` and ``eval_seconds``.

    Raises:
        TypeError: an unknown setting, or an editor that is not one.
        ValueError: a case without ``target_true``, a bad option value, an unknown method.
        RuntimeError: ``verify_revert`` found the weights changed after a case.
        Whatever the editor raises, with ``on_error="raise"``; the model is restored first.
    """
    opts = EvalOptions.from_settings(options, **settings)
    run = _Run(model, tokenizer, editor, hparams, opts, metrics, on_result)
    cases = list(cases)
    for case in cases:
        _kind_pairs(case)  # every case must have a target_true; checked before any work
    if not cases:
        return []
    with eval_mode(model):
        return _sequential(run, cases) if opts.mode == "sequential" else _independent(run, cases)


def evaluate_cases(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                   cases: Sequence[EditCase], editor: Any = None, *, hparams: Any = None,
                   options: EvalOptions | None = None, metrics: Mapping[str, Any] | None = None,
                   on_result: Callable[[Record], None] | None = None,
                   **settings: Any) -> list[Record]:
    """Evaluate each case on its own: edit, apply, score, (generate), revert.

    The pre-edit scores of all the cases come from one batched forward pass (the model is the
    same for all of them); each case's post-edit scores from one more. With ``editor=None`` the
    unedited model is measured once and its scores are both ``pre`` and ``post``. Arguments and
    records as in :func:`evaluate` (``options.mode`` must be ``"independent"``).

    Example:
        >>> records = evaluate_cases(model, tok, cases, "rome", hparams="gpt2-xl")
        >>> records[0]["post"]["rewrite"]["p_new"]   # doctest: +SKIP
        [0.93]
    """
    opts = EvalOptions.from_settings(options, **settings)
    if opts.mode != "independent":
        raise ValueError("evaluate_cases evaluates each case on its own; options.mode is "
                         f"{opts.mode!r}: use evaluate_sequential or evaluate")
    return evaluate(model, tokenizer, cases, editor, hparams=hparams, options=opts,
                    metrics=metrics, on_result=on_result)


def evaluate_sequential(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                        cases: Sequence[EditCase], editor: Any = None, *, hparams: Any = None,
                        options: EvalOptions | None = None,
                        metrics: Mapping[str, Any] | None = None,
                        on_result: Callable[[Record], None] | None = None,
                        **settings: Any) -> list[Record]:
    """ROME's multiple-rewrites experiment: apply the N edits one after another without
    reverting (each computed on the model edited by the previous ones), then evaluate all N at
    once on the model holding all of them, then revert them all.

    Arguments and records are as in :func:`evaluate` (the mode is ``"sequential"`` whatever
    ``options.mode`` says); each record's ``group`` lists the case ids edited together, and
    ``pre`` is the unedited model. With ``on_error="skip"``, a case whose edit fails is recorded
    as an error and the others go on. The model ends bit-identical to its start, on success, on
    error and on interrupt.

    Example:
        >>> for n in (1, 10, 20):
        ...     records = evaluate_sequential(model, tok, cases[:n], "rome", hparams="gpt2-xl")
    """
    opts = EvalOptions.from_settings(options, **{**settings, "mode": "sequential"})
    return evaluate(model, tokenizer, cases, editor, hparams=hparams, options=opts,
                    metrics=metrics, on_result=on_result)


def _independent(run: _Run, cases: list[EditCase]) -> list[Record]:
    model, baseline = run.model, run.opts.baseline
    t0 = time.perf_counter()
    pre = run.measure(cases, "pre") if (baseline or run.editor is None) else [None] * len(cases)
    pre_seconds = (time.perf_counter() - t0) / len(cases)
    records = []
    for case, pre_scores in zip(cases, pre):
        record = new_record(case, run.method)
        record["pre"] = pre_scores if baseline else None
        if run.editor is None:
            record["post"] = pre_scores
            record["eval_seconds"] = pre_seconds
            records.append(run.finish(record))
            continue
        t1 = time.perf_counter()
        try:
            patch = run.edit(case)
            record["edit_seconds"] = time.perf_counter() - t1
            _with_norms(record, patch)
            with EditTransaction(model) as tx:  # reverted on the way out, whatever happens
                tx.apply(patch)  # all or nothing: a patch that cannot apply writes nothing
                t2 = time.perf_counter()
                record["post"] = run.measure([case], "post")[0]
                record["eval_seconds"] = time.perf_counter() - t2
        except Exception as e:
            run.failed(record, e, f"evaluation of case {case.case_id!r} failed and is skipped")
        run.check_restored(f"case {case.case_id!r}")
        records.append(run.finish(record))
    return records


@contextmanager
def _edits_in_sequence(run: _Run, cases: list[EditCase], records: list[Record]
                       ) -> Iterator[list[int]]:
    """The sequential edit transaction: compute and apply the edit of each case on the model
    holding the earlier ones, yield the indices of the cases whose edit holds, and revert every
    applied patch, newest first, on the way out (success, error or interrupt). A failed edit
    raises (after the revert) or, with ``on_error="skip"``, is recorded and skipped."""
    with EditTransaction(run.model) as tx:  # never committed: all reverted on the way out
        if run.editor is not None:
            for case, r in zip(cases, records):
                t1 = time.perf_counter()
                try:
                    patch = run.edit(case)
                    _with_norms(r, patch)
                    tx.apply(patch)
                    r["edit_seconds"] = time.perf_counter() - t1
                except Exception as e:
                    run.failed(r, e, f"the edit of case {case.case_id!r} failed and is skipped "
                                     f"(sequential group of {len(cases)})")
        yield [i for i, r in enumerate(records) if r["status"] == "ok"]


def _sequential(run: _Run, cases: list[EditCase]) -> list[Record]:
    baseline = run.opts.baseline
    group = [c.case_id for c in cases]
    records = [new_record(c, run.method) for c in cases]
    for r in records:
        r["group"] = group
    pre = run.measure(cases, "pre") if (baseline or run.editor is None) else [None] * len(cases)
    for r, p in zip(records, pre):
        r["pre"] = p if baseline else None
    with _edits_in_sequence(run, cases, records) as ok:
        if run.editor is None:
            post = pre
        else:
            t2 = time.perf_counter()
            scored = run.measure([cases[i] for i in ok], "post") if ok else []
            post = [None] * len(cases)
            for i, s in zip(ok, scored):
                post[i] = s
            per_case = (time.perf_counter() - t2) / max(1, len(ok))
            for i in ok:
                records[i]["eval_seconds"] = per_case
        for i in ok:
            records[i]["post"] = post[i]
    run.check_restored(f"the sequential group {group!r}")
    return [run.finish(r) for r in records]
