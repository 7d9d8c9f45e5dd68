"""KnownFactsDataModule on ROME's known_1000.json."""

from __future__ import annotations

import json

import pytest
from cf_fixtures import write_json

from lightning_rome.data import KnownFact, KnownFactsDataModule, MalformedRecordError
from lightning_rome.tokens import fill, subject_span


def test_real_file_counts_and_fields(shared_data, gpt2_tokenizer):
    raw = json.loads((shared_data / "known_1000.json").read_text())
    dm = KnownFactsDataModule()  # found under $LIGHTNING_ROME_DATA
    dm.prepare_data()
    dm.setup("predict")
    facts = dm.predict_dataset.records
    assert len(facts) == 1209 == len(raw)
    assert dm.predict_dataset.malformed == []
    assert facts[0] == KnownFact(
        known_id=0, prompt="Vinson Massif is located in the continent of",
        subject="Vinson Massif", attribute="Antarctica", template="{} is located in the continent",
        prediction=" Antarctica. It is the largest of the three", relation_id="P30")
    assert facts[0].prompt_template == "{} is located in the continent of"
    for f, r in zip(facts, raw):
        assert (f.known_id, f.prompt, f.subject, f.attribute) == (
            r["known_id"], r["prompt"], r["subject"], r["attribute"])
        assert fill(f.prompt_template, f.subject)[0] == f.prompt
    # The subject's tokens can be located in every prompt (what causal tracing needs).
    for f in facts[:200]:
        s, e = subject_span(gpt2_tokenizer, f.prompt_template, f.subject)
        ids = gpt2_tokenizer(f.prompt)["input_ids"]
        assert f.subject.strip() in gpt2_tokenizer.decode(ids[s:e])


def test_ranges_and_malformed(tmp_path):
    recs = [{"known_id": i, "subject": f"S{i}", "attribute": "A", "template": "{} is",
             "prediction": " A", "prompt": f"S{i} is", "relation_id": "P1"} for i in range(4)]
    recs[2]["prompt"] = "Someone else is"
    recs[3]["attribute"] = ""
    path = write_json(tmp_path / "k.json", recs)
    dm = KnownFactsDataModule(path, test_split="0:2", cache_dir=tmp_path / "hf")
    dm.setup("test")
    assert dm.test_dataset.case_ids == [0, 1]
    with pytest.raises(MalformedRecordError, match=r"case 2: .*not in the prompt.*case 3: "):
        KnownFactsDataModule(path, strict=True, cache_dir=tmp_path / "hf").setup("test")
