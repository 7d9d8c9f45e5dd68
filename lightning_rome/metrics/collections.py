"""Metric sets of the papers' tables, and helpers to read them out with confidence intervals."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

from torch import Tensor
from torchmetrics import Metric, MetricCollection

from lightning_rome.metrics.base import MetricWithCI
from lightning_rome.metrics.edit_score import EditScore
from lightning_rome.metrics.efficacy_magnitude import EfficacyMagnitude
from lightning_rome.metrics.efficacy_score import EfficacyScore
from lightning_rome.metrics.functional._utils import MetricCI, ScoreType
from lightning_rome.metrics.functional.tfidf import AttributeSnippets, TfidfTable
from lightning_rome.metrics.generation_entropy import GenerationEntropy
from lightning_rome.metrics.neighborhood_magnitude import NeighborhoodMagnitude
from lightning_rome.metrics.neighborhood_score import NeighborhoodScore
from lightning_rome.metrics.paraphrase_magnitude import ParaphraseMagnitude
from lightning_rome.metrics.paraphrase_score import ParaphraseScore
from lightning_rome.metrics.reference_score import ReferenceScore
from lightning_rome.metrics.zsre_accuracy import ZsREEfficacy, ZsREParaphrase, ZsRESpecificity

__all__ = [
    "COUNTERFACT_COLUMNS",
    "ZSRE_COLUMNS",
    "compute_with_ci",
    "counterfact_metrics",
    "summary_table",
    "to_percent",
    "zsre_metrics",
]

#: Table columns of COUNTERFACT results, in the order of ROME's Table 4 / MEMIT's Table 2.
COUNTERFACT_COLUMNS = ("S", "ES", "PS", "NS", "EM", "PM", "NM", "GE", "RS")
#: Table columns of zsRE results (ROME's Table 3 / MEMIT's Table 1).
ZSRE_COLUMNS = ("efficacy", "paraphrase", "specificity")


def counterfact_metrics(
    prefix: str | None = None,
    postfix: str | None = None,
    *,
    generation: bool = True,
    score_type: ScoreType = "nll",
    tfidf: TfidfTable | str | os.PathLike[str] | None = None,
    snippets: AttributeSnippets | str | os.PathLike[str] | None = None,
) -> MetricCollection:
    """The COUNTERFACT metric set: ES, EM, PS, PM, NS, NM, S, and GE and RS with generation.

    All metrics take their inputs by keyword from one ``update(**inputs)`` call, each picking
    the names it declares:

    - ``rewrite_new``, ``rewrite_true``: per-prompt scores (mean NLL by default) of ``o*`` and
      ``o^c`` on the rewrite prompts (ES, EM, S);
    - ``paraphrase_new``, ``paraphrase_true``: on the paraphrase prompts (PS, PM, S);
    - ``neighborhood_new``, ``neighborhood_true``: on the neighborhood prompts (NS, NM, S);
    - ``generated_texts``: per case, the texts generated from its generation prompts (GE, RS);
    - ``reference_texts``, or ``relation_ids`` and ``target_new_ids`` (RS).

    Args:
        prefix: prepended to every key, e.g. ``"post/"`` gives ``"post/ES"``.
        postfix: appended to every key.
        generation: include GE, and RS when an IDF table or snippets are given.
        score_type: ``"nll"`` or ``"prob"``, what the probability inputs hold.
        tfidf: RS's IDF table (see :class:`ReferenceScore`).
        snippets: RS's attribute snippets (see :class:`ReferenceScore`).

    Returns:
        A :class:`~torchmetrics.MetricCollection` keyed ``ES EM PS PM NS NM S [GE RS]``.

    Example:
        >>> metrics = counterfact_metrics(prefix="post/", generation=False, score_type="prob")
        >>> metrics.update(rewrite_new=[0.9], rewrite_true=[0.1], paraphrase_new=[[0.6, 0.2]],
        ...                paraphrase_true=[[0.3, 0.5]], neighborhood_new=[0.2],
        ...                neighborhood_true=[0.4])
        >>> for key, value in metrics.compute().items():
        ...     print(key, round(float(value), 4))
        post/EM 0.8
        post/ES 1.0
        post/NM 0.2
        post/NS 1.0
        post/PM 0.0
        post/PS 0.5
        post/S 0.75
    """
    metrics: dict[str, Metric] = {
        "ES": EfficacyScore(score_type),
        "EM": EfficacyMagnitude(score_type),
        "PS": ParaphraseScore(score_type),
        "PM": ParaphraseMagnitude(score_type),
        "NS": NeighborhoodScore(score_type),
        "NM": NeighborhoodMagnitude(score_type),
        "S": EditScore(score_type),
    }
    if generation:
        metrics["GE"] = GenerationEntropy()
        if tfidf is not None or snippets is not None:
            metrics["RS"] = ReferenceScore(tfidf=tfidf, snippets=snippets)
        else:
            warnings.warn(
                "counterfact_metrics(generation=True) without tfidf= or snippets=: the reference "
                "score RS is left out (it needs ROME's idf.npy/tfidf_vocab.json or the attribute "
                "snippets)",
                UserWarning,
                stacklevel=2,
            )
    # Every state name is unique to its metric class, so no two metrics ever share state.
    return MetricCollection(metrics, prefix=prefix, postfix=postfix, compute_groups=False)


def zsre_metrics(
    prefix: str | None = None, postfix: str | None = None, *, ignore_index: int = -100
) -> MetricCollection:
    """The zsRE metric set: token-level ``efficacy``, ``paraphrase`` and ``specificity``.

    Inputs by keyword (each metric picks its own): ``rewrite_preds``/``rewrite_target`` or
    ``rewrite_correct`` (efficacy), ``paraphrase_*`` (paraphrase), ``neighborhood_*``
    (specificity); see :class:`ZsREAccuracy`.

    Example:
        >>> import torch
        >>> metrics = zsre_metrics()
        >>> metrics.update(rewrite_correct=[[True, True]], paraphrase_correct=[[True, False]],
        ...                neighborhood_preds=torch.tensor([[3, 4]]),
        ...                neighborhood_target=torch.tensor([[3, 5]]))
        >>> {k: float(v) for k, v in metrics.compute().items()}
        {'efficacy': 1.0, 'paraphrase': 0.5, 'specificity': 0.5}
    """
    metrics: dict[str, Metric] = {
        "efficacy": ZsREEfficacy(ignore_index),
        "paraphrase": ZsREParaphrase(ignore_index),
        "specificity": ZsRESpecificity(ignore_index),
    }
    return MetricCollection(metrics, prefix=prefix, postfix=postfix, compute_groups=False)


def compute_with_ci(metrics: MetricCollection | Mapping[str, Metric] | MetricWithCI) -> Any:
    """Means and 95% intervals of a collection (or one metric), synchronised across processes.

    Call it on every rank under DDP, like ``compute()``.

    Returns:
        ``{key: {"mean", "ci_low", "ci_high", "n"}}`` with the collection's (prefixed) keys, or
        one such dict for a single metric.

    Raises:
        TypeError: a metric without ``compute_with_ci``.

    Example:
        >>> metrics = zsre_metrics()
        >>> metrics.update(rewrite_correct=[[True], [False]], paraphrase_correct=[[True], [True]],
        ...                neighborhood_correct=[[True, False], [True, True]])
        >>> r = compute_with_ci(metrics)["efficacy"]
        >>> r["mean"], round(r["ci_low"], 3), round(r["ci_high"], 3), r["n"]
        (0.5, 0.095, 0.905, 2)
    """
    if isinstance(metrics, MetricWithCI):
        return metrics.compute_with_ci()
    items = (
        metrics.items(keep_base=False) if isinstance(metrics, MetricCollection) else metrics.items()
    )
    out: dict[str, MetricCI] = {}
    for key, metric in items:
        if not isinstance(metric, MetricWithCI):
            raise TypeError(f"{key}: {type(metric).__name__} has no compute_with_ci()")
        out[key] = metric.compute_with_ci()
    return out


def _as_ci(value: Any) -> MetricCI:
    if isinstance(value, Mapping):
        if "mean" not in value:
            raise ValueError(f"a result must have a 'mean', got keys {sorted(value)}")
        return MetricCI(
            mean=float(value["mean"]),
            ci_low=float(value.get("ci_low", math.nan)),
            ci_high=float(value.get("ci_high", math.nan)),
            n=int(value.get("n", 0)),
        )
    if isinstance(value, Tensor):
        value = value.item()
    return MetricCI(mean=float(value), ci_low=math.nan, ci_high=math.nan, n=0)


def to_percent(results: Mapping[str, Any], factor: float = 100.0) -> dict[str, MetricCI]:
    """Scale results (means and interval ends; not ``n``) by ``factor``, as the papers' tables do.

    Every metric is scaled, GE and RS included (ROME's ``summarize.py`` multiplies all of them
    by 100: GE 6.266 bits shows as 626.6).

    Example:
        >>> pct = to_percent({"ES": {"mean": 0.98, "ci_low": 0.97, "ci_high": 0.99, "n": 100}})
        >>> pct["ES"]["mean"], pct["ES"]["n"]
        (98.0, 100)
    """
    out: dict[str, MetricCI] = {}
    for key, value in results.items():
        r = _as_ci(value)
        out[key] = MetricCI(
            mean=r["mean"] * factor,
            ci_low=r["ci_low"] * factor,
            ci_high=r["ci_high"] * factor,
            n=r["n"],
        )
    return out


def _column_order(keys: list[str]) -> list[str]:
    known = [c for c in (*COUNTERFACT_COLUMNS, *ZSRE_COLUMNS) if c in keys]
    return known + [k for k in keys if k not in known]


def summary_table(
    results: Mapping[str, Any],
    *,
    prefix: str = "",
    label: str = "",
    scale: float = 100.0,
    digits: int = 1,
    rich: bool = False,
) -> Any:
    """Format results as a row (or rows) of the papers' tables, × 100: ``mean ± half-width``
    for a symmetric interval, ``mean [low, high]`` for an asymmetric one (the Wilson interval of
    a rate, or an interval clipped to the metric's range).

    Args:
        results: ``{key: result}`` for one row, where a result is a ``compute_with_ci()`` dict,
            a tensor or a float; or ``{row_label: {key: result}}`` for several rows. Keys are
            matched after removing ``prefix``; known columns come in the papers' order
            (``S ES PS NS EM PM NM GE RS``, then ``efficacy paraphrase specificity``).
        prefix: the collection prefix to strip from keys (e.g. ``"post/"``).
        label: the row label of a single row (e.g. the editor's name).
        scale: the factor applied to every value (100, as in the papers).
        digits: decimals shown.
        rich: return a :class:`rich.table.Table` instead of plain text.

    Returns:
        The table as a string (a Markdown-style pipe table), or a ``rich`` table.

    Example:
        >>> res = {"post/ES": {"mean": 1.0, "ci_low": 1.0, "ci_high": 1.0, "n": 10},
        ...        "post/S": {"mean": 0.8912, "ci_low": 0.8712, "ci_high": 0.9112, "n": 10},
        ...        "post/GE": {"mean": 6.266, "ci_low": 6.256, "ci_high": 6.276, "n": 10}}
        >>> print(summary_table(res, prefix="post/", label="ROME"))
        | Editor | S          | ES          | GE          |
        |--------|------------|-------------|-------------|
        | ROME   | 89.1 ± 2.0 | 100.0 ± 0.0 | 626.6 ± 1.0 |
    """
    if results and all(isinstance(v, Mapping) and "mean" not in v for v in results.values()):
        rows = {str(k): v for k, v in results.items()}
    else:
        rows = {label: results}
    table: dict[str, dict[str, str]] = {}
    keys: list[str] = []
    for row_label, row in rows.items():
        cells: dict[str, str] = {}
        for key, r in to_percent(row, scale).items():
            name = key[len(prefix) :] if prefix and key.startswith(prefix) else key
            cell = f"{r['mean']:.{digits}f}"
            lo, hi = r["mean"] - r["ci_low"], r["ci_high"] - r["mean"]
            if math.isfinite(lo) and math.isfinite(hi):
                if abs(lo - hi) < 0.5 * 10.0 ** -digits:  # symmetric as shown: mean ± half
                    cell += f" ± {(lo + hi) / 2:.{digits}f}"
                else:  # Wilson or clipped to the metric's range: the interval itself
                    cell += f" [{r['ci_low']:.{digits}f}, {r['ci_high']:.{digits}f}]"
            cells[name] = cell
            if name not in keys:
                keys.append(name)
        table[row_label] = cells
    columns = _column_order(keys)
    header = ["Editor", *columns]
    body = [[lbl, *(cells.get(c, "—") for c in columns)] for lbl, cells in table.items()]
    if rich:
        from rich.table import Table

        t = Table(*header)
        for line in body:
            t.add_row(*line)
        return t
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(header, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in body]
    return "\n".join(lines)
