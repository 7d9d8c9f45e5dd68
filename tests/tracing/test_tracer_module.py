"""``CausalTracer``: Trainer.predict / test over fact records, on one process and under DDP."""

from __future__ import annotations

import json
from dataclasses import dataclass

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from tracing_helpers import peaked_gpt2

from lightning_rome.modules import CausalTracer
from lightning_rome.modules.tracer import fact_records, prompt_seed
from lightning_rome.tracing import GaussianNoise, average_traces, trace_all

FACTS = [
    {"prompt": "The Space Needle is located in the city of", "subject": "Space Needle",
     "attribute": "Seattle", "known_id": 0},
    {"prompt": "Vinson Massif is located in the continent of", "subject": "Vinson Massif",
     "attribute": "Antarctica", "known_id": 1},
    {"prompt": "Beats Music is owned by", "subject": "Beats Music", "attribute": "Apple",
     "known_id": 2},
]
KW = dict(kinds=("hidden", "mlp", "hidden/sever=mlp"), window=2, samples=2)


@dataclass  # (Lightning refuses frozen dataclasses inside a batch list)
class Fact:
    prompt: str
    subject: str
    attribute: str


def _trainer(**kw):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, **kw)


def test_fact_records_accept_every_batch_shape():
    want = [("The Space Needle is located in the city of", "Space Needle", "Seattle")]
    collated = torch.utils.data.default_collate(FACTS[:1])
    for batch in (FACTS[:1], FACTS[0], collated, [Fact(*want[0])], Fact(*want[0])):
        assert [(r.prompt, r.subject, r.answer) for r in fact_records(batch)] == want
    assert fact_records(collated)[0].record_id == 0 and fact_records(FACTS[2])[0].record_id == 2
    assert fact_records(Fact(*want[0]))[0].record_id is None
    with pytest.raises(ValueError, match="'prompt' and 'subject'"):
        fact_records([{"subject": "x"}])


def test_predict_traces_every_prompt_and_averages(gpt2_tokenizer):
    model = peaked_gpt2(n_layer=3)
    tracer = CausalTracer(model, gpt2_tokenizer, **KW)
    out = _trainer().predict(tracer, DataLoader(FACTS, batch_size=2))  # default collate
    assert [len(b) for b in out] == [2, 1]
    traces = [t for b in out for t in b]
    # The noise: ν = 3σ over every subject of the dataset, measured once.
    nu = GaussianNoise.from_subjects(model, gpt2_tokenizer, [f["subject"] for f in FACTS]).nu
    assert traces[0]["mlp"].noise["nu"] == pytest.approx(nu)
    # Each trace is the plain function's, with the per-prompt seed.
    f = FACTS[1]
    seed = prompt_seed(0, fact_records(f)[0])
    direct = trace_all(model, gpt2_tokenizer, f["prompt"], f["subject"], KW["kinds"],
                       window=2, samples=2, noise=nu, seed=seed)
    assert traces[1] == direct
    # The aggregates are the average of the traces.
    for label in KW["kinds"]:
        expect = average_traces([t[label] for t in traces])
        torch.testing.assert_close(tracer.aggregates[label].aie, expect.aie, equal_nan=True)
        assert tracer.aggregates[label].ate == pytest.approx(expect.ate)
    assert tracer.suggested_layer == tracer.aggregates["mlp"].best_layer()


def test_test_loop_logs_dedupes_and_saves(gpt2_tokenizer, tmp_path):
    model = peaked_gpt2(n_layer=3)
    tracer = CausalTracer(model, gpt2_tokenizer, **KW, save_dir=str(tmp_path),
                          noise_subjects=["Space Needle"])
    # Records as objects, one per batch, with a duplicate (as a padding sampler would add).
    records = [Fact(f["prompt"], f["subject"], f["attribute"]) for f in FACTS] + [
        Fact(FACTS[0]["prompt"], FACTS[0]["subject"], FACTS[0]["attribute"])]
    (metrics,) = _trainer().test(tracer, DataLoader(records, batch_size=1,
                                                    collate_fn=lambda b: b))
    assert len(tracer.traces) == 4 and tracer.aggregates["hidden"].n_prompts == 3
    agg = tracer.aggregates["mlp"]
    assert metrics["trace/mlp/ate"] == pytest.approx(agg.ate)
    assert metrics["trace/mlp/peak_layer"] == agg.best_layer()
    saved = json.loads((tmp_path / "aggregate-hidden-sever=mlp.json").read_text())
    assert saved["sever"] == "mlp" and saved["n_prompts"] == 3


def test_attribute_answers_warn_when_the_model_disagrees(gpt2_tokenizer):
    tracer = CausalTracer(peaked_gpt2(n_layer=2), gpt2_tokenizer, kinds=("hidden",), samples=2,
                          answer="attribute", noise=0.5)
    with pytest.warns(UserWarning, match="does not complete"):
        _trainer().predict(tracer, DataLoader(FACTS[:1], batch_size=1))
    assert tracer.traces[0]["hidden"].answer == " Seattle"
    with pytest.raises(ValueError, match="answer must be"):
        CausalTracer(peaked_gpt2(n_layer=2), gpt2_tokenizer, answer="object")


def test_known_facts_datamodule_batches(gpt2_tokenizer):
    from lightning_rome.data import KnownFactsDataModule

    tracer = CausalTracer(peaked_gpt2(n_layer=2), gpt2_tokenizer, kinds=("hidden",), samples=2)
    out = _trainer().predict(tracer, datamodule=KnownFactsDataModule(limit=3, batch_size=2))
    traces = [t["hidden"] for b in out for t in b]
    assert [t.prompt for t in traces][:2] == ["Vinson Massif is located in the continent of",
                                               "Beats Music is owned by"]
    assert traces[0].tokens[traces[0].subject_range[0]:traces[0].subject_range[1]] == [
        "V", "inson", " Mass", "if"]
    assert tracer.aggregates["hidden"].n_prompts == 3


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_aggregate_equals_single_process(gpt2_tokenizer, tmp_path):
    model = peaked_gpt2(n_layer=3)
    single = CausalTracer(model, gpt2_tokenizer, **KW)
    _trainer().test(single, DataLoader(FACTS, batch_size=1))
    tracer = CausalTracer(model, gpt2_tokenizer, **KW, save_dir=str(tmp_path))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.test(tracer, DataLoader(FACTS, batch_size=1))  # 3 prompts: one rank gets a repeat
    for label in KW["kinds"]:
        saved = json.loads((tmp_path / f"aggregate-{label.replace('/', '-')}.json").read_text())
        assert saved["n_prompts"] == 3
        ref = single.aggregates[label]
        got = torch.tensor([[float("nan") if v is None else v for v in row]
                            for row in saved["aie"]], dtype=torch.float64)
        torch.testing.assert_close(got, ref.aie, equal_nan=True, rtol=0, atol=1e-9)
        assert saved["ate"] == pytest.approx(ref.ate, abs=1e-9)
