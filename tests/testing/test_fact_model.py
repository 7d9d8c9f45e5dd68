"""The synthetic knowledge base and the small GPT-2 that knows its facts.

The default fact model is trained once (about a minute on two busy CPU cores) and cached under
``$LIGHTNING_ROME_CACHE``; after that these tests only load it. Plumbing tests (cache, corruption,
determinism of training) use a tiny config that trains in a few seconds in ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast

from lightning_rome.models import load_model, load_tokenizer
from lightning_rome.requests import EditRequest
from lightning_rome.scoring import generate
from lightning_rome.testing import (
    RELATIONS,
    FactModelConfig,
    KBConfig,
    KnowledgeBase,
    accuracy,
    answered,
    get_fact_model,
    known_facts,
    predicted_objects,
    prefers,
    text_corpus,
    train_fact_model,
)
from lightning_rome.testing.fact_model import MANIFEST, _load, build_tokenizer
from lightning_rome.tokens import continuation_ids, encode_prompt, fill, subject_span
from lightning_rome.utils.io import CorruptFileError

# A config that trains in a few seconds: for the cache and determinism plumbing only.
TINY = FactModelConfig(kb=KBConfig(n_subjects=6, relations_per_subject=2), vocab_size=400,
                       wikitext_lines=0, n_layer=2, n_embd=32, n_head=2, steps=8,
                       batch_size=8, warmup_steps=2, target_accuracy=0.0)


@pytest.fixture(scope="module")
def fm():
    return get_fact_model()


@pytest.fixture(scope="module")
def sample(fm):
    """Every 20th fact (30 facts, all six relations)."""
    return fm.kb.facts[::20]


# ------------------------------------------------------------------------------------------------
# Knowledge base


def test_kb_is_deterministic_and_seeded():
    a, b = KnowledgeBase(), KnowledgeBase()
    assert a.fingerprint() == b.fingerprint()
    assert a.facts == b.facts and a.subjects == b.subjects
    c = KnowledgeBase(KBConfig(seed=1))
    assert c.fingerprint() != a.fingerprint()
    assert c.subjects != a.subjects


def test_kb_structure():
    kb = KnowledgeBase()
    assert len(kb.subjects) == len(set(kb.subjects)) == 200
    assert len(kb) == 600 and [f.index for f in kb.facts] == list(range(600))
    assert set(kb.relations) == {r.name for r in RELATIONS} and len(kb.relations) == 6
    for s in kb.subjects:
        first, last = s.split(" ")
        assert first[0].isupper() and last[0].isupper()
        assert len(kb.facts_about(s)) == 3
        assert len({f.relation for f in kb.facts_about(s)}) == 3
    # First names are shared, so subjects are told apart by the last name.
    assert len({s.split()[0] for s in kb.subjects}) < len(kb.subjects) / 2
    for f in kb.facts:
        rel = kb.relations[f.relation]
        assert f.object in rel.objects and f.candidates == rel.objects
        assert len(f.train_prompts) == 4 and len(f.paraphrase_prompts) == 2
        assert set(f.train_prompts) | set(f.paraphrase_prompts) == set(rel.templates)
        assert not set(f.train_prompts) & set(f.paraphrase_prompts)
        # One held-out template with the subject at the start, one in the middle.
        assert f.paraphrase_prompts[0] in rel.start_templates
        assert f.paraphrase_prompts[1] in rel.middle_templates
        assert kb.fact(f.subject, f.relation) is f
    # Every template is trained with some subjects and held out for others.
    for rel in kb.relations.values():
        facts = kb.find(relation=rel.name)
        for t in rel.templates:
            held = sum(t in f.paraphrase_prompts for f in facts)
            assert 0 < held < len(facts)
        # Objects are spread over the pool, multi-word ones included.
        used = {f.object for f in facts}
        assert len(used) >= 8 and any(" " in o for o in used)


def test_templates_place_subject_at_start_middle_and_after_punctuation():
    templates = [t for r in RELATIONS for t in r.templates]
    assert all(t.count("{}") == 1 for t in templates)
    starts = [t for t in templates if t.startswith("{}")]
    after_punct = [t for t in templates if t[: t.index("{}")].rstrip()[-1:] in (",", ":", ".")]
    middle = [t for t in templates if not t.startswith("{}") and t not in after_punct]
    assert len(starts) == 18 and len(after_punct) >= 5 and len(middle) >= 5
    for r in RELATIONS:
        assert len(r.objects) == len(set(r.objects)) == 10
        assert sum(" " in o for o in r.objects) == 2


def test_edit_requests():
    kb = KnowledgeBase()
    reqs = kb.edit_requests(50, seed=3)
    assert len(reqs) == 50 and all(isinstance(r, EditRequest) for r in reqs)
    assert len({r.subject for r in reqs}) == 50  # each for a distinct subject
    for r in reqs:
        f = kb.facts[r.case_id]
        assert kb.fact_of(r) is f
        assert (r.subject, r.target_true, r.prompt) == (f.subject, f.object, f.train_prompts[0])
        assert r.target_new != r.target_true and r.target_new in kb.objects(f.relation)
    assert kb.edit_requests(50, seed=3) == reqs
    assert kb.edit_requests(50, seed=4) != reqs
    para = kb.edit_requests(5, seed=3, template="paraphrase")
    assert [r.prompt for r in para] == [kb.facts[r.case_id].paraphrase_prompts[0] for r in para]
    assert [r.subject for r in para] == [r.subject for r in reqs[:5]]
    one = kb.edit_requests(10, relation="profession")
    assert all(kb.relation_of(r.prompt) == "profession" for r in one)
    assert kb.edit_requests(0) == []
    with pytest.raises(ValueError, match="only 200 subjects"):
        kb.edit_requests(201)
    with pytest.raises(ValueError, match=">= 0"):
        kb.edit_requests(-1)
    with pytest.raises(KeyError, match="unknown relation"):
        kb.edit_requests(1, relation="eats")


def test_neighbor_facts():
    kb = KnowledgeBase()
    req = kb.edit_requests(1, seed=0)[0]
    rel = kb.relation_of(req.prompt)
    same = [f for f in kb.find(relation=rel, object=req.target_true) if f.subject != req.subject]
    n = len(same) + 5
    nb = kb.neighbor_facts(req, n)
    assert len(nb) == n == len({f.subject for f in nb})
    assert all(f.relation == rel and f.subject != req.subject for f in nb)
    # Facts sharing the true object (COUNTERFACT's neighbourhood) come first.
    assert {f.index for f in nb[: len(same)]} == {f.index for f in same}
    assert all(f.object != req.target_true for f in nb[len(same):])
    assert kb.neighbor_facts(req, n) == nb
    with pytest.raises(ValueError, match="only"):
        kb.neighbor_facts(req, 1000)
    with pytest.raises(KeyError, match="not a template"):
        kb.neighbor_facts(EditRequest("{} likes", req.subject, "x"), 1)


def test_text_corpus():
    kb = KnowledgeBase()
    corpus = list(kb.text_corpus())
    assert len(corpus) == 4 * len(kb)
    f = kb.facts[0]
    assert corpus[0] == fill(f.train_prompts[0], f.subject)[0] + f" {f.object}."
    assert len(list(kb.text_corpus("paraphrase"))) == 2 * len(kb)
    assert list(text_corpus()) == corpus


def test_kb_config_validation():
    with pytest.raises(ValueError, match="unknown relation"):
        KBConfig(relations=("lives_in", "eats"))
    with pytest.raises(ValueError, match="relations_per_subject"):
        KBConfig(relations=("lives_in",), relations_per_subject=2)
    with pytest.raises(ValueError, match="n_subjects"):
        KBConfig(n_subjects=1)
    kb = KnowledgeBase(KBConfig(n_subjects=10, relations_per_subject=1,
                                relations=("lives_in", "profession")))
    assert len(kb) == 10 and set(kb.relations) == {"lives_in", "profession"}


# ------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_round_trip(fm):
    tok = fm.tokenizer
    assert isinstance(tok, PreTrainedTokenizerFast) and tok.is_fast and len(tok) == 2048
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == 0
    text = "Q: What language does Norix Lorix speak? A: Brazilian Portuguese."
    assert tok.decode(tok(text)["input_ids"]) == text
    # The saved tokenizer, reloaded through the package's loader, is the same.
    again = load_tokenizer(fm.path)
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    # Subject spans are found for every fact under every template, and cover the subject.
    lengths = []
    for f in fm.kb.facts:
        for t in f.prompts("all"):
            s0, s1 = subject_span(tok, t, f.subject)
            ids = encode_prompt(tok, fill(t, f.subject)[0])
            assert tok.decode(ids[s0:s1]).strip() == f.subject
            lengths.append(s1 - s0)
    assert min(lengths) >= 4 and max(lengths) <= 8  # made-up names: several tokens each
    # Single-word objects are one token, multi-word objects two or more.
    for rel in fm.kb.relations.values():
        for o in rel.objects:
            n = len(continuation_ids(tok, o))
            assert (n >= 2) if " " in o else (n == 1), (o, n)


def test_gpt2_tokenizer_option():
    cfg = FactModelConfig(tokenizer="gpt2")
    tok = build_tokenizer(cfg)
    assert len(tok) == 50257 and tok.eos_token == tok.pad_token == "<|endoftext|>"
    kb = KnowledgeBase()
    for f in kb.facts[:30]:
        for t in f.prompts("all"):
            s0, s1 = subject_span(tok, t, f.subject)
            assert s1 - s0 >= 2
    assert cfg.key() != FactModelConfig().key()


# ------------------------------------------------------------------------------------------------
# The trained model


def test_model_shape_and_mode(fm):
    m = fm.model
    assert type(m).__name__ == "GPT2LMHeadModel" and not m.training
    assert (m.config.n_layer, m.config.n_embd, m.config.vocab_size) == (4, 96, 2048)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in m.parameters())
    assert fm.stats["n_params"] == sum(p.numel() for p in m.parameters())
    assert fm.config == FactModelConfig() and fm.path.name == FactModelConfig().key()


def test_recorded_accuracy(fm):
    """Measured at build time over all 600 facts."""
    assert fm.stats["accuracy_train"] >= 0.9
    assert fm.stats["accuracy_paraphrase"] >= 0.9
    assert fm.stats["train_seconds"] > 0 and fm.stats["steps"] >= FactModelConfig().steps


def test_knows_facts_on_training_and_held_out_templates(fm, sample):
    acc_train = accuracy(fm.model, fm.tokenizer, sample, "train")
    acc_para = accuracy(fm.model, fm.tokenizer, sample, "paraphrase")
    assert acc_train >= 0.9 and acc_para >= 0.9, (acc_train, acc_para)
    # Control: the same facts with a wrong object (the next one in the pool) are not "known".
    wrong = [replace(f, object=f.candidates[(f.candidates.index(f.object) + 1) % 10])
             for f in sample]
    assert accuracy(fm.model, fm.tokenizer, wrong, "paraphrase") <= 0.1
    assert known_facts(fm.model, fm.tokenizer, wrong[:5]) == []


def test_known_facts_and_their_edit_requests(fm):
    known = fm.known_facts
    assert len(known) >= 0.85 * len(fm.kb)  # answered under all six prompts
    some = known[::40]
    assert known_facts(fm.model, fm.tokenizer, some) == some  # re-measured independently
    reqs = fm.edit_requests(20, seed=1)
    indices = {f.index for f in known}
    assert all(r.case_id in indices for r in reqs) and len({r.subject for r in reqs}) == 20
    assert fm.kb.edit_requests(5, seed=1, among=some)[0].case_id in {f.index for f in some}
    with pytest.raises(ValueError, match="only 3 subjects"):
        fm.kb.edit_requests(4, among=known[::10][:3])


def test_untrained_model_knows_nothing(fm, sample):
    """Control for the measurement itself: random weights answer about 1 in 10."""
    torch.manual_seed(0)
    fresh = type(fm.model)(fm.model.config).eval()
    assert accuracy(fresh, fm.tokenizer, sample[:10], "paraphrase") <= 0.4


def test_answered_matches_an_independent_computation(fm):
    """The rank test of ``answered`` recomputed with plain forward passes, one pair at a time."""
    kb, tok, model = fm.kb, fm.tokenizer, fm.model
    facts = [f for f in kb.facts if " " in f.object][:2] + kb.facts[:2]
    got = answered(model, tok, facts, "paraphrase")
    for f, row in zip(facts, got):
        for t, ans in zip(f.paraphrase_prompts, row):
            text = t.replace("{}", f.subject)
            means = []
            for c in f.candidates:
                ids = tok(text)["input_ids"] + tok(" " + c)["input_ids"]
                n_c = len(tok(" " + c)["input_ids"])
                with torch.no_grad():
                    logp = F.log_softmax(model(torch.tensor([ids])).logits[0], -1)  # (T, V)
                nll = [-logp[len(ids) - n_c - 1 + j, ids[len(ids) - n_c + j]] for j in range(n_c)]
                means.append(float(sum(nll) / n_c))
            true = f.candidates.index(f.object)
            expected = all(means[true] < m for k, m in enumerate(means) if k != true)
            assert ans == expected


def test_greedy_generation_states_the_fact(fm, sample):
    facts = [f for f in sample if " " not in f.object][:10]
    prompts = [fill(f.paraphrase_prompts[1], f.subject)[0] for f in facts]
    out = generate(fm.model, fm.tokenizer, prompts, max_new_tokens=3, return_prompt=False)
    hits = sum(o.startswith(f" {f.object}") for o, f in zip(out, facts))
    assert hits >= 8, list(zip(out, [f.object for f in facts]))


# ------------------------------------------------------------------------------------------------
# Cache


def test_cache_reuse(fm):
    t0 = time.perf_counter()
    again = get_fact_model()
    elapsed = time.perf_counter() - t0
    assert again.from_cache and again.path == fm.path and elapsed < 20
    assert again.stats == fm.stats
    assert again.model is not fm.model  # a fresh copy that a test may edit
    for (n, p), q in zip(fm.model.named_parameters(), again.model.parameters()):
        assert torch.equal(p, q), n
    model, _ = load_model(fm.path)  # the package's loader reads the cached folder
    assert torch.equal(model.transformer.wte.weight, fm.model.transformer.wte.weight)
    manifest = json.loads((fm.path / MANIFEST).read_text())
    assert manifest["key"] == FactModelConfig().key()
    assert manifest["kb_fingerprint"] == fm.kb.fingerprint()


def test_config_key():
    assert FactModelConfig().key() == FactModelConfig().key()
    assert FactModelConfig(steps=641).key() != FactModelConfig().key()
    assert FactModelConfig(kb=KBConfig(seed=1)).key() != FactModelConfig().key()
    with pytest.raises(ValueError, match="tokenizer"):
        FactModelConfig(tokenizer="llama")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="divisible"):
        FactModelConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="steps"):
        FactModelConfig(steps=0)


def test_tiny_build_reuse_and_corruption(tmp_path):
    first = get_fact_model(TINY, cache_dir=tmp_path)
    assert not first.from_cache and first.path == tmp_path / TINY.key()
    assert set(first.stats) >= {"accuracy_train", "accuracy_paraphrase", "train_seconds"}
    assert get_fact_model(TINY, cache_dir=tmp_path).from_cache
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs

    # A truncated weights file is detected, reported and rebuilt (to the same weights).
    weights = first.path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CorruptFileError, match=r"model\.safetensors"):
        _load(TINY, first.kb, first.path)
    with pytest.warns(UserWarning, match="missing or altered"):
        rebuilt = get_fact_model(TINY, cache_dir=tmp_path)
    assert not rebuilt.from_cache
    assert torch.equal(rebuilt.model.lm_head.weight, first.model.lm_head.weight)

    # A partial folder (no manifest: a build that died before the end) is rebuilt.
    (first.path / MANIFEST).unlink()
    with pytest.warns(UserWarning, match="manifest"):
        assert not get_fact_model(TINY, cache_dir=tmp_path).from_cache

    # A manifest from another config is refused.
    manifest = json.loads((first.path / MANIFEST).read_text())
    manifest["key"] = "0" * 20
    (first.path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CorruptFileError, match="another config"):
        _load(TINY, first.kb, first.path)

    # retrain=True replaces a valid cache.
    assert not get_fact_model(TINY, cache_dir=tmp_path, retrain=True).from_cache
    assert get_fact_model(TINY, cache_dir=tmp_path).from_cache
    shutil.rmtree(tmp_path / TINY.key())


_CHILD = """
import json, sys
from lightning_rome.testing import FactModelConfig, KBConfig, get_fact_model
from lightning_rome.utils.io import tensor_checksum
d = json.loads(sys.argv[2])
kb = d.pop("kb")
cfg = FactModelConfig(kb=KBConfig(**dict(kb, relations=tuple(kb["relations"]))), **d)
fm = get_fact_model(cfg, cache_dir=sys.argv[1])
print(json.dumps({"from_cache": fm.from_cache, "key": fm.path.name,
                  "lm_head": tensor_checksum(fm.model.lm_head.weight)}))
"""


def test_concurrent_threads_train_once(tmp_path):
    results, errors = [], []

    def build():
        try:
            results.append(get_fact_model(TINY, cache_dir=tmp_path))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no corruption may be seen on the way
        threads = [threading.Thread(target=build) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors, errors
    assert sorted(r.from_cache for r in results) == [False, True]
    assert torch.equal(results[0].model.lm_head.weight, results[1].model.lm_head.weight)


@pytest.mark.slow
def test_concurrent_processes_train_once(tmp_path):
    """Two processes build at once: one trains, the other waits on the lock and loads its folder;
    nobody sees a partial folder."""
    args = [sys.executable, "-c", _CHILD, str(tmp_path), json.dumps(asdict(TINY))]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="error::UserWarning")
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "rebuilding" not in err
    res = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sorted(r["from_cache"] for r in res) == [False, True]
    assert res[0]["key"] == res[1]["key"] == TINY.key()
    assert res[0]["lm_head"] == res[1]["lm_head"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [TINY.key(), f"{TINY.key()}.lock"]


def test_training_is_deterministic():
    a, _, sa = train_fact_model(TINY, measure=False)
    b, _, sb = train_fact_model(TINY, measure=False)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert sa["final_loss"] == sb["final_loss"] and "accuracy_train" not in sa
    c, _, _ = train_fact_model(replace(TINY, seed=1), measure=False)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_trains_on_until_the_target_then_warns():
    cfg = replace(TINY, target_accuracy=1.0, max_extra_rounds=1)
    with pytest.warns(UserWarning, match="answers only"):
        _, _, stats = train_fact_model(cfg)
    assert stats["extra_rounds"] == 1 and stats["steps"] == TINY.steps + TINY.steps // 4
    assert min(stats["accuracy_train"], stats["accuracy_paraphrase"]) < 1.0


def _direct_mean_nll(model, tok, prompt: str, obj: str) -> float:
    """The object's mean per-token NLL after the prompt, from one unpadded forward pass."""
    p, t = encode_prompt(tok, prompt), continuation_ids(tok, obj)
    with torch.no_grad():
        logp = model(torch.tensor([p + t])).logits[0].log_softmax(-1)  # (T, V)
    rows = logp[len(p) - 1: len(p) - 1 + len(t)]  # (len(t), V): the positions predicting t
    return float(-rows.gather(1, torch.tensor(t)[:, None]).mean())


def test_prefers_and_predicted_objects_agree_with_direct_forward_passes(fm, sample):
    """The shared comparison helpers of the behaviour tests against one unpadded forward pass
    per (prompt, object): the batched, padded scoring must pick the same winners."""
    model, tok = fm.model, fm.tokenizer
    facts = sample[:8]
    prompts = [fill(f.train_prompts[0], f.subject)[0] for f in facts]
    nll = [{o: _direct_mean_nll(model, tok, p, o) for o in f.candidates}
           for f, p in zip(facts, prompts)]
    assert predicted_objects(model, tok, facts) == [min(n, key=n.get) for n in nll]
    rivals = [next(o for o in f.candidates if o != f.object) for f in facts]
    expected = [n[f.object] < n[r] for f, n, r in zip(facts, nll, rivals)]
    assert prefers(model, tok, prompts, [f.object for f in facts], rivals) == expected
    assert prefers(model, tok, prompts, rivals, [f.object for f in facts]) == [
        not e for e in expected]
    # One string stands for every prompt.
    assert prefers(model, tok, prompts[:2], "Paris", "London") == [
        _direct_mean_nll(model, tok, p, "Paris") < _direct_mean_nll(model, tok, p, "London")
        for p in prompts[:2]]
