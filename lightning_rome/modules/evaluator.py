"""``EditEvaluator``: the COUNTERFACT / zsRE evaluation of any editor under ``Trainer.test``.

A thin shell over the Trainer-free core in :mod:`lightning_rome.evaluation` (options, run loops,
records, results files, metric feeding): it feeds the core one test batch at a time, keeps the
results folder of the run, logs the metrics and writes the summary. :func:`make_metrics` builds
the metric collections of a dataset kind (also used by
:class:`~lightning_rome.callbacks.EditEvaluation`).

The core's functions are importable from here as well (``score_cases``, ``evaluate_cases``,
``model_checksum``, ...); new code imports them from :mod:`lightning_rome.evaluation`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import MetricCollection
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from lightning_rome.callbacks._common import log_text, refuse_sharded
from lightning_rome.editing import Editor
from lightning_rome.evaluation.editors import (
    dataset_kind,
    editor_fingerprint,
    editor_name,
    model_checksum,
    resolve_editor,
)
from lightning_rome.evaluation.feed import compute_results, update_metrics
from lightning_rome.evaluation.options import EvalOptions, Kind, Mode, OnError
from lightning_rome.evaluation.results import (
    RECORD_FORMAT,
    CaseResultsFile,
    Record,
    case_key,
    check_label,
    check_stored_cases,
    generation_table,
    load_results,
    no_edit_took,
    prepare_folder,
    record_checksum,
    run_signature,
    write_summary,
)
from lightning_rome.evaluation.run import (
    PROMPT_KINDS,
    evaluate,
    evaluate_cases,
    evaluate_sequential,
    score_cases,
)
from lightning_rome.metrics import CaseMean, counterfact_metrics, summary_table, zsre_metrics
from lightning_rome.metrics.functional import MetricCI
from lightning_rome.records import EditCase, RecordBatch

__all__ = [
    "PROMPT_KINDS",
    "RECORD_FORMAT",
    "CaseResultsFile",
    "EditEvaluator",
    "EvalOptions",
    "compute_results",
    "dataset_kind",
    "editor_fingerprint",
    "editor_name",
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


def _datamodule_cases(trainer: pl.Trainer) -> list[EditCase] | None:
    """The test cases of the Trainer's DataModule, when it exposes them (``test_dataset.records``
    of the COUNTERFACT and zsRE DataModules), to check stored results before any work."""
    dm = getattr(trainer, "datamodule", None)
    records = getattr(getattr(dm, "test_dataset", None), "records", None)
    if records is None:
        return None
    cases = list(records)
    return cases if all(isinstance(c, EditCase) for c in cases) else None


def _strip(results: dict[str, MetricCI], prefix: str) -> dict[str, MetricCI]:
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
      norm (see :func:`lightning_rome.evaluation.evaluate`). A rerun with the same settings resumes: cases already
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

    The options that decide the numbers are one :class:`~lightning_rome.evaluation.EvalOptions`
    (:attr:`options`); the work is the Trainer-free core's
    (:func:`lightning_rome.evaluation.evaluate`), fed one test batch at a time.

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
        verbose: show the summary table at the end (rank zero, through Lightning's logging).
        generation_samples: with ``generation``, how many cases' generations (prompt, text
            before and after the edit) are logged as a text table to the Trainer's TensorBoard
            loggers (``generations/{label}``); ``0``: none.

    Example:
        >>> evaluator = EditEvaluator("gpt2-xl", editor="rome", hparams="gpt2-xl")
        >>> dm = CounterFactDataModule(limit=100, batch_size=8)
        >>> L.Trainer(devices=2, strategy="ddp").test(evaluator, datamodule=dm)
    """

    def __init__(
        self,
        model: nn.Module | str,
        tokenizer: PreTrainedTokenizerBase | str | None = None,
        editor: Editor | str | None = None,
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
        generation_samples: int = 5,
    ) -> None:
        super().__init__()
        from lightning_rome.models.loading import resolve_model

        #: Every setting that decides the numbers, checked here (before the model is loaded).
        self.options = EvalOptions(
            mode=mode, baseline=baseline, generation=generation,
            generation_kwargs=generation_kwargs or {}, score_batch_size=score_batch_size,
            seed=seed, on_error=on_error, verify_revert=verify_revert)
        if dataset not in ("auto", "counterfact", "zsre"):
            raise ValueError(f"dataset must be 'auto', 'counterfact' or 'zsre', got {dataset!r}")
        if isinstance(generation_samples, bool) or not isinstance(generation_samples, int) or \
                generation_samples < 0:
            raise ValueError(f"generation_samples must be an integer >= 0, got "
                             f"{generation_samples!r}")
        self.model, self.tokenizer = resolve_model(model, tokenizer)
        if (hparams is None and isinstance(editor, str)
                and editor.lower() not in ("none", "baseline")):
            from lightning_rome.presets import for_model

            # No settings: the preset for this model's family and size, else settings from
            # its depth (one PresetNotice saying which), never GPT-2 XL's on another model.
            hparams = for_model(editor, self.model)
        self.editor = resolve_editor(editor, hparams)
        self.method = editor_name(self.editor)
        self.dataset = dataset
        self.tfidf, self.snippets = tfidf, snippets
        self.results_dir = None if results_dir is None else Path(results_dir)
        self.resume = resume
        self.retry_errors = retry_errors
        self.label = self.method if label is None else check_label(label)
        self.verbose = verbose
        self.generation_samples = generation_samples
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
        self._samples: list[Record] = []
        self._counts = {"evaluated": 0, "resumed": 0}

    @property
    def mode(self) -> Mode:
        """``"independent"`` or ``"sequential"`` (:attr:`options`)."""
        return self.options.mode

    # ------------------------------------------------------------------ setup
    def _make_metrics(self, kind: Kind) -> None:
        """Create the pre/post collections for ``kind`` (once per run)."""
        if self.post_metrics is not None:
            if kind != self.kind:
                raise ValueError(f"EditEvaluator got {kind} cases in a {self.kind} evaluation; "
                                 "evaluate one dataset per run")
            return
        self.kind = kind
        opts = dict(generation=self.options.generation, tfidf=self.tfidf, snippets=self.snippets)
        if self.editor is None:  # the unedited model: its one measurement is named pre/
            self.pre_metrics = None
            self.post_metrics = make_metrics(kind, "pre/", **opts)
        else:
            self.pre_metrics = (make_metrics(kind, "pre/", **opts) if self.options.baseline
                                else None)
            self.post_metrics = make_metrics(kind, "post/", **opts)
        for m in (self.pre_metrics, self.post_metrics):
            if m is not None:
                m.to(self.device)

    @override
    def setup(self, stage: str) -> None:
        refuse_sharded(self.trainer, "EditEvaluator")
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
                prepare_folder(folder, run_signature(self.model, self.editor, self.options,
                                                     self.kind),
                               resume=self.resume, retry_errors=self.retry_errors,
                               cases=_datamodule_cases(self.trainer))
            except Exception as e:  # raised on every rank below
                error = f"{type(e).__name__}: {e}"
        error = strategy.broadcast(error, src=0)
        if error is not None:
            raise ValueError(f"EditEvaluator: {error}")
        strategy.barrier("edit_eval_prepared")
        self._stored = load_results(folder, retry_errors=False, repair=False) if self.resume \
            else {}
        self._file = CaseResultsFile(folder / f"cases.rank{self.global_rank}.jsonl").open()
        self._counts = {"evaluated": 0, "resumed": 0}
        self._samples = []
        self.pre_metrics = self.post_metrics = None  # fresh metrics for every run
        if self.kind is not None:
            self._make_metrics(self.kind)
        self.edit_metrics.reset()

    # ------------------------------------------------------------------ steps
    def _feed(self, record: Record) -> None:
        metrics = {"post": self.post_metrics}
        if self.pre_metrics is not None:
            metrics["pre"] = self.pre_metrics
        update_metrics(metrics, record)
        failed = record.get("status") != "ok"
        self.edit_metrics["error_rate"].update([float(failed)])
        if not failed and self.editor is not None:
            if record.get("patch_norm") is not None:
                self.edit_metrics["patch_norm"].update([record["patch_norm"]])
            if record.get("edit_seconds") is not None:
                self.edit_metrics["seconds"].update([record["edit_seconds"]])
        if (self.options.generation and len(self._samples) < self.generation_samples
                and not failed):
            self._samples.append(record)

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
        stored = [self._stored.pop(case_key(c.case_id), None) for c in cases]
        check_stored_cases(self.results_dir, {case_key(c.case_id): s
                                              for c, s in zip(cases, stored) if s is not None},
                           cases)
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
            assert self._file is not None
            self._file.append(record)
            self._feed(record)

        with torch.inference_mode(False), torch.no_grad():
            records = evaluate(self.model, self.tokenizer, todo, self.editor,
                               options=self.options, on_result=on_result)
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
            message = no_edit_took(self.method, self.editor, post)
            if message is not None:
                rank_zero_warn(message)
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
        if not self.trainer.is_global_zero:
            return
        if self.results_dir is not None:
            md = (f"# Edit evaluation: {self.label} on {self.kind} ({self.mode})\n\n"
                  f"{n_cases} cases, {n_errors} errors. Values × 100, ± 95% CI.\n\n{table}\n")
            write_summary(self.results_dir, self.results, md)
        if table:  # the table as text in TensorBoard (Markdown renders)
            log_text(self.loggers, f"summary/{self.label}", table, self.global_step)
            if self.verbose:  # the console summary, like Trainer.test's own table
                rank_zero_info(f"\n{table}\n")
        # Sample generations of this rank's first cases: the prompt, and the text before and
        # after the edit (the unedited model's one text with editor=None).
        phases = (("pre", "before"), ("post", "after")) if self.editor is not None else \
            (("pre", "unedited"),)
        samples = generation_table(self._samples, self.generation_samples, phases=phases)
        if samples:
            log_text(self.loggers, f"generations/{self.label}", samples, self.global_step)

    @override
    def on_test_end(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @override
    def teardown(self, stage: str) -> None:
        self.on_test_end()
