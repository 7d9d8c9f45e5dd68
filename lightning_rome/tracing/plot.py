"""Plots of causal traces (matplotlib, the optional ``plot`` extra).

* :func:`plot_trace` — one prompt's heatmap in the paper's style: tokens on the y axis (subject
  tokens marked ``*``), layers on the x axis, purple for hidden states, green for MLP, red for
  attention; the colour scale starts at the corrupted probability.
* :func:`plot_traces` — the hidden / MLP / attention heatmaps of one prompt side by side.
* :func:`plot_average` — the averaged indirect effect per token class and layer.
* :func:`plot_average_lines` — AIE against layer with 95% confidence bands.
* :func:`save_figure` (PNG, PDF or SVG, written atomically) and :func:`log_figure`
  (TensorBoard, from a Lightning ``TensorBoardLogger`` or a ``SummaryWriter``);
  :func:`save_and_log_figure` does both, drawing a PNG's figure once.

Figures are built with the object-oriented API (``matplotlib.figure.Figure``), never through
``pyplot``'s global state, so plotting is safe in headless and multi-process runs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_rome.tracing.aggregate import TraceAggregate
from lightning_rome.tracing.result import CausalTrace
from lightning_rome.utils.io import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "figure_to_array",
    "log_figure",
    "plot_average",
    "plot_average_lines",
    "plot_trace",
    "plot_traces",
    "save_and_log_figure",
    "save_figure",
]

CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
COLORS = {"hidden": "tab:purple", "mlp": "tab:green", "attn": "tab:red"}
_WHAT = {"hidden": "single restored layer", "mlp": "MLP", "attn": "Attn"}


def _matplotlib() -> Any:
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - exercised only without matplotlib
        raise ImportError(
            "plotting causal traces needs matplotlib: pip install 'lightning-rome[plot]'"
        ) from err
    return matplotlib, Figure


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    _, Figure = _matplotlib()
    if ax is not None:
        return ax.figure, ax
    # Constrained layout keeps row labels, titles and colour-bar labels inside the figure.
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots()


def _layer_ticks(ax: Axes, n_layers: int, centred: bool) -> None:
    step = max(1, n_layers // 8)
    ticks = np.arange(0, n_layers, step)
    ax.set_xticks(ticks + 0.5 if centred else ticks)
    ax.set_xticklabels([str(t) for t in ticks])


def plot_trace(trace: CausalTrace, ax: Axes | None = None, *, title: str | None = None,
               xlabel: str | None = None, colorbar: bool = True,
               figsize: tuple[float, float] | None = None) -> Figure:
    """The heatmap of one trace, in the paper's style.

    Args:
        trace: the trace.
        ax: draw into these axes (default: a new figure of ``figsize`` inches).
        title: the title (default: "Impact of restoring … after corrupted input").
        xlabel: the x-axis label (default: the restored layer, or the window's centre).
        colorbar: add a colour bar labelled ``p(answer)``.
        figsize: the new figure's size in inches (default: grows with the prompt's length).

    Returns:
        The figure.
    """
    fig, ax = _axes(ax, figsize or (3.5, 0.25 * trace.n_tokens + 1.2))
    scores = trace.scores.numpy()  # (T, L)
    b, e = trace.subject_range
    labels = [tok + ("*" if b <= i < e else "") for i, tok in enumerate(trace.tokens)]
    mesh = ax.pcolormesh(scores, cmap=CMAPS[trace.kind], vmin=min(trace.low_score,
                                                                  float(scores.min())))
    ax.invert_yaxis()
    ax.set_yticks(np.arange(trace.n_tokens) + 0.5)
    ax.set_yticklabels(labels)
    _layer_ticks(ax, trace.n_layers, centred=True)
    if title is None:
        what = {"hidden": "state", "mlp": "MLP", "attn": "Attn"}[trace.kind]
        title = f"Impact of restoring {what} after corrupted input"
        if trace.sever:
            title += f", later {_WHAT[trace.sever]} severed"
    ax.set_title(title, fontsize="small")
    if xlabel is None:
        xlabel = ("single restored layer" if trace.kind == "hidden" else
                  f"center of interval of {trace.window} restored {_WHAT[trace.kind]} layers")
    ax.set_xlabel(xlabel, fontsize="small")
    if colorbar:
        cb = fig.colorbar(mesh, ax=ax)
        # Beside the bar: under it, the label collided with the x-axis label.
        cb.set_label(f"p({trace.answer.strip()})", fontsize="small")
    return fig


def plot_traces(traces: Mapping[str, CausalTrace] | Sequence[CausalTrace], *,
                figsize: tuple[float, float] | None = None) -> Figure:
    """The traces of one prompt side by side (e.g. hidden, MLP and attention)."""
    items = list(traces.values()) if isinstance(traces, Mapping) else list(traces)
    if not items:
        raise ValueError("plot_traces needs at least one trace")
    _, Figure = _matplotlib()
    fig = Figure(figsize=figsize or (4.0 * len(items), 0.25 * items[0].n_tokens + 1.5),
                 layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(items)))
    for ax, t in zip(axes, items):
        plot_trace(t, ax=ax)
    return fig


def plot_average(agg: TraceAggregate, ax: Axes | None = None, *, title: str | None = None,
                 colorbar: bool = True, figsize: tuple[float, float] = (4.0, 2.2)) -> Figure:
    """The average indirect effect per token class (rows) and layer (columns)."""
    fig, ax = _axes(ax, figsize)
    aie = np.ma.masked_invalid(agg.aie.numpy())  # (6, L)
    mesh = ax.pcolormesh(aie, cmap=CMAPS[agg.kind], vmin=0.0)
    ax.invert_yaxis()
    ax.set_yticks(np.arange(len(agg.classes)) + 0.5)
    ax.set_yticklabels([f"{c} ({int(n)})" for c, n in zip(agg.classes, agg.counts)],
                       fontsize="small")
    _layer_ticks(ax, agg.n_layers, centred=True)
    what = {"hidden": "hidden state", "mlp": "MLP", "attn": "Attn"}[agg.kind]
    ax.set_title(title or f"Average indirect effect of {what} over {agg.n_prompts} prompts",
                 fontsize="small")
    ax.set_xlabel("layer" if agg.kind == "hidden" else f"center of {agg.window} restored layers",
                  fontsize="small")
    if colorbar:
        cb = fig.colorbar(mesh, ax=ax)
        cb.set_label("AIE", fontsize="small")  # beside the bar, clear of the title
    return fig


def plot_average_lines(aggregates: TraceAggregate | Mapping[str, TraceAggregate]
                       | Sequence[TraceAggregate], ax: Axes | None = None, *,
                       token_class: str | None = "last subject token",
                       title: str | None = None,
                       figsize: tuple[float, float] = (4.0, 2.5)) -> Figure:
    """AIE against layer with 95% confidence bands.

    With several aggregates (e.g. hidden, MLP, attention, severed), one line each at
    ``token_class``. With one aggregate and ``token_class=None``, one line per token class.
    """
    fig, ax = _axes(ax, figsize)
    if isinstance(aggregates, TraceAggregate):
        aggregates = [aggregates]
    items = (list(aggregates.items()) if isinstance(aggregates, Mapping)
             else [(a.label, a) for a in aggregates])
    if not items:
        raise ValueError("plot_average_lines needs at least one aggregate")
    lines: list[tuple[str, TraceAggregate, str, str | None]] = []
    if token_class is None:
        if len(items) != 1:
            raise ValueError("token_class=None plots every class of a single aggregate")
        lines = [(c, items[0][1], c, None) for c in items[0][1].classes]
    else:
        lines = [(label, a, token_class, COLORS.get(a.kind) if a.sever is None else None)
                 for label, a in items]
    for label, a, cls, color in lines:
        mean, lo, hi = (t.numpy() for t in a.effect(cls))
        x = np.arange(a.n_layers)
        (line,) = ax.plot(x, mean, label=label, color=color)
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("layer")
    ax.set_ylabel("AIE")
    ax.set_title(title or (f"Average indirect effect at the {token_class}" if token_class
                           else "Average indirect effect"), fontsize="small")
    ax.legend(fontsize="x-small")
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str], *, dpi: float | None = None) -> Path:
    """Save as PNG, PDF or SVG (by suffix), atomically."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("png", "pdf", "svg"):
        raise ValueError(f"save a figure as .png, .pdf or .svg, got {path.name!r}")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi)
    return path


def figure_to_array(fig: Figure) -> np.ndarray:
    """The rendered figure as ``(H, W, 3)`` uint8 RGB."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _image_writer(target: Any) -> Any:
    """The ``SummaryWriter`` of a Lightning ``TensorBoardLogger``, or ``target`` itself."""
    writer = target
    if not hasattr(writer, "add_image"):
        writer = getattr(target, "experiment", None)
    if writer is None or not hasattr(writer, "add_image"):
        raise TypeError(f"log_figure needs a TensorBoardLogger or a SummaryWriter, got "
                        f"{type(target).__name__}")
    return writer


def log_figure(target: Any, tag: str, fig: Figure, step: int | None = None) -> None:
    """Log a figure as an image to TensorBoard.

    Args:
        target: a Lightning ``TensorBoardLogger`` (its ``experiment``) or a
            ``torch.utils.tensorboard.SummaryWriter``.
        tag: the image's tag.
        fig: the figure.
        step: the global step.

    Raises:
        TypeError: ``target`` is neither.
    """
    _image_writer(target).add_image(tag, figure_to_array(fig), global_step=step,
                                    dataformats="HWC")


def save_and_log_figure(fig: Figure, path: str | os.PathLike[str], target: Any, tag: str,
                        step: int | None = None) -> Path:
    """:func:`save_figure` then :func:`log_figure`, drawing the figure once for both where
    ``savefig`` would only draw it and write the pixels (a PNG at the figure's own resolution,
    with matplotlib's default ``savefig.*`` settings): the same file and the same image.

    Raises:
        TypeError: ``target`` is neither a ``TensorBoardLogger`` nor a ``SummaryWriter``.
        ValueError: ``path`` is not ``.png``, ``.pdf`` or ``.svg``.
    """
    import matplotlib as mpl
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    writer = _image_writer(target)
    rc = mpl.rcParams
    if (path.suffix.lower() != ".png" or rc["savefig.dpi"] != "figure"
            or rc["savefig.bbox"] is not None or rc["savefig.transparent"]
            or rc["savefig.facecolor"] != "auto" or rc["savefig.edgecolor"] != "auto"):
        save_figure(fig, path)
        log_figure(writer, tag, fig, step)
        return path
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())  # (H, W, 4) uint8
    with atomic_path(path) as tmp:  # what savefig writes: FigureCanvasAgg.print_png
        mpl.image.imsave(tmp, rgba, format="png", origin="upper", dpi=fig.dpi)
    writer.add_image(tag, rgba[..., :3].copy(), global_step=step, dataformats="HWC")
    return path
