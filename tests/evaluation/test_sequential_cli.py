"""The sequential benchmark from a YAML config through LightningCLI (``lightning-rome test``):
the curve in the results folder, TensorBoard events, the plot, and resuming a finished run."""

from __future__ import annotations

import json

from testutils import REPO

from lightning_rome.cli import main
from lightning_rome.evaluation import load_curve

CONFIG = REPO / "configs" / "tiny" / "sequential-fact-alphaedit.yaml"


def _argv(tmp_path):
    return ["test", "--config", str(CONFIG), "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--model.init_args.results_dir", str(tmp_path / "results")]


def test_lightning_cli_runs_the_benchmark_logs_and_plots(tmp_path):
    assert main(_argv(tmp_path)) == 0
    curve = load_curve(tmp_path / "results")
    assert curve["complete"]
    assert [p["edits"] for p in curve["points"]] == [0, 2, 4, 6]
    assert curve["key"]["editor"]["method"] == "alphaedit"
    assert curve["points"][-1]["efficacy"] is not None
    png = tmp_path / "results" / "curves.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("sequential/retain_accuracy")]
    assert steps == [0, 2, 4, 6]
    # Run again: the finished curve is read back (nothing is edited again) and logged.
    mtime = (tmp_path / "results" / "checkpoint.safetensors").stat().st_mtime_ns
    assert main(_argv(tmp_path)) == 0
    assert (tmp_path / "results" / "checkpoint.safetensors").stat().st_mtime_ns == mtime
    assert json.loads((tmp_path / "results" / "curve.json").read_text())["complete"]
