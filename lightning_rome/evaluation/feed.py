"""Feeding case records into metrics, and reading them out.

A record (see :func:`~lightning_rome.evaluation.evaluate_cases`) is turned into the keyword
inputs of the metrics (:func:`case_inputs`); each metric declares the inputs it needs in its
class attribute ``evaluation_inputs`` (e.g. ``EfficacyScore.evaluation_inputs == ("rewrite_new",
"rewrite_true")``) and is updated with exactly those when the case has them all, and skipped
for that case otherwise (a reduced COUNTERFACT case without paraphrases counts in ES, not in PS).
The metrics are duck-typed: anything with ``evaluation_inputs`` and ``update(**inputs)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from torchmetrics import Metric, MetricCollection

from lightning_rome.metrics.functional import MetricCI

__all__ = ["INPUTS", "case_inputs", "compute_results", "update_metrics"]

#: Every input :func:`case_inputs` can give, and what it holds (one entry per case: ``[x]``).
INPUTS: Mapping[str, str] = {
    **{f"{k}_{w}": f"the mean per-token NLL of {'o*' if w == 'new' else 'the true answer'} "
                   f"on each {k} prompt"
       for k in ("rewrite", "paraphrase", "neighborhood") for w in ("new", "true")},
    "rewrite_correct": "per-token argmax correctness of o* on the rewrite prompts (pooled)",
    "paraphrase_correct": "per-token argmax correctness of o* on the paraphrase prompts",
    "neighborhood_correct": "per-token argmax correctness of each neighbourhood prompt's own "
                            "answer",
    "generated_texts": "the texts generated from the generation prompts",
    "relation_ids": "the relation id r of the case (COUNTERFACT; for RS's snippets)",
    "target_new_ids": "the id of o* (COUNTERFACT; for RS's snippets)",
}
#: Per zsRE accuracy input: the prompt kind and which candidate's correctness it pools.
_CORRECT = {"rewrite_correct": ("rewrite", "new"), "paraphrase_correct": ("paraphrase", "new"),
            "neighborhood_correct": ("neighborhood", "true")}


def case_inputs(record: Mapping[str, Any], phase: str) -> dict[str, list[Any]]:
    """The metric inputs one case's record holds for ``phase`` (``"pre"`` or ``"post"``): the
    keys of :data:`INPUTS` that it has, each a one-case batch. ``{}`` for an error record or a
    phase that was not measured."""
    scores = record.get(phase)
    if record.get("status") != "ok" or not isinstance(scores, Mapping):
        return {}
    inputs: dict[str, list[Any]] = {}
    for kind in ("rewrite", "paraphrase", "neighborhood"):
        if kind in scores:
            inputs[f"{kind}_new"] = [list(scores[kind]["nll_new"])]
            inputs[f"{kind}_true"] = [list(scores[kind]["nll_true"])]
    for name, (kind, which) in _CORRECT.items():
        if kind in scores:  # zsRE: a case pools the answer tokens of all its prompts
            inputs[name] = [[x for row in scores[kind][f"correct_{which}"] for x in row]]
    if "generation" in scores:
        inputs["generated_texts"] = [list(scores["generation"]["texts"])]
        if record.get("relation_id") and record.get("target_new_id"):
            inputs["relation_ids"] = [record["relation_id"]]
            inputs["target_new_ids"] = [record["target_new_id"]]
    return inputs


def _members(collection: Any) -> Iterable[tuple[str, Any]]:
    if isinstance(collection, MetricCollection):
        return collection.items(keep_base=False)
    if isinstance(collection, Mapping):
        return collection.items()
    return [(type(collection).__name__, collection)]


def _needs(key: str, metric: Any) -> tuple[str, ...]:
    needs = getattr(metric, "evaluation_inputs", None)
    if not needs:
        raise TypeError(f"metric {key!r} ({type(metric).__name__}) does not say which case "
                        "inputs it needs: give its class an `evaluation_inputs` tuple of "
                        f"input names (from {', '.join(INPUTS)})")
    unknown = [n for n in needs if n not in INPUTS]
    if unknown:
        raise TypeError(f"metric {key!r} ({type(metric).__name__}) needs {unknown}, which no "
                        f"case record gives; the inputs are {', '.join(INPUTS)}")
    return tuple(needs)


def update_metrics(metrics: Mapping[str, Any], record: Mapping[str, Any]) -> None:
    """Feed one case's record into ``{"pre": collection, "post": collection}`` (either
    optional; a collection is a ``MetricCollection``, a mapping of metrics, or one metric).

    Error records are skipped. Each metric gets the inputs its ``evaluation_inputs`` names, and a
    metric whose inputs the case lacks (PS for a case without a paraphrase, GE without
    generated text) is not updated for this case.

    Raises:
        TypeError: a metric without ``evaluation_inputs``, or needing an input no record has.
    """
    for phase, collection in metrics.items():
        if collection is None:
            continue
        inputs = case_inputs(record, phase)
        for key, metric in _members(collection):
            needs = _needs(key, metric)
            if inputs and all(n in inputs for n in needs):
                metric.update(**{n: inputs[n] for n in needs})


def compute_results(collection: Mapping[str, Metric] | MetricCollection) -> dict[str, MetricCI]:
    """``compute_with_ci()`` of every metric that saw at least one case (on any process).

    Under DDP this is collective: call it on every rank. Metrics without cases are left out.
    """
    out: dict[str, MetricCI] = {}
    for key, metric in _members(collection):
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
                out[key] = metric.compute_with_ci()
        except ValueError as e:
            if "no cases" not in str(e):
                raise
    return out
