"""Subject spans and the leading-space rule, with GPT-2's byte-level BPE and SentencePiece-style
tokenizers (with and without a BOS token), fast and slow."""

from __future__ import annotations

import pytest
from tiny_factories import sentencepiece_tokenizer, slow_tokenizer

from lightning_rome.tokens import (
    SubjectNotFoundError,
    continuation_ids,
    encode_prompt,
    fact_token_index,
    fill,
    subject_span,
)

TOKENIZERS = ("gpt2", "unigram", "llama")


@pytest.fixture(scope="module", params=TOKENIZERS)
def tok(request, gpt2_tokenizer):
    return gpt2_tokenizer if request.param == "gpt2" else sentencepiece_tokenizer(request.param)


@pytest.fixture(scope="module", params=TOKENIZERS)
def fast_and_slow(request, gpt2_tokenizer):
    fast = gpt2_tokenizer if request.param == "gpt2" else sentencepiece_tokenizer(request.param)
    return fast, slow_tokenizer(fast)


# (template, subject): at the start, in the middle, after punctuation, followed by punctuation,
# repeated elsewhere in the prompt, multi-word, after a double space.
CASES = [
    ("{} is the capital of", "Paris"),
    ("The mother tongue of {} is", "Danielle Darrieux"),
    ("({}) is", "Paris"),
    ("Who? {}'s", "Paris"),
    ("Where is {}? It is in", "Rome"),
    ("{}, the", "Eiffel Tower"),
    ("Paris is lovely, and {} is in", "Paris"),
    ("{} is where Paris is, and Paris is in", "Paris"),
    ("In Paris, the Eiffel Tower of {} is", "Paris"),
    ("The  {} is", "Eiffel Tower"),
    ("Danielle Darrieux speaks French, and {} speaks", "Danielle Darrieux"),
    ("{}", "Danielle Darrieux"),  # ROME's bare context template
    ("The capital of France is a city. {}", "Eiffel Tower"),  # a generated context + ". {}"
]


def _decoded(tok, ids):
    return tok.decode(ids, skip_special_tokens=True)


def check_span(tok, template: str, subject: str, span: tuple[int, int]) -> None:
    """The span decodes to the subject, and the tokens before it to the text before the slot
    (so a copy of the subject elsewhere in the prompt cannot be the one found)."""
    text, c0 = fill(template, subject)
    ids = encode_prompt(tok, text)
    start, end = span
    assert 0 <= start < end <= len(ids)
    assert _decoded(tok, ids[start:end]).strip().lstrip("▁") == subject.strip()
    # Neither end of the span is a whitespace-only token.
    assert _decoded(tok, ids[start:start + 1]).strip()
    assert _decoded(tok, ids[end - 1:end]).strip()
    assert _decoded(tok, ids[:start]).strip() == text[:c0].strip()
    assert _decoded(tok, ids[end:]).strip() == text[c0 + len(subject):].strip()


@pytest.mark.parametrize(("template", "subject"), CASES)
def test_subject_span_decodes_to_subject(tok, template, subject):
    span = subject_span(tok, template, subject)
    check_span(tok, template, subject, span)


@pytest.mark.parametrize(("template", "subject"), CASES)
def test_fact_token_index(tok, template, subject):
    start, end = subject_span(tok, template, subject)
    text = fill(template, subject)[0]
    ids = encode_prompt(tok, text)
    assert fact_token_index(tok, template, subject, "subject_first") == start
    assert fact_token_index(tok, template, subject, "subject_last") == end - 1
    assert fact_token_index(tok, template, subject, "last") == len(ids) - 1
    # The last subject token ends the subject: with it the decoded prefix ends in the subject.
    assert _decoded(tok, ids[:end]).rstrip().endswith(subject)
    assert not _decoded(tok, ids[:end - 1]).rstrip().endswith(subject)
    # The first subject token starts it.
    assert _decoded(tok, ids[start:]).lstrip().startswith(subject)
    assert not _decoded(tok, ids[start + 1:]).lstrip().startswith(subject)


def test_known_gpt2_spans(gpt2_tokenizer):
    tok = gpt2_tokenizer
    # "The| mother| tongue| of| Dan|ielle| D|arr|ieux| is": ids 4..8.
    assert subject_span(tok, "The mother tongue of {} is", "Danielle Darrieux") == (4, 8)
    assert subject_span(tok, "{} is the capital of", "Paris") == (0, 1)
    assert subject_span(tok, "({}) is", "Paris") == (1, 2)
    assert subject_span(tok, "Who? {}'s", "Paris") == (2, 3)
    # Only the slot counts: "Paris" at token 0 is not the subject.
    assert subject_span(tok, "Paris is lovely, and {} is in", "Paris") == (5, 6)
    assert fact_token_index(tok, "The mother tongue of {} is", "Danielle Darrieux", "last") == 8


def test_llama_like_tokenizer_counts_its_bos():
    tok = sentencepiece_tokenizer("llama")
    ids = encode_prompt(tok, "Paris is")
    assert ids[0] == tok.bos_token_id
    assert subject_span(tok, "{} is", "Paris")[0] == 1  # after the BOS token


def test_subject_with_leading_space(tok):
    # The subject string carries the space; the decoded span is the subject without it.
    start, end = subject_span(tok, "The capital city of{} is", " Paris")
    ids = encode_prompt(tok, "The capital city of Paris is")
    assert _decoded(tok, ids[start:end]).strip() == "Paris"


@pytest.mark.parametrize(("template", "subject"), CASES)
def test_slow_tokenizer_fallback_agrees_with_offsets(fast_and_slow, template, subject):
    fast, slow = fast_and_slow
    assert not slow.is_fast
    text = fill(template, subject)[0]
    assert encode_prompt(slow, text) == encode_prompt(fast, text)  # the same tokens
    span = subject_span(slow, template, subject)
    check_span(slow, template, subject, span)
    assert span == subject_span(fast, template, subject)


def test_bad_subjects_and_templates(tok):
    for subject in ("", "   "):
        with pytest.raises(SubjectNotFoundError, match="empty"):
            subject_span(tok, "{} is", subject)
    with pytest.raises(ValueError, match="exactly once"):
        subject_span(tok, "{} and {} are", "Paris")
    with pytest.raises(ValueError, match="exactly once"):
        subject_span(tok, "no slot", "Paris")
    with pytest.raises(ValueError, match="fact_token must be one of"):
        fact_token_index(tok, "{} is", "Paris", "subject_middle")
    assert fill("The {} is", "sky") == ("The sky is", 4)


PROMPTS = [
    "The mother tongue of Danielle Darrieux is",
    "Paris is the capital of",
    "Who? Paris's",
    "Q: Where is the Eiffel Tower? A:",
    "The Eiffel Tower (in Paris) is located in",
    "Rome",
]
TARGETS = ["French", "Paris", "the United States", "Italy", "Eiffel Tower", "English", "1990",
           "Danielle Darrieux"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_continuation_follows_leading_space_rule(tok, prompt):
    for target in TARGETS:
        expected = encode_prompt(tok, prompt + " " + target)
        assert encode_prompt(tok, prompt) + continuation_ids(tok, target) == expected, target
        # A target given with its leading space is the same target.
        assert continuation_ids(tok, " " + target) == continuation_ids(tok, target)
        assert tok.decode(continuation_ids(tok, target)).strip() == target


def test_continuation_starts_with_a_space_token(gpt2_tokenizer):
    tok = gpt2_tokenizer
    ids = continuation_ids(tok, "Paris")
    assert ids == [6342]  # "ĠParis", not "Paris" (40313)
    assert tok.convert_ids_to_tokens(ids) == ["ĠParis"]
    sp = sentencepiece_tokenizer("llama")
    assert sp.convert_ids_to_tokens(continuation_ids(sp, "Paris"))[0].startswith("▁")
    assert sp.bos_token_id not in continuation_ids(sp, "Paris")


def test_continuation_rejects_empty_targets(tok):
    for target in ("", " ", "\n\t"):
        with pytest.raises(ValueError, match="empty or whitespace"):
            continuation_ids(tok, target)
    with pytest.raises(ValueError, match="empty or whitespace"):
        continuation_ids(tok, None)  # type: ignore[arg-type]


def test_slow_continuation_ids_match_fast(fast_and_slow):
    fast, slow = fast_and_slow
    for target in TARGETS:
        assert continuation_ids(slow, target) == continuation_ids(fast, target)
