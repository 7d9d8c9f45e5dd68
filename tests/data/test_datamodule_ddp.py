"""Under DDP (2 CPU processes, ddp_spawn, gloo) the ranks see disjoint cases, each case once.

Lightning's default for ``test`` is a padding ``DistributedSampler`` (a case would be evaluated
twice when the count does not divide); the DataModule's test loader brings its own
``UnrepeatedDistributedSampler``, which Lightning leaves in place. ``predict`` (marked slow: it
spawns again) goes through the same loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from cf_fixtures import many_rome_cases, write_json

from lightning_rome.data import CounterFactDataModule, RecordBatch


class CaseRecorder(L.LightningModule):
    """Records the case ids each rank sees and writes them to ``out/{stage}-rank{r}.json``."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[int] = []

    def test_step(self, batch: RecordBatch, batch_idx: int) -> None:
        assert isinstance(batch, RecordBatch)
        self.seen.extend(batch.case_ids)

    def predict_step(self, batch: RecordBatch, batch_idx: int) -> list[int]:
        self.seen.extend(batch.case_ids)
        return batch.case_ids

    def _dump(self, stage: str) -> None:
        path = Path(self.out) / f"{stage}-rank{self.global_rank}.json"
        path.write_text(json.dumps({"world": self.trainer.world_size, "ids": self.seen}))

    def on_test_end(self) -> None:
        self._dump("test")

    def on_predict_end(self) -> None:
        self._dump("predict")


@pytest.mark.ddp
@pytest.mark.timeout(180)
@pytest.mark.parametrize("stage", ["test", pytest.param("predict", marks=pytest.mark.slow)])
def test_ranks_see_disjoint_cases_covering_all(tmp_path, stage):
    # 21 cases in the file, limit 19 of them; odd so that DistributedSampler would pad.
    path = write_json(tmp_path / "c.json", many_rome_cases(21))
    dm = CounterFactDataModule(path, limit=19, batch_size=2, cache_dir=tmp_path / "hf")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    model = CaseRecorder(str(tmp_path))
    getattr(trainer, stage)(model, datamodule=dm)
    seen = [json.loads((tmp_path / f"{stage}-rank{r}.json").read_text()) for r in range(2)]
    assert [s["world"] for s in seen] == [2, 2]
    r0, r1 = seen[0]["ids"], seen[1]["ids"]
    assert (len(r0), len(r1)) == (10, 9)  # no padding: every case exactly once
    assert not set(r0) & set(r1)
    assert sorted(r0 + r1) == list(range(19))
