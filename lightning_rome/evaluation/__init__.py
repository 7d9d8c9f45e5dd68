"""The Trainer-free evaluation core (no Lightning imports).

* :mod:`~lightning_rome.evaluation.options`: :class:`EvalOptions`, every setting of a run.
* :mod:`~lightning_rome.evaluation.run`: the run loops (:func:`evaluate`,
  :func:`evaluate_cases`, :func:`evaluate_sequential`) and :func:`score_cases`.
* :mod:`~lightning_rome.evaluation.results`: the per-case record schema, the resumable results
  files (:class:`CaseResultsFile`, :func:`load_results`) and the results folder
  (:func:`run_signature`, :func:`prepare_folder`).
* :mod:`~lightning_rome.evaluation.feed`: records into metrics (:func:`update_metrics`), each
  metric fed the inputs it declares (``evaluation_inputs``).
* :mod:`~lightning_rome.evaluation.editors`: the editor from what the user passed, its
  fingerprint, the model's checksum.
* :mod:`~lightning_rome.evaluation.sequential`: the sequential-editing (lifelong) benchmark.

:class:`~lightning_rome.modules.EditEvaluator` (``Trainer.test``) and
:class:`~lightning_rome.callbacks.EditEvaluation` (during ``fit``) are thin shells over it.
"""

from lightning_rome.evaluation.editors import (
    case_fingerprint,
    dataset_kind,
    editor_fingerprint,
    editor_name,
    model_checksum,
    resolve_editor,
)
from lightning_rome.evaluation.feed import INPUTS, case_inputs, compute_results, update_metrics
from lightning_rome.evaluation.options import GENERATION_DEFAULTS, EvalOptions
from lightning_rome.evaluation.results import (
    RECORD_FORMAT,
    CaseResultsFile,
    Record,
    generation_table,
    load_results,
    prepare_folder,
    record_checksum,
    run_signature,
)
from lightning_rome.evaluation.run import (
    PROMPT_KINDS,
    evaluate,
    evaluate_cases,
    evaluate_sequential,
    score_cases,
)
from lightning_rome.evaluation.sequential import (
    RetainFact,
    SequentialInterrupt,
    SequentialResult,
    SequentialSettings,
    fact_model_benchmark,
    load_curve,
    run_key,
    run_sequential,
)

__all__ = [
    "GENERATION_DEFAULTS",
    "INPUTS",
    "PROMPT_KINDS",
    "RECORD_FORMAT",
    "CaseResultsFile",
    "EvalOptions",
    "Record",
    "RetainFact",
    "SequentialInterrupt",
    "SequentialResult",
    "SequentialSettings",
    "case_fingerprint",
    "case_inputs",
    "compute_results",
    "dataset_kind",
    "editor_fingerprint",
    "editor_name",
    "evaluate",
    "evaluate_cases",
    "evaluate_sequential",
    "fact_model_benchmark",
    "generation_table",
    "load_curve",
    "load_results",
    "model_checksum",
    "prepare_folder",
    "record_checksum",
    "resolve_editor",
    "run_key",
    "run_sequential",
    "run_signature",
    "score_cases",
    "update_metrics",
]
