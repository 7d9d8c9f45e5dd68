"""Smoke tests of the examples (offline, on the cached fact-knowing model)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


@pytest.mark.timeout(600)
def test_edit_callback_example_flips_the_fact(capsys):
    import edit_callback

    out = edit_callback.main([])
    assert out["before_new"] < 0.05
    assert out["after_new"] > out["after_true"]
    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed


def _event_tags(log_dir: str) -> tuple[set[str], set[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: set[str] = set()
    images: set[str] = set()
    for events in Path(log_dir).rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
        images |= set(acc.Tags()["images"])
    return scalars, images


@pytest.mark.timeout(600)
def test_tensorboard_example_logs_edit_metrics_and_trace_images(tmp_path):
    import tensorboard_logging

    out = tensorboard_logging.main(["--out", str(tmp_path / "tb"), "--epochs", "2"])
    # ROME on a fact the model knows: P[o*] > P[o^c] afterwards, and still after fine-tuning.
    assert out["efficacy"] == 1.0 and out["post_ES"] == 1.0
    scalars, images = _event_tags(out["log_dir"])
    assert {"rome/efficacy_mean", "edit_eval/post/ES", "edit_eval/post/EM",
            "causal_trace/0/mlp/peak_ie", "causal_trace/0/total_effect",
            "train/lm_loss"} <= scalars
    assert "causal_trace/0" in images
    assert [h["moment"] for h in out["trace_history"] if h["kind"] == "mlp"] == [
        "epoch=0", "epoch=1"]


@pytest.mark.timeout(600)
def test_trace_dataset_example_suggests_the_mlp_peak(tmp_path):
    import trace_dataset

    out = trace_dataset.main(["--facts", "3", "--samples", "2", "--out", str(tmp_path)])
    assert out["n_prompts"] == 3 and set(out["aggregates"]) == {"hidden", "mlp", "attn"}
    mlp = out["aggregates"]["mlp"]
    last_subject = mlp.classes.index("last subject token")
    expected = int(torch.nan_to_num(mlp.aie[last_subject], nan=-1e9).argmax())
    assert out["suggested_layer"] == expected and 0 <= expected < 4
    assert Path(out["plot"]).stat().st_size > 1000
    assert (tmp_path / "aggregate-mlp.json").is_file()


@pytest.mark.timeout(900)
@pytest.mark.parametrize("method", ["mend", "ke"])
def test_train_hypernetwork_example(method, tmp_path, capsys):
    import math

    import train_mend_counterfact

    rows = train_mend_counterfact.main(["--method", method, "--steps", "4", "--train-cases",
                                        "8", "--batch-size", "2", "--eval-cases", "2",
                                        "--n-layer", "2", "--n-embd", "32",
                                        "--log-dir", str(tmp_path)])
    name = f"{method.upper()}-CF"
    assert set(rows) == {"unedited", f"{name} (untrained)", name}
    for row in rows.values():
        for key in ("ES", "PS", "NS"):
            assert 0.0 <= row[key]["mean"] <= 1.0
        assert math.isfinite(row["EM"]["mean"])
    assert list(tmp_path.rglob(f"{method}-cf.ckpt"))
    assert name in capsys.readouterr().out


@pytest.mark.ddp
@pytest.mark.timeout(900)
def test_ddp_evaluation_example_matches_one_process(tmp_path, capfd):
    """Two ddp_spawn processes (gloo, CPU) give the numbers of one process, each case once, and
    no `sync_dist` warning (the spawned processes write to the captured file descriptors)."""
    import ddp_evaluation

    out = ddp_evaluation.main(["--devices", "2", "--cases", "4", "--out", str(tmp_path / "ddp")])
    assert "sync_dist" not in capfd.readouterr().err
    ranks = list(out["per_rank"].values())
    assert len(ranks) == 2 and all(ranks)
    assert not set(ranks[0]) & set(ranks[1])  # no case evaluated twice
    from lightning_rome.data import CounterFactDataModule

    dm = CounterFactDataModule("counterfact/counterfact-val.json", limit=4)
    dm.setup("test")
    assert sorted(ranks[0] + ranks[1]) == sorted(dm.test_dataset.case_ids)
    summary = out["summary"]
    assert summary["n_cases"] == 4 and summary["n_errors"] == 0
    one = ddp_evaluation.main(["--devices", "1", "--strategy", "auto", "--cases", "4", "--out",
                               str(tmp_path / "one")])["summary"]
    for phase in ("pre", "post"):
        assert set(summary[phase]) == set(one[phase])
        for key, r in one[phase].items():
            assert summary[phase][key]["mean"] == pytest.approx(r["mean"], abs=1e-6), key
            assert summary[phase][key]["n"] == r["n"], key
    # The demo model knows these facts: unedited it never prefers the new object; ROME at the
    # subject's last token (the demo-model preset) does on two of these four (ES 0.50 on 50).
    assert summary["pre"]["pre/ES"]["mean"] == 0.0 and summary["post"]["post/ES"]["mean"] >= 0.25


@pytest.mark.timeout(600)
def test_mass_edit_example_edits_counterfact_in_chunks_and_reverts(capsys):
    import mass_edit

    out = mass_edit.main(["--n", "12", "--chunk", "6"])
    assert out["n"] == 12 and out["patches"] == 2
    # The first cases of counterfact-val.json are facts the demo model was trained on, so
    # unedited it prefers the true object (ES 0); the demo-model preset (at the subject's last
    # token) reaches ES 0.29 on 100 of them (presets/memit.yaml) and 0.25 on these 12.
    assert out["before"]["ES"]["mean"] == 0.0
    assert out["after"]["ES"]["mean"] >= 2 / 12
    assert out["edits_per_second"] > 0
    assert out["restored"]  # every chunk's patch reverted bit-exactly
    printed = capsys.readouterr().out
    assert "12 COUNTERFACT cases" in printed and "edits/s" in printed
