"""``SequentialEditBenchmark``: the sequential-editing benchmark under ``Trainer.test``.

A thin shell over :func:`lightning_rome.evaluation.run_sequential`: it builds the model, the
editor and the benchmark data from its (YAML) arguments, runs the benchmark in its one test step,
logs every point of the curve to the Trainer's logger (TensorBoard: ``sequential/<metric>`` at
step = number of edits), and plots the curves to ``curves.png`` in the results folder::

    lightning-rome test --config configs/tiny/sequential-fact-alphaedit.yaml
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_rome.evaluation.sequential import (
    METRICS,
    SequentialResult,
    SequentialSettings,
    fact_model_benchmark,
    run_sequential,
)

__all__ = ["SequentialEditBenchmark", "plot_curves"]


def plot_curves(results: dict[str, Sequence[dict[str, Any]]], path: str | os.PathLike[str],
                title: str = "") -> Path:
    """Plot each metric against the number of edits, one line per run label, to ``path`` (PNG).

    Args:
        results: ``{label: points}`` (points as :class:`SequentialResult` has them).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 6.5))
    axes = fig.subplots(2, 3).ravel()
    for ax, metric in zip(axes, METRICS):
        for label, points in results.items():
            xs = [p["edits"] for p in points if p.get(metric) is not None]
            ys = [p[metric] for p in points if p.get(metric) is not None]
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.set_title(metric.replace("_", " "))
        ax.set_xlabel("edits")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


class SequentialEditBenchmark(pl.LightningModule):
    """Edit N facts in batches of ``batch_size``, measuring after every ``eval_every`` batches.

    Args:
        model: a model or a name/path; ``"fact-model"`` is the project's synthetic fact model
            (:func:`lightning_rome.testing.get_fact_model`), the only benchmark source so far.
        editor: a method name (``rome``, ``memit``, ``alphaedit``, ...).
        hparams: its hyperparameters (a preset name, a dict or a YAML path).
        n_edits: N.
        batch_size, eval_every, max_new_tokens, top_k, seed, score_batch_size,
            checkpoint_every: see :class:`~lightning_rome.evaluation.SequentialSettings`.
        n_retain_subjects, n_neighbours, n_fluency: see
            :func:`~lightning_rome.evaluation.fact_model_benchmark`.
        stats_corpus: ``"fact-model"`` takes ``C`` from the fact model's training sentences
            (``hparams.mom2_n_samples`` of them); ``None`` uses the editor's ``mom2_dataset``.
        results_dir: the results folder (default ``<default_root_dir>/sequential/<label>``).
        resume: continue an interrupted run in that folder.
        label: the run's name in logs and plots (default: the method).
        plot: write ``curves.png`` at the end.
    """

    def __init__(
        self,
        model: str = "fact-model",
        editor: str = "alphaedit",
        hparams: Any = None,
        *,
        n_edits: int = 100,
        batch_size: int = 1,
        eval_every: int = 10,
        max_new_tokens: int = 30,
        top_k: int = 5,
        seed: int = 0,
        score_batch_size: int | None = 512,
        checkpoint_every: int = 1,
        n_retain_subjects: int = 40,
        n_neighbours: int = 3,
        n_fluency: int = 10,
        stats_corpus: str | None = "fact-model",
        results_dir: str | None = None,
        resume: bool = True,
        label: str | None = None,
        plot: bool = True,
    ) -> None:
        super().__init__()
        from lightning_rome.editing import get_editor

        if model != "fact-model":
            raise ValueError(f"SequentialEditBenchmark supports model='fact-model' so far, got "
                             f"{model!r}")
        if stats_corpus not in (None, "fact-model"):
            raise ValueError(f"stats_corpus must be 'fact-model' or None, got {stats_corpus!r}")
        from lightning_rome.testing import get_fact_model

        fm = get_fact_model()
        self.model, self.tokenizer = fm.model, fm.tokenizer
        self.settings = SequentialSettings(
            batch_size=batch_size, eval_every=eval_every, max_new_tokens=max_new_tokens,
            top_k=top_k, seed=seed, score_batch_size=score_batch_size,
            checkpoint_every=checkpoint_every)
        self.cases, self.retain, self.fluency = fact_model_benchmark(
            fm, n_edits, seed=seed, n_retain_subjects=n_retain_subjects,
            n_neighbours=n_neighbours, n_fluency=n_fluency)
        self.editor = get_editor(editor, hparams)
        if stats_corpus == "fact-model":
            self._use_corpus(list(fm.kb.text_corpus()))
        self.method = editor.lower()
        self.label = label or self.method
        self.results_dir = results_dir
        self.resume = resume
        self.plot = plot
        self.result: SequentialResult | None = None
        self.save_hyperparameters({"editor": editor, "n_edits": n_edits,
                                   "batch_size": batch_size, "eval_every": eval_every,
                                   "label": self.label})

    def _use_corpus(self, corpus: list[str]) -> None:
        """Point the editor's statistics at ``corpus`` (AlphaEdit caches its eigensystem)."""
        from lightning_rome.stats import get_second_moment

        if hasattr(self.editor, "corpus"):
            self.editor.corpus = corpus
            return
        if not hasattr(self.editor, "second_moment"):
            raise MisconfigurationException(
                f"{type(self.editor).__name__} takes no statistics; use stats_corpus=None")
        n = int(getattr(self.editor.hparams, "mom2_n_samples", 2000))

        def second_moment(model: Any, tok: Any, name: str) -> torch.Tensor:
            return get_second_moment(model, tok, name, corpus=corpus, n_samples=n,
                                     progress=False).mom2

        self.editor.second_moment = second_moment

    def _folder(self) -> Path:
        if self.results_dir is not None:
            return Path(self.results_dir)
        safe = "".join(ch if ch.isalnum() or ch in "-_+." else "_" for ch in self.label)
        return Path(self.trainer.default_root_dir) / "sequential" / safe

    @override
    def test_dataloader(self) -> DataLoader:
        return DataLoader([0], batch_size=1, collate_fn=lambda x: x)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        if self.trainer.world_size > 1:
            raise MisconfigurationException("SequentialEditBenchmark runs on one device")
        folder = self._folder()

        def log_point(point: dict[str, Any]) -> None:
            metrics = {f"sequential/{k}": float(point[k]) for k in METRICS
                       if point.get(k) is not None}
            if self.logger is not None:
                self.logger.log_metrics(metrics, step=int(point["edits"]))
            rank_zero_info(f"{self.label}: {point['edits']} edits: " + ", ".join(
                f"{k} {point[k]:.3f}" for k in METRICS if point.get(k) is not None))

        self.result = run_sequential(
            self.model, self.tokenizer, self.editor, self.cases, retain=self.retain,
            fluency_prompts=self.fluency, settings=self.settings, results_dir=folder,
            resume=self.resume, on_point=log_point)
        if self.result.batches_run == 0 and self.logger is not None:
            for p in self.result.points:  # a finished run read back: log its curve again
                log_point(p)
        if self.plot:
            plot_curves({self.label: self.result.points}, folder / "curves.png",
                        title=f"{self.label}: sequential editing, b = {self.settings.batch_size}")
