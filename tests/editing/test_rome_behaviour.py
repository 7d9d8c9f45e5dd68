"""ROME on the small fact-knowing model: it flips edited facts, generalises to held-out
paraphrases, leaves other subjects alone, and is more specific than fine-tuning the same layer.

Measured (10 requests from ``get_fact_model().edit_requests(10, seed=0)``, preset
``fact-model``: layer 0, 60 steps, clamp 12, weight decay 0.01, C from 2,000 KB sentences):

- efficacy 8/10 (unedited: 0/10) on the model trained with transformers 5.25 (10/10 on the
  5.23-trained one). The two misses: a profession edit ("Yoriel Alton ... pilot"), which the
  essence-drift KL term holds back because its prompt "{} is a" asks for a profession in this KB
  (loss 4.2 after 60 steps; 0.1 with ``kl_factor=0``), and a native-language edit that ends at
  P(German) 0.22 against P(French) 0.26;
- paraphrase (held-out templates) 0.90 (unedited: 0.0);
- specificity: 0.90 of 50 neighbouring facts keep their prediction (FT of the same layer at
  lr 5e-3, 25 steps, flipping the same facts: lower, asserted below).
"""

from __future__ import annotations

import pytest
import torch

from lightning_rome.editing import FT, ROME
from lightning_rome.stats import get_second_moment
from lightning_rome.testing import edit_quality, get_fact_model, prefers

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def fm():
    return get_fact_model()


@pytest.fixture(scope="module")
def requests_(fm):
    return fm.edit_requests(10, seed=0)


def _paraphrases(kb, r):
    return [t.replace("{}", r.subject) for t in kb.fact_of(r).prompts("paraphrase")]


def _measure(fm, reqs, patches):
    """Efficacy, paraphrase and specificity, each edit applied on its own."""
    return edit_quality(fm.model, fm.tokenizer, fm.kb, reqs, patches)


@pytest.fixture(scope="module")
def rome_patches(fm, requests_):
    m, tok, kb = fm.model, fm.tokenizer, fm.kb
    corpus = list(kb.text_corpus())
    cache: dict = {}

    def second_moment(model, t, name):
        if name not in cache:
            cache[name] = get_second_moment(model, t, name, corpus=corpus, n_samples=2000,
                                            cache=False, progress=False).mom2
        return cache[name]

    rome = ROME("fact-model", second_moment=second_moment)
    return [rome.edit(m, tok, [r]) for r in requests_]


def test_unedited_model_knows_the_true_facts(fm, requests_):
    m, tok, kb = fm.model, fm.tokenizer, fm.kb
    eff = [w for r in requests_ for w in prefers(m, tok, [r.text], r.target_new, r.target_true)]
    para = [w for r in requests_
            for w in prefers(m, tok, _paraphrases(kb, r), r.target_new, r.target_true)]
    assert sum(eff) == 0 and sum(para) <= 1


def test_rome_flips_generalises_and_is_specific(fm, requests_, rome_patches):
    before = {n: p.detach().clone() for n, p in fm.model.named_parameters()}
    eff, para, spec = _measure(fm, requests_, rome_patches)
    assert eff >= 0.8, eff          # at least 8 of 10 edits flip the fact (see the docstring)
    assert para >= 0.6, para        # held-out paraphrases: the unedited model scores ~0
    assert spec >= 0.85, spec       # at least 85% of other subjects' answers unchanged
    for n, p in fm.model.named_parameters():
        assert torch.equal(p, before[n])


def test_rome_is_more_specific_than_fine_tuning(fm, requests_, rome_patches):
    m, tok = fm.model, fm.tokenizer
    ft = FT({"layers": [0], "lr": 5e-3, "num_steps": 25})
    ft_patches = [ft.edit(m, tok, [r]) for r in requests_]
    ft_eff, _, ft_spec = _measure(fm, requests_, ft_patches)
    _, _, rome_spec = _measure(fm, requests_, rome_patches)
    assert ft_eff >= 0.9, ft_eff    # a fair comparison: FT flips the facts too
    assert rome_spec > ft_spec, (rome_spec, ft_spec)
