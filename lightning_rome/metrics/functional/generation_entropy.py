"""Generation entropy GE (fluency): the weighted n-gram entropy of generated text.

Definition (ROME, §3.2 and Appendix; the released evaluation's ``compute_n_gram_entropy``): for
one text, take the frequency distribution ``f`` of its word bigrams and of its word trigrams,
``H_n = -Σ f log₂ f``, and average the weighted entropies: ``(2/3 · H_2 + 4/3 · H_3) / 2``. A
case's GE is the mean over its generated texts (one per generation prompt); the metric is the mean
over cases. Values are in bits; the papers' tables show them × 100 (626.6 for unedited GPT-2 XL).
A text with fewer than ``n`` words has ``H_n = 0`` (an empty distribution), as in the released code.

Words come from :func:`word_tokenize`, a small rule-based tokenizer written to split text the way
NLTK's ``word_tokenize`` (Penn Treebank conventions) does on ordinary English prose, so that no
NLTK dependency is needed:

- sentences end at ``.``, ``!`` or ``?`` followed by whitespace and an upper-case letter, a digit
  or an opening quote/bracket (or the end of the text), except after abbreviations (a single
  letter, a word with an inner period such as ``U.S.``, or a title such as ``Mr.``); the final
  period of each sentence becomes its own token, other periods stay attached (``etc.``);
- ``,`` and ``:`` split off unless followed by a digit (``1,000`` and ``10:30`` stay whole);
  ``; @ # $ % & ? ! ( ) [ ] { } < > --`` and ``...`` are tokens of their own;
- double quotes become ````` (opening) or ``''`` (closing); a closing single quote splits off;
- clitics split off: ``'s 'm 'd 'll 're 've n't`` (``don't`` → ``do n't``, ``can't`` →
  ``ca n't``), and ``cannot gonna gotta wanna gimme lemme`` split in two.

It differs from NLTK on rarer cases (Punkt's learned abbreviations and sentence splits, Unicode
quotes), which moves GE by far less than its confidence interval.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["generation_entropy", "ngram_entropy", "word_tokenize"]

# Titles and short forms after which a period does not end a sentence.
_TITLES = frozenset(
    "mr mrs ms dr st jr sr prof gen col lt sgt rev gov sen rep mt ft vs no vol fig inc ltd co "
    "corp jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
# A sentence-final mark: the mark, optional closing quotes/brackets, then whitespace and a
# capital, digit or opening quote/bracket.
_SENT_END = re.compile(r"""(?<=[.!?])(["')\]]*)\s+(?=["'(\[`]*[A-Z0-9])""")
_FINAL_PERIOD = re.compile(r"""([^.])(\.)([\])}>"']*)\s*$""")
# Opening double quotes, applied before the final period is split off.
_OPENING_QUOTES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r'^"'), " `` "),
    (re.compile(r'([\s(\[{<])"'), r"\1 `` "),
]
# Everything else, applied to the sentence padded with a space on each side.
_RULES: list[tuple[re.Pattern[str], str]] = [
    # Punctuation.
    (re.compile(r"\.\.\.+"), r" \g<0> "),
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"[;@#$%&?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"[\]\[(){}<>]"), r" \g<0> "),
    (re.compile(r"--"), r" -- "),
    # Closing double quotes.
    (re.compile(r'"'), " '' "),
    # Clitics (the sentence is padded with spaces, so a clitic is always followed by one).
    (re.compile(r"([^' ])('[sSmMdD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
    (re.compile(r"(?i)\b(can)(not)\b"), r"\1 \2"),
    (re.compile(r"(?i)\b(gon|got|wan)(na|ta)\b"), r"\1 \2"),
    (re.compile(r"(?i)\b(gim|lem)(me)\b"), r"\1 \2"),
]


def _is_abbreviation(word: str) -> bool:
    """Whether ``word`` (ending in '.') is an abbreviation rather than a sentence end."""
    stem = word.rstrip(".").lstrip("\"'([`")
    return (len(stem) == 1 and stem.isalpha()) or "." in stem or stem.lower() in _TITLES


def _split_sentences(text: str) -> list[str]:
    sentences: list[str] = []
    start = 0
    for m in _SENT_END.finditer(text):
        before = text[start : m.start()].split()
        if before and before[-1].endswith(".") and _is_abbreviation(before[-1]):
            continue
        sentences.append(text[start : m.end(1)] if m.group(1) else text[start : m.start()])
        start = m.end()
    sentences.append(text[start:])
    return [s for s in sentences if s.strip()]


def word_tokenize(text: str) -> list[str]:
    """Split English text into words and punctuation, following Treebank/NLTK conventions.

    Args:
        text: any string.

    Returns:
        The tokens, in order.

    Example:
        >>> word_tokenize("Mr. Smith doesn't live in the U.S. anymore.")
        ['Mr.', 'Smith', 'does', "n't", 'live', 'in', 'the', 'U.S.', 'anymore', '.']
        >>> word_tokenize("It's 1,000 km!")
        ['It', "'s", '1,000', 'km', '!']
    """
    tokens: list[str] = []
    for sentence in _split_sentences(text):
        s = sentence.strip()
        for pattern, repl in _OPENING_QUOTES:
            s = pattern.sub(repl, s)
        s = _FINAL_PERIOD.sub(r"\1 \2\3 ", s)
        s = " " + s + " "
        for pattern, repl in _RULES:
            s = pattern.sub(repl, s)
        tokens.extend(s.split())
    return tokens


def _ngram_entropy_bits(tokens: Sequence[str], n: int) -> float:
    """``-Σ f log₂ f`` over the frequency distribution of the n-grams of ``tokens``."""
    counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def ngram_entropy(
    text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """The weighted n-gram entropy of one text: ``mean_i(weights[i] · H_{ns[i]})`` in bits.

    Args:
        text: a generated text (ROME scores the prompt together with its continuation).
        ns: the n-gram orders.
        weights: one weight per order.

    Example:
        >>> # 4 distinct bigrams: H_2 = 2 bits; 3 distinct trigrams: H_3 = log2(3) bits
        >>> round(ngram_entropy("the cat sat on mat"), 4)  # (2/3 * 2 + 4/3 * log2(3)) / 2
        1.7233
    """
    if len(ns) != len(weights) or not ns:
        raise ValueError(
            f"ns and weights must be non-empty and of equal length, got {ns}, {weights}"
        )
    if not isinstance(text, str):
        raise TypeError(f"ngram_entropy expects a str, got {type(text).__name__}")
    tokens = word_tokenize(text)
    return sum(w * _ngram_entropy_bits(tokens, n) for n, w in zip(ns, weights)) / len(ns)


def _as_case_texts(generated_texts: Sequence[str | Sequence[str]], name: str) -> list[list[str]]:
    """Normalise to one list of texts per case: a str is a case with one text."""
    if isinstance(generated_texts, str) or not isinstance(generated_texts, Sequence):
        raise TypeError(
            f"{name} must be a sequence of cases (each a str or a list of str), "
            f"got {type(generated_texts).__name__}"
        )
    if len(generated_texts) == 0:
        raise ValueError(f"{name} holds no cases (an empty sequence); pass at least one")
    cases: list[list[str]] = []
    for i, item in enumerate(generated_texts):
        texts = [item] if isinstance(item, str) else item
        if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"{name}[{i}] must be a str or a list of str, got {item!r}")
        if len(texts) == 0:
            raise ValueError(f"{name}[{i}] (case {i}) has no texts; every case needs at least one")
        cases.append(list(texts))
    return cases


def _generation_entropy_update(
    generated_texts: Sequence[str | Sequence[str]],
    ns: Sequence[int] = (2, 3),
    weights: Sequence[float] = (2 / 3, 4 / 3),
) -> Tensor:
    """Per-case GE: the mean n-gram entropy of each case's texts, ``(N,)`` float64 (bits)."""
    cases = _as_case_texts(generated_texts, "generated_texts")
    per_case = [sum(ngram_entropy(t, ns, weights) for t in texts) / len(texts) for texts in cases]
    return torch.tensor(per_case, dtype=torch.float64)  # (N,)


def generation_entropy(
    generated_texts: Sequence[str | Sequence[str]],
    ns: Sequence[int] = (2, 3),
    weights: Sequence[float] = (2 / 3, 4 / 3),
) -> Tensor:
    """Generation entropy GE: weighted bigram/trigram entropy, per case then over cases.

    Args:
        generated_texts: one entry per case: a text, or the list of the case's texts (e.g. one
            per generation prompt).
        ns: n-gram orders (default bigrams and trigrams).
        weights: their weights (default 2/3 and 4/3).

    Returns:
        GE in bits (tables show it × 100).

    Example:
        >>> generation_entropy(["the cat sat on mat", ["a a a a", "the cat sat on mat"]])
        tensor(1.2925)
    """
    per_case = _generation_entropy_update(generated_texts, ns, weights)  # (N,)
    return per_case.mean().to(torch.get_default_dtype())
