"""Averaging causal traces over a dataset: AIE per (token class, layer), ATE, and the layer to
edit (Meng et al. 2022, Figure 2 and §2.2).

Prompts have different lengths, so each trace's rows are first summarised into the paper's six
token classes (the mean indirect effect of the rows of a class, per layer), then averaged over
prompts with a 95% confidence interval (normal approximation, ``mean ± 1.96 · s / √n``).

The classes of a prompt of ``T`` tokens whose subject spans ``[b, e)``:

=========================  ===============================================================
first subject token        ``b``
middle subject tokens      ``b+1 … e−2`` (absent for subjects of one or two tokens)
last subject token         ``e−1`` (the same row as the first for one-token subjects)
first subsequent token     ``e``, if it is not the last token
further tokens             ``e+1 … T−2``
last token                 ``T−1``
=========================  ===============================================================

A class a prompt does not have does not count for that class (``counts`` says how many prompts
each class averages). Tokens before the subject belong to no class: restoring them cannot change
anything.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_rome.tracing.result import KINDS, SEVERABLE, CausalTrace
from lightning_rome.utils.io import CorruptFileError, atomic_write_json

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "TOKEN_CLASSES",
    "TraceAggregate",
    "aggregate_effects",
    "average_traces",
    "class_effects",
    "suggest_edit_layer",
    "token_classes",
]

TOKEN_CLASSES: tuple[str, ...] = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)
LAST_SUBJECT = TOKEN_CLASSES.index("last subject token")
Z_95 = 1.959963984540054  # the 97.5% quantile of the standard normal
FORMAT = "lightning_rome.trace_aggregate"
FORMAT_VERSION = 1


def token_classes(n_tokens: int, subject_range: tuple[int, int]) -> list[list[int]]:
    """The rows of each of :data:`TOKEN_CLASSES` for one prompt (a list may be empty)."""
    b, e = subject_range
    if not 0 <= b < e <= n_tokens:
        raise ValueError(f"subject_range {subject_range} is not a span of {n_tokens} tokens")
    last = n_tokens - 1
    return [
        [b],
        list(range(b + 1, e - 1)),
        [e - 1],
        [e] if e < last else [],
        list(range(e + 1, last)),
        [last],
    ]


def class_effects(trace: CausalTrace) -> Tensor:
    """``(6, L)`` float64: the mean indirect effect ``P*,clean − P*`` of each token class's rows,
    ``NaN`` for a class the prompt does not have."""
    ie = trace.scores.double() - trace.low_score  # (T, L), IE in float64
    out = torch.full((len(TOKEN_CLASSES), trace.n_layers), math.nan, dtype=torch.float64)
    for k, rows in enumerate(token_classes(trace.n_tokens, trace.subject_range)):
        if rows:
            out[k] = ie[rows].mean(0)
    return out


def _mean_ci(x: Tensor, z: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mean, CI low, CI high over dim 0, ignoring NaN; and the counts."""
    ok = ~torch.isnan(x)
    n = ok.sum(0)  # (...)
    filled = torch.where(ok, x, torch.zeros_like(x))
    mean = filled.sum(0) / n.clamp(min=1)
    dev = torch.where(ok, x - mean, torch.zeros_like(x))
    var = (dev ** 2).sum(0) / (n - 1).clamp(min=1)
    half = z * (var / n.clamp(min=1)).sqrt()
    nan = torch.full_like(mean, math.nan)
    mean = torch.where(n > 0, mean, nan)
    half = torch.where(n > 1, half, nan)
    return mean, mean - half, mean + half, n


@dataclass
class TraceAggregate:
    """Causal traces of one kind averaged over prompts.

    Attributes:
        kind: ``hidden``, ``mlp`` or ``attn``.
        sever: the severed path of hidden traces, or ``None``.
        window: the traces' window.
        n_prompts: how many prompts were averaged.
        aie: ``(6, L)`` average indirect effect per token class (rows as
            :data:`TOKEN_CLASSES`) and layer.
        aie_low, aie_high: ``(6, L)``, its 95% confidence interval.
        counts: ``(6,)``, how many prompts have each class.
        ate: the average total effect ``mean(P[o] − P*[o])``; ``ate_low``/``ate_high`` its CI.
        high_score: the mean clean probability ``P[o]``.
        low_score: the mean corrupted probability ``P*[o]``.
        classes: the class names.
    """

    kind: str
    window: int
    n_prompts: int
    aie: Tensor
    aie_low: Tensor
    aie_high: Tensor
    counts: Tensor
    ate: float
    ate_low: float
    ate_high: float
    high_score: float
    low_score: float
    sever: str | None = None
    classes: tuple[str, ...] = field(default=TOKEN_CLASSES)

    def __post_init__(self) -> None:
        for name in ("aie", "aie_low", "aie_high"):
            setattr(self, name, torch.as_tensor(getattr(self, name), dtype=torch.float64))
        self.counts = torch.as_tensor(self.counts, dtype=torch.long)
        self.classes = tuple(self.classes)
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.sever is not None and self.sever not in SEVERABLE:
            raise ValueError(f"sever must be None or one of {SEVERABLE}, got {self.sever!r}")
        shape = (len(self.classes), self.aie.shape[-1] if self.aie.ndim == 2 else -1)
        for name in ("aie", "aie_low", "aie_high"):
            if tuple(getattr(self, name).shape) != shape or shape[1] < 1:
                raise ValueError(f"{name} must be (classes, layers) = {shape}, got "
                                 f"{tuple(getattr(self, name).shape)}")
        if tuple(self.counts.shape) != (len(self.classes),):
            raise ValueError(f"counts must have one entry per class, got "
                             f"{tuple(self.counts.shape)}")

    @property
    def n_layers(self) -> int:
        return self.aie.shape[1]

    @property
    def label(self) -> str:
        return self.kind if self.sever is None else f"{self.kind}/sever={self.sever}"

    def effect(self, token_class: str = "last subject token") -> tuple[Tensor, Tensor, Tensor]:
        """``(aie, low, high)`` of one token class, each ``(L,)``."""
        k = self._class_index(token_class)
        return self.aie[k], self.aie_low[k], self.aie_high[k]

    def best_layer(self, token_class: str = "last subject token") -> int:
        """The layer with the largest AIE at ``token_class``."""
        aie = self.effect(token_class)[0]
        if bool(torch.isnan(aie).all()):
            raise ValueError(f"no prompt has a {token_class!r}")
        return int(torch.nan_to_num(aie, nan=-math.inf).argmax())

    def _class_index(self, token_class: str) -> int:
        if token_class not in self.classes:
            raise ValueError(f"unknown token class {token_class!r}: expected one of "
                             f"{self.classes}")
        return self.classes.index(token_class)

    # ------------------------------------------------------------------------- plots
    def plot(self, ax: Axes | None = None, **kwargs: Any) -> Figure:
        """The averaged AIE heatmap; see :func:`lightning_rome.tracing.plot.plot_average`."""
        from lightning_rome.tracing.plot import plot_average

        return plot_average(self, ax=ax, **kwargs)

    # ------------------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        def clean(t: Tensor) -> Any:
            return [[None if math.isnan(v) else v for v in row] for row in t.tolist()]

        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("aie", "aie_low", "aie_high"):
            d[name] = clean(d[name])
        d["counts"] = self.counts.tolist()
        d["classes"] = list(self.classes)
        for name in ("ate", "ate_low", "ate_high", "high_score", "low_score"):
            d[name] = None if math.isnan(d[name]) else d[name]
        return {"format": FORMAT, "version": FORMAT_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TraceAggregate:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"not a trace aggregate (format {d.get('format')!r})"
                             if isinstance(d, dict) else "not a dict")
        if d.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported trace aggregate version {d.get('version')!r}")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}

        def grid(v: Any) -> Tensor:
            return torch.tensor([[math.nan if x is None else x for x in row] for row in v],
                                dtype=torch.float64)

        for name in ("aie", "aie_low", "aie_high"):
            kw[name] = grid(kw[name])
        for name in ("ate", "ate_low", "ate_high", "high_score", "low_score"):
            kw[name] = math.nan if kw.get(name) is None else float(kw[name])
        return cls(**kw)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as JSON, atomically."""
        path = Path(path)
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TraceAggregate:
        """Read and validate; ``CorruptFileError`` if the file is not a valid aggregate."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no trace aggregate at {path}")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as err:
            raise CorruptFileError(f"{path} is not a valid trace aggregate: {err}") from err


def aggregate_effects(effects: Tensor, high: Tensor, low: Tensor, *, kind: str, window: int,
                      sever: str | None = None, z: float = Z_95) -> TraceAggregate:
    """Average per-prompt class effects.

    Args:
        effects: ``(N, 6, L)`` from :func:`class_effects` (``NaN`` for missing classes).
        high: ``(N,)`` clean probabilities ``P[o]``.
        low: ``(N,)`` corrupted probabilities ``P*[o]``.
        kind, window, sever: what the traces were.
        z: the normal quantile of the confidence interval (1.96 for 95%).
    """
    effects = torch.as_tensor(effects, dtype=torch.float64)
    high = torch.as_tensor(high, dtype=torch.float64).flatten()
    low = torch.as_tensor(low, dtype=torch.float64).flatten()
    if effects.ndim != 3 or effects.shape[1] != len(TOKEN_CLASSES) or effects.shape[0] == 0:
        raise ValueError(f"effects must be (N > 0, {len(TOKEN_CLASSES)}, L), got "
                         f"{tuple(effects.shape)}")
    if high.shape[0] != effects.shape[0] or low.shape[0] != effects.shape[0]:
        raise ValueError("effects, high and low must have one entry per prompt")
    aie, aie_lo, aie_hi, counts = _mean_ci(effects, z)
    ate, ate_lo, ate_hi, _ = _mean_ci(high - low, z)
    return TraceAggregate(
        kind=kind, window=window, sever=sever, n_prompts=effects.shape[0], aie=aie,
        aie_low=aie_lo, aie_high=aie_hi, counts=counts[:, 0], ate=float(ate),
        ate_low=float(ate_lo), ate_high=float(ate_hi), high_score=float(high.mean()),
        low_score=float(low.mean()))


def average_traces(traces: Sequence[CausalTrace], *, z: float = Z_95) -> TraceAggregate:
    """Average traces of the same kind, window and depth over prompts (AIE and ATE with CIs).

    Raises:
        ValueError: no traces, or traces of different kinds, windows or layer counts.
    """
    traces = list(traces)
    if not traces:
        raise ValueError("average_traces needs at least one trace")
    first = traces[0]
    for t in traces[1:]:
        if (t.kind, t.sever, t.window, t.n_layers) != (first.kind, first.sever, first.window,
                                                      first.n_layers):
            raise ValueError(
                f"cannot average a {t.label} trace (window {t.window}, {t.n_layers} layers) with "
                f"a {first.label} trace (window {first.window}, {first.n_layers} layers)")
    return aggregate_effects(
        torch.stack([class_effects(t) for t in traces]),
        torch.tensor([t.high_score for t in traces]), torch.tensor([t.low_score for t in traces]),
        kind=first.kind, window=first.window, sever=first.sever, z=z)


def suggest_edit_layer(source: TraceAggregate | CausalTrace | Sequence[CausalTrace]) -> int:
    """The layer to edit: the peak of the MLP effect at the last subject token.

    Args:
        source: an MLP :class:`TraceAggregate`, one MLP :class:`CausalTrace`, or a list of
            MLP traces (averaged first).

    Raises:
        ValueError: the source is not an (unsevered) MLP trace.
    """
    if isinstance(source, CausalTrace):
        if source.kind != "mlp":
            raise ValueError(f"suggest_edit_layer needs an MLP trace, got kind {source.kind!r}")
        row = token_classes(source.n_tokens, source.subject_range)[LAST_SUBJECT][0]
        return int(source.scores[row].argmax())
    if not isinstance(source, TraceAggregate):
        source = average_traces(source)
    if source.kind != "mlp" or source.sever is not None:
        raise ValueError(f"suggest_edit_layer needs an MLP aggregate, got {source.label!r}")
    return source.best_layer("last subject token")
