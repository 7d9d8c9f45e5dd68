"""The small GPT-2 that knows the true facts of real COUNTERFACT cases (the demo's model).

The default model is trained once (a few minutes on two busy CPU cores) and cached under
``$LIGHTNING_ROME_CACHE``; afterwards these tests only load it. The cache plumbing is tested on a
tiny config that trains in a few seconds in ``tmp_path``.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import replace

import pytest
import torch

from lightning_rome.data import parse_counterfact_record
from lightning_rome.testing import (
    CounterFactModelConfig,
    get_counterfact_model,
    measure_cases,
    select_cases,
)
from lightning_rome.testing.counterfact_model import MANIFEST
from lightning_rome.tokens import continuation_ids, encode_prompt

# Trains in a few seconds: for the cache plumbing only (no made-up attributes: the joined rows
# would not fit n_positions with so small a BPE).
TINY = CounterFactModelConfig(n_cases=8, prefix_copies=1, wikitext_rows=16, vocab_size=400,
                              bpe_wikitext_lines=200, n_layer=1, n_embd=32, n_head=2, steps=4,
                              batch_size=8, warmup_steps=2, target_accuracy=0.0,
                              extra_relations=0, multi_fact_rows=0)


@pytest.fixture(scope="module")
def cm():
    return get_counterfact_model()


def _top1(model, tok, prompt: str, answer: str) -> bool:
    """Independent of the package's scorer: one forward pass over prompt + answer, and the
    argmax at every answer position equals the answer's token."""
    p = encode_prompt(tok, prompt)
    a = continuation_ids(tok, answer)
    ids = torch.tensor([p + a])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]  # (T, V)
    pred = logits[len(p) - 1:len(p) + len(a) - 1].argmax(-1)  # (len(a),)
    return pred.tolist() == a


# ------------------------------------------------------------------------------------- the cases
def test_select_cases_reads_the_file_through_the_package_parser(shared_data):
    config = CounterFactModelConfig()
    cases = select_cases(config)
    assert len(cases) == config.n_cases == 300
    records = {r["case_id"]: (i, r) for i, r in enumerate(
        json.loads((shared_data / config.data_file).read_text()))}
    for c in cases[::37]:
        i, raw = records[c.case_id]
        assert c == parse_counterfact_record(raw, i)
        assert c.request.text == raw["prompt"] and c.request.target_true == raw["ground_truth"]
        assert c.paraphrase_prompts == (raw["rephrase_prompt"],)
    subjects = [c.request.subject for c in cases]
    assert len(set(subjects)) == len(subjects)
    for c in cases:  # neighbourhood prompts are about other subjects
        assert not any(s in c.neighborhood_prompts[0] for s in subjects)
        assert c.request.target_new != c.request.target_true
    assert [c.case_id for c in select_cases(config)] == [c.case_id for c in cases]
    assert select_cases(replace(config, n_cases=10)) == cases[:10]


def test_select_cases_too_many():
    with pytest.raises(ValueError, match="usable cases"):
        select_cases(CounterFactModelConfig(n_cases=10**6))


def test_config_validation():
    with pytest.raises(ValueError, match="n_embd"):
        CounterFactModelConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="n_cases"):
        CounterFactModelConfig(n_cases=0)
    with pytest.raises(ValueError, match="prefix_words"):
        CounterFactModelConfig(prefix_words=(5, 2))


# ------------------------------------------------------------------------------- what it knows
def test_model_knows_most_of_its_facts(cm):
    """Measured with the package's scorer on the cached model; the thresholds are below the
    build-time figures (see the module docstring of lightning_rome.testing.counterfact_model)."""
    m = measure_cases(cm.model, cm.tokenizer, cm.cases)
    assert m["accuracy_train"] >= 0.9
    # The neighbourhood prompts (other subjects' facts, one row each) are learnt less well
    # beside the made-up attributes (70% top-1 at build time), but compared as COUNTERFACT does
    # (P(true) > P(new)) almost all are known.
    assert m["accuracy_neighborhood"] >= 0.6
    assert m["pairwise_train"] >= 0.95 and m["pairwise_neighborhood"] >= 0.95
    # Held-out rephrasings: generalisation is partial at this size, but above chance.
    assert m["pairwise_paraphrase"] > 0.6
    assert len(m["known_case_ids"]) >= 150  # the demo edits 100 at once
    # The figures stored at build time are those of this model.
    for k in ("accuracy_train", "accuracy_paraphrase", "accuracy_neighborhood",
              "pairwise_paraphrase", "known_case_ids"):
        assert cm.stats[k] == m[k], k


def test_top1_agrees_with_an_independent_forward_pass(cm):
    known = {c.case_id for c in cm.known_cases}
    sample = cm.cases[::15]
    for c in sample:
        got = _top1(cm.model, cm.tokenizer, c.request.text, c.request.target_true)
        got_n = _top1(cm.model, cm.tokenizer, c.neighborhood_prompts[0],
                      c.neighborhood_answers[0])
        if c.case_id in known:
            assert got and got_n, c
    assert sum(_top1(cm.model, cm.tokenizer, c.request.text, c.request.target_true)
               for c in sample) >= 0.85 * len(sample)


def test_model_does_not_know_the_counterfactual_targets(cm):
    """The edits' new targets are not what the model predicts: editing has work to do."""
    sample = cm.known_cases[:40]
    assert not any(_top1(cm.model, cm.tokenizer, c.request.text, c.request.target_new)
                   for c in sample)


def test_model_is_a_gpt2_loadable_from_its_folder(cm):
    from lightning_rome.models import load_model

    model, tok = load_model(cm.path, dtype=torch.float32, device="cpu")
    assert type(model).__name__ == "GPT2LMHeadModel"
    for (n, a), b in zip(cm.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), n
    assert tok("Toko Yasuda, the")["input_ids"] == cm.tokenizer("Toko Yasuda, the")["input_ids"]


# ------------------------------------------------------------------------------------- the cache
def test_cache_hit_corruption_and_rebuild(tmp_path):
    a = get_counterfact_model(TINY, cache_dir=tmp_path)
    assert not a.from_cache and len(a.cases) == 8
    b = get_counterfact_model(TINY, cache_dir=tmp_path)
    assert b.from_cache and b.path == a.path
    for x, y in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(x, y)
    b.model.transformer.h[0].mlp.c_proj.weight.data.add_(1.0)  # a copy: the cache is untouched
    assert get_counterfact_model(TINY, cache_dir=tmp_path).from_cache

    weights = a.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="model.safetensors is missing or altered"):
        c = get_counterfact_model(TINY, cache_dir=tmp_path)
    assert not c.from_cache
    for x, y in zip(a.model.parameters(), c.model.parameters()):  # seeded: the same weights
        assert torch.equal(x, y)

    (c.path / MANIFEST).write_text("{ truncated")
    with pytest.warns(UserWarning, match="unreadable manifest"):
        assert not get_counterfact_model(TINY, cache_dir=tmp_path).from_cache

    (c.path / "tokenizer.json").unlink()
    with pytest.warns(UserWarning, match="tokenizer.json is missing"):
        assert not get_counterfact_model(TINY, cache_dir=tmp_path).from_cache
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_counterfact_model(TINY, cache_dir=tmp_path).from_cache
    assert not get_counterfact_model(TINY, cache_dir=tmp_path, retrain=True).from_cache
    assert not list(tmp_path.glob(".*build*"))  # no temporary folder left


def test_cache_key_covers_config_and_data(tmp_path, shared_data, monkeypatch):
    checks = TINY.data_checksums()
    assert TINY.key(checks) == TINY.key() != replace(TINY, steps=5).key()
    # A changed data file gives another key, and a folder built from other data is rejected.
    data = tmp_path / "data"
    (data / "counterfact").mkdir(parents=True)
    shutil.copytree(shared_data / "wikitext-2", data / "wikitext-2")
    records = json.loads((shared_data / TINY.data_file).read_text())
    records[0]["ground_truth"] = "Nowhere"
    (data / TINY.data_file).write_text(json.dumps(records))
    monkeypatch.setenv("LIGHTNING_ROME_DATA", str(data))
    assert TINY.data_checksums() != checks
    assert TINY.key() != TINY.key(checks)
    m = get_counterfact_model(TINY, cache_dir=tmp_path / "cache")
    assert m.cases[0].request.target_true == "Nowhere"
    from lightning_rome.testing.counterfact_model import _load
    from lightning_rome.utils.io import CorruptFileError

    with pytest.raises(CorruptFileError, match="another config"):
        _load(TINY, checks, m.path)


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_ROME_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"counterfact-val\.json"):
        get_counterfact_model(TINY, cache_dir=tmp_path / "cache")


def test_extra_relations_options():
    """The made-up attributes: refused out of range, seeded, drawn from their pools, and off by
    default without changing the default model's cache key."""
    from lightning_rome.testing.counterfact_model import EXTRA_RELATIONS, extra_facts

    with pytest.raises(ValueError, match="extra_relations"):
        CounterFactModelConfig(extra_relations=len(EXTRA_RELATIONS) + 1)
    with pytest.raises(ValueError, match="multi_fact_rows needs extra_relations"):
        CounterFactModelConfig(extra_relations=0, multi_fact_rows=1)
    assert "extra_relations" not in CounterFactModelConfig(extra_relations=0,
                                                           multi_fact_rows=0).to_dict()
    config = CounterFactModelConfig(n_cases=20, extra_relations=2)
    assert config.key() != CounterFactModelConfig(n_cases=20, extra_relations=0,
                                                  multi_fact_rows=0).key()
    cases = select_cases(config)
    facts = extra_facts(config, cases)
    assert facts == extra_facts(config, cases)  # seeded
    assert all([t for t, _ in f] == [t for t, _ in EXTRA_RELATIONS[:2]] for f in facts)
    assert len({o for f in facts for _, o in f}) > 5  # values vary across subjects
    assert extra_facts(CounterFactModelConfig(n_cases=20, extra_relations=0, multi_fact_rows=0),
                       cases) == [[] for _ in cases]


def test_extra_wordings_and_subject_attribute_rows():
    """Further wordings of the made-up relations and subject rows for their attributes: refused
    without extra relations or out of range, off by default (old cache keys kept), and each adds
    exactly its training texts."""
    from lightning_rome.testing.counterfact_model import (
        EXTRA_WORDINGS,
        _fact_texts,
        _wikitext_lines,
        extra_facts,
    )

    with pytest.raises(ValueError, match="extra_wordings"):
        CounterFactModelConfig(extra_relations=0, multi_fact_rows=0, extra_wordings=2)
    with pytest.raises(ValueError, match="extra_wordings"):
        CounterFactModelConfig(extra_relations=1, extra_wordings=0)
    with pytest.raises(ValueError, match="extra_wordings"):
        CounterFactModelConfig(extra_relations=1, extra_wordings=2 + len(EXTRA_WORDINGS[0]))
    with pytest.raises(ValueError, match="subject_attribute_rows"):
        CounterFactModelConfig(extra_relations=0, multi_fact_rows=0, subject_attribute_rows=True)
    with pytest.raises(ValueError, match="subject_attribute_rows"):
        CounterFactModelConfig(extra_relations=1, subject_rows=False, subject_attribute_rows=True)
    d = CounterFactModelConfig(extra_relations=2).to_dict()
    assert "extra_wordings" not in d and "subject_attribute_rows" not in d
    base = CounterFactModelConfig(n_cases=10, extra_relations=2, multi_fact_rows=0,
                                  prefix_copies=0)
    lines = _wikitext_lines(base)
    cases = select_cases(base)
    facts = extra_facts(base, cases)
    texts = set(_fact_texts(base, cases, lines))
    worded = replace(base, extra_wordings=3)
    assert worded.key() != base.key()
    added = set(_fact_texts(worded, cases, lines)) - texts
    expected = {(w, c.request.subject, obj) for c, f in zip(cases, facts)
                for k, (_, obj) in enumerate(f) for w in EXTRA_WORDINGS[k][:2]}
    assert added == expected and all(w.count("{}") == 1 for ws in EXTRA_WORDINGS for w in ws)
    rows = replace(base, subject_attribute_rows=True)
    added = set(_fact_texts(rows, cases, lines)) - texts
    assert added == {("{}", c.request.subject, obj) for c, f in zip(cases, facts)
                     for _, obj in f}
