"""Plots: images of the requested size, the paper's labels, files, and TensorBoard."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from test_causal_trace_io import make_trace

from lightning_rome.tracing import average_traces
from lightning_rome.tracing.plot import (
    figure_to_array,
    log_figure,
    plot_average,
    plot_average_lines,
    plot_trace,
    plot_traces,
    save_and_log_figure,
    save_figure,
)


def _traces():
    return {k: make_trace(kind=k, window=3) for k in ("hidden", "mlp", "attn")}


def test_trace_heatmap_in_the_papers_style(tmp_path):
    t = make_trace()
    fig = plot_trace(t, figsize=(4, 3))
    ax = fig.axes[0]
    labels = [lbl.get_text() for lbl in ax.get_yticklabels()]
    assert labels == ["The", " Space*", " Needle*", " is"]  # subject tokens starred
    assert ax.yaxis_inverted()  # the first token at the top
    assert "MLP" in ax.get_title() and "10 restored MLP layers" in ax.get_xlabel()
    assert len(fig.axes) == 2  # the heatmap and its colour bar
    path = save_figure(fig, tmp_path / "t.png", dpi=50)
    image = imread(path)
    assert image.shape[:2] == (150, 200)  # 3 × 4 inches at 50 dpi
    assert image[..., :3].std() > 0.05  # not blank


def test_side_by_side_and_averages(tmp_path):
    fig = plot_traces(_traces(), figsize=(9, 3))
    titles = [a.get_title() for a in fig.axes if a.get_title().startswith("Impact")]
    assert [t.split()[3] for t in titles] == ["state", "MLP", "Attn"]
    assert figure_to_array(fig).shape == (300, 900, 3)  # default 100 dpi
    rng = np.random.default_rng(0)
    traces = [make_trace(scores=torch.tensor(rng.uniform(0, 1, (4, 3)), dtype=torch.float32))
              for _ in range(4)]
    agg = average_traces(traces)
    fig = plot_average(agg, figsize=(5, 2.5))
    assert fig.axes[0].get_yticklabels()[0].get_text() == "first subject token (4)"
    pdf = save_figure(fig, tmp_path / "avg.pdf")
    assert pdf.read_bytes().startswith(b"%PDF")
    hidden = average_traces([make_trace(kind="hidden", scores=t.scores) for t in traces])
    fig = plot_average_lines({"mlp": agg, "hidden": hidden}, figsize=(4, 3))
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["mlp", "hidden"]
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), agg.aie[2].numpy())
    assert len(ax.collections) == 2  # one confidence band per line
    fig = plot_average_lines(agg, token_class=None)
    assert len(fig.axes[0].get_lines()) == 6
    assert save_figure(fig, tmp_path / "lines.svg").exists()
    with pytest.raises(ValueError, match="png"):
        save_figure(fig, tmp_path / "lines.jpg")


def test_log_figure_to_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    fig = plot_trace(make_trace(), figsize=(3, 2))
    writer = SummaryWriter(tmp_path / "w")
    log_figure(writer, "trace/mlp", fig, step=3)
    writer.close()
    logger = TensorBoardLogger(tmp_path, name="lg")
    log_figure(logger, "trace/hidden", fig, step=5)
    logger.experiment.flush()
    for folder, tag, step in [(tmp_path / "w", "trace/mlp", 3),
                              (logger.log_dir, "trace/hidden", 5)]:
        acc = EventAccumulator(str(folder))
        acc.Reload()
        assert acc.Tags()["images"] == [tag]
        (event,) = acc.Images(tag)
        assert (event.step, event.width, event.height) == (step, 300, 200)
    with pytest.raises(TypeError, match="TensorBoardLogger or a SummaryWriter"):
        log_figure(object(), "x", fig)


def test_save_and_log_figure_draws_once_what_the_two_give(tmp_path, monkeypatch):
    """The PNG is the one ``save_figure`` writes and the logged image the one ``log_figure``
    logs, from one drawing; PDF (and non-default ``savefig`` settings) take the two calls."""
    import matplotlib as mpl
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    # (Each drawing re-runs the constrained layout, which moves things slightly: the reference
    # is a fresh figure's first drawing, as save_figure's.)
    reference = imread(save_figure(plot_trace(make_trace(), figsize=(3, 2)), tmp_path / "r.png"))
    fig = plot_trace(make_trace(), figsize=(3, 2))
    draws = []
    draw = FigureCanvasAgg.draw
    monkeypatch.setattr(FigureCanvasAgg, "draw", lambda self: draws.append(1) or draw(self))
    writer = SummaryWriter(tmp_path / "w")
    path = save_and_log_figure(fig, tmp_path / "one.png", writer, "trace/mlp", step=2)
    writer.close()
    assert len(draws) == 1
    assert np.array_equal(imread(path), reference)
    acc = EventAccumulator(str(tmp_path / "w"))
    acc.Reload()
    (event,) = acc.Images("trace/mlp")
    assert (event.step, event.width, event.height) == (2, 300, 200)
    logged = imread(io.BytesIO(event.encoded_image_string))
    assert np.array_equal(logged[..., :3], reference[..., :3])
    draws.clear()
    writer = SummaryWriter(tmp_path / "w2")
    assert save_and_log_figure(fig, tmp_path / "a.pdf", writer, "pdf").stat().st_size > 0
    with mpl.rc_context({"savefig.dpi": 50}):
        small = save_and_log_figure(fig, tmp_path / "small.png", writer, "small")
    writer.close()
    assert len(draws) >= 2 and imread(small).shape[:2] == (100, 150)
    with pytest.raises(TypeError, match="TensorBoardLogger or a SummaryWriter"):
        save_and_log_figure(fig, tmp_path / "x.png", object(), "x")


def _boxes(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer(), fig.bbox


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("figsize", [(4.0, 2.2), (3.0, 2.0)])
def test_average_plot_keeps_labels_inside_and_apart(figsize):
    """Row labels such as 'first subject token (4)' are not cropped at the left edge, and the
    colour bar's 'AIE' label does not overlap the title."""
    rng = np.random.default_rng(1)
    agg = average_traces([make_trace(scores=torch.tensor(rng.uniform(0, 1, (4, 3)),
                                                         dtype=torch.float32))
                          for _ in range(3)])
    fig = plot_average(agg, figsize=figsize)
    renderer, page = _boxes(fig)
    ax, cbar = fig.axes
    for label in ax.get_yticklabels():
        box = label.get_window_extent(renderer)
        assert box.x0 >= page.x0 - 0.5 and box.x1 <= page.x1 + 0.5, label.get_text()
    title = ax.title.get_window_extent(renderer)
    aie = cbar.yaxis.label.get_window_extent(renderer)
    assert cbar.yaxis.label.get_text() == "AIE" and not _overlap(title, aie)


def test_trace_colour_bar_label_clear_of_the_x_label():
    fig = plot_trace(make_trace(kind="mlp"), figsize=(4, 3))
    renderer, page = _boxes(fig)
    ax, cbar = fig.axes
    xlabel = ax.xaxis.label.get_window_extent(renderer)
    answer = cbar.yaxis.label.get_window_extent(renderer)
    assert cbar.yaxis.label.get_text().startswith("p(")
    assert not _overlap(xlabel, answer)
    for box in (xlabel, answer):
        assert page.x0 - 0.5 <= box.x0 and box.x1 <= page.x1 + 0.5
