"""GE against hand computations, and the word tokenizer against Treebank/NLTK conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_rome.metrics import GenerationEntropy
from lightning_rome.metrics.functional import generation_entropy, ngram_entropy, word_tokenize


def H(*freqs):
    """Entropy in bits of a distribution given by counts."""
    p = np.array(freqs, float) / sum(freqs)
    return float(-(p * np.log2(p)).sum())


def test_hand_computed_entropy_of_a_tiny_text():
    # tokens a b a b a: bigrams ab, ba, ab, ba -> counts (2, 2); trigrams aba, bab, aba -> (2, 1)
    expected = (2 / 3 * H(2, 2) + 4 / 3 * H(2, 1)) / 2
    assert expected == pytest.approx((2 / 3 * 1.0 + 4 / 3 * 0.9182958340544896) / 2)
    assert ngram_entropy("a b a b a") == pytest.approx(expected, abs=1e-12)


def test_punctuation_is_tokenized_before_counting():
    text = "Hello, world. Hello, world."
    assert word_tokenize(text) == ["Hello", ",", "world", ".", "Hello", ",", "world", "."]
    # bigrams: (Hello ,)x2 (, world)x2 (world .)x2 (. Hello)x1; trigrams: 6 of which 2 repeat
    expected = (2 / 3 * H(2, 2, 2, 1) + 4 / 3 * H(2, 2, 1, 1)) / 2
    assert ngram_entropy(text) == pytest.approx(expected, abs=1e-12)


def test_repetitive_text_scores_lower_and_short_text_is_zero():
    fluent = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris."
    looping = "Paris Paris Paris Paris Paris Paris Paris Paris Paris Paris Paris Paris Paris"
    assert ngram_entropy(looping) == 0.0
    assert ngram_entropy(fluent) > 3.0
    assert ngram_entropy("") == 0.0
    assert ngram_entropy("one") == 0.0
    # two tokens: one bigram (H2 = 0), no trigram
    assert ngram_entropy("one two") == 0.0


def test_per_case_then_over_cases():
    t1, t2, t3 = "a b a b a", "x y z w", "p q p q"
    e1, e2, e3 = (ngram_entropy(t) for t in (t1, t2, t3))
    # case 0: two texts; case 1: one text
    expected = ((e1 + e2) / 2 + e3) / 2
    assert generation_entropy([[t1, t2], t3]).item() == pytest.approx(expected, abs=1e-6)
    m = GenerationEntropy()
    m.update(generated_texts=[[t1, t2]])
    m.update(generated_texts=[t3])
    ci = m.compute_with_ci()
    case_values = np.array([(e1 + e2) / 2, e3])
    se = case_values.std(ddof=1) / math.sqrt(2)
    assert ci["mean"] == pytest.approx(expected, abs=1e-12)
    assert ci["ci_high"] - ci["mean"] == pytest.approx(1.96 * se, abs=1e-12)


def test_custom_orders_and_weights():
    # unigram entropy of "a b a b a" only: counts (3, 2)
    assert ngram_entropy("a b a b a", ns=(1,), weights=(1.0,)) == pytest.approx(H(3, 2))
    m = GenerationEntropy(ns=(1,), weights=(1.0,))
    m.update(generated_texts=["a b a b a"])
    assert m.compute().item() == pytest.approx(H(3, 2), abs=1e-6)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        (
            "Mr. Smith doesn't live in the U.S. anymore.",
            ["Mr.", "Smith", "does", "n't", "live", "in", "the", "U.S.", "anymore", "."],
        ),
        (
            "I can't, won't and cannot go; they're gonna win!",
            [
                "I",
                "ca",
                "n't",
                ",",
                "wo",
                "n't",
                "and",
                "can",
                "not",
                "go",
                ";",
                "they",
                "'re",
                "gon",
                "na",
                "win",
                "!",
            ],
        ),
        (
            'She said "yes." Then (at 10:30) it cost $1,000.',
            [
                "She",
                "said",
                "``",
                "yes",
                ".",
                "''",
                "Then",
                "(",
                "at",
                "10:30",
                ")",
                "it",
                "cost",
                "$",
                "1,000",
                ".",
            ],
        ),
        (
            "Wait... what? The end -- really",
            ["Wait", "...", "what", "?", "The", "end", "--", "really"],
        ),
        (
            "He's the players' coach, I'd say.",
            ["He", "'s", "the", "players", "'", "coach", ",", "I", "'d", "say", "."],
        ),
        ("etc. and so on", ["etc.", "and", "so", "on"]),
        ("", []),
    ],
)
def test_word_tokenize(text, tokens):
    assert word_tokenize(text) == tokens


def test_bad_inputs():
    with pytest.raises(ValueError, match="generated_texts holds no cases"):
        generation_entropy([])
    with pytest.raises(ValueError, match=r"generated_texts\[1\] \(case 1\) has no texts"):
        generation_entropy(["a b c", []])
    with pytest.raises(TypeError, match="must be a sequence of cases"):
        generation_entropy("just one string")
    with pytest.raises(TypeError, match=r"generated_texts\[0\] must be a str or a list of str"):
        generation_entropy([[1, 2]])
    with pytest.raises(ValueError, match="needs generated_texts"):
        GenerationEntropy().update()
    with pytest.raises(ValueError, match="ns and weights"):
        GenerationEntropy(ns=(2, 3), weights=(1.0,))
