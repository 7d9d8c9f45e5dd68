"""ZsREDataModule on MEND's 1k training sample and on small fixtures."""

from __future__ import annotations

import json
import re

import pytest
from cf_fixtures import write_json

from lightning_rome.data import (
    MalformedRecordError,
    MalformedRecordWarning,
    ZsREDataModule,
    parse_zsre_record,
)
from lightning_rome.requests import EditRequest

ZSRE = "zsre/zsre_mend_train_1k.json"


def test_real_file_counts_fields_and_the_two_empty_targets(shared_data):
    raw = json.loads((shared_data / ZSRE).read_text())
    assert len(raw) == 1000
    dm = ZsREDataModule(ZSRE)
    dm.prepare_data()
    with pytest.warns(MalformedRecordWarning) as rec:
        dm.setup("test")
    cases = dm.test_dataset.records
    # 1,000 records: 998 valid, and the two whose new target `alt` is "" are reported by id.
    assert len(cases) == 998
    assert [c for c, _ in dm.test_dataset.malformed] == [534, 723]
    assert [raw[i]["alt"] for i in (534, 723)] == ["", ""]
    assert "case 534: the new target 'alt' is empty" in str(rec[0].message)
    assert "case 723:" in str(rec[0].message)

    c = cases[0]
    assert c.request == EditRequest(prompt="What is the product made by {}?", subject="UniFirst",
                                    target_new="unmanned aircraft", target_true="uniform",
                                    case_id=0)
    assert c.paraphrase_prompts == ("What will be the product of UniFirst?",)
    assert c.neighborhood_prompts == ("nq question: john goodman's character in the big lebowski?",)
    assert c.neighborhood_answers == ("Walter Sobchak",)
    assert c.attribute_prompts == () and c.generation_prompts == () and c.relation_id is None
    assert c.source == "zsre"

    # Every valid case, against the raw record: case id = position, src round trip, targets.
    assert [x.case_id for x in cases] == [i for i in range(1000) if i not in (534, 723)]
    for case in cases:
        r = raw[case.case_id]
        assert case.request.text == r["src"]
        assert case.request.subject == r["subject"]  # every subject is literally in src here
        assert case.request.target_new == r["alt"]
        assert case.request.target_true == r["answers"][0]
        assert case.paraphrase_prompts == (r["rephrase"],)
        assert case.neighborhood_prompts == (r["loc"] + "?",)
        assert case.neighborhood_prompts[0].startswith("nq question: ")
        assert case.neighborhood_answers == (r["loc_ans"],)


def test_real_file_strict_names_both_cases(shared_data):
    with pytest.raises(MalformedRecordError) as err:
        ZsREDataModule(ZSRE, strict=True).setup("test")
    assert [c for c, _ in err.value.problems] == [534, 723]
    assert re.search(r"case 534: .*alt.*case 723:", str(err.value))
    # A range that avoids them is fine even when strict.
    dm = ZsREDataModule(ZSRE, strict=True, test_split="0:534")
    dm.setup("test")
    assert dm.test_dataset.case_ids == list(range(534))


def _rec(**kw):
    base = {"subject": "UniFirst", "src": "What is the product made by UniFirst?",
            "pred": "uniform", "rephrase": "What will be the product of UniFirst?",
            "alt": "unmanned aircraft", "answers": ["uniform", "workwear"],
            "loc": "nq question: who plays the cat in the hat movie", "loc_ans": "Mike Myers",
            "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?"}
    return base | kw


def test_subject_case_mismatch_is_handled_and_reported(tmp_path):
    recs = [
        _rec(),
        _rec(subject="the Beatles", src="Which label signed The Beatles?",
             rephrase="The Beatles were signed by which label?"),
        _rec(subject="Yoko Ono", src="Which label signed The Beatles?"),
        _rec(answers=[]),
        _rec(src=None),
    ]
    path = write_json(tmp_path / "z.json", recs)
    dm = ZsREDataModule(path, cache_dir=tmp_path / "hf")
    with pytest.warns(UserWarning) as rec:
        dm.setup("test")
    msgs = [str(w.message) for w in rec]
    assert any("case 1: subject 'the Beatles' matched 'The Beatles'" in m for m in msgs)
    assert any("skipped 3 malformed" in m for m in msgs)
    a, b = dm.test_dataset.records
    assert a.request.subject == "UniFirst"
    assert b.request.prompt == "Which label signed {}?"
    assert b.request.subject == "The Beatles"  # as written in src: its tokens are in the prompt
    reasons = dict(dm.test_dataset.malformed)
    assert "'Yoko Ono' is not in src" in reasons[2]
    assert "answers" in reasons[3]
    assert "src" in reasons[4]


def test_loc_suffix_and_case_ids_from_field():
    case = parse_zsre_record(_rec(case_id=42), 0, loc_suffix="")
    assert case.case_id == 42
    assert case.neighborhood_prompts == ("nq question: who plays the cat in the hat movie",)
    assert parse_zsre_record(_rec(), 7).case_id == 7
    assert parse_zsre_record(_rec(), 7).request.target_true == "uniform"  # answers[0]
