"""Tokens: where the subject is in a prompt, and how a target is tokenized as a continuation.

Two rules hold everywhere in the package:

* **Subject spans** come from the tokenizer's character offsets: the subject's tokens are those
  whose characters overlap the subject's characters in the filled-in prompt. This is right for
  byte-level BPE (GPT-2's ``Ġ`` leading spaces) and SentencePiece (``▁``) alike, for subjects at
  the start, after punctuation, or repeated elsewhere in the prompt (only the ``{}`` slot counts).
  Slow tokenizers, which have no offsets, fall back to the reference code's method of tokenizing
  the text before the subject separately.
* **Targets** follow the leading-space rule: the target ``"Paris"`` is scored as the tokens the
  tokenizer produces for ``" Paris"`` right after a word, so that the prompt's tokens followed by
  the target's tokens are exactly the tokens of ``prompt + " " + target``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

from transformers import PreTrainedTokenizerBase

__all__ = [
    "FactToken",
    "SubjectNotFoundError",
    "continuation_ids",
    "encode_prompt",
    "fact_token_index",
    "fill",
    "subject_span",
]

FactToken = Literal["subject_first", "subject_last", "last"]
FACT_TOKENS: tuple[str, ...] = ("subject_first", "subject_last", "last")


class SubjectNotFoundError(ValueError):
    """The subject cannot be located in the prompt's tokens."""


def fill(template: str, subject: str) -> tuple[str, int]:
    """Fill the single ``{}`` of ``template`` with ``subject``.

    Returns:
        The text and the character index where the subject starts.
    """
    if template.count("{}") != 1:
        raise ValueError(f"prompt template must contain '{{}}' exactly once: {template!r}")
    start = template.index("{}")
    return template[:start] + subject + template[start + 2:], start


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The token ids of a prompt, with the tokenizer's own special tokens (BOS for Llama)."""
    return list(tokenizer(text)["input_ids"])


def subject_span(tokenizer: PreTrainedTokenizerBase, template: str, subject: str,
                 ) -> tuple[int, int]:
    """The token span ``[start, end)`` of the subject in ``encode_prompt(fill(template, subject))``.

    Args:
        tokenizer: any Hugging Face tokenizer.
        template: a prompt with ``{}`` exactly once, where the subject goes.
        subject: the subject text (non-empty).

    Raises:
        SubjectNotFoundError: the subject is empty or covers no token.

    Example (GPT-2 tokenizer):
        >>> subject_span(tok, "The mother tongue of {} is", "Danielle Darrieux")
        (4, 8)
    """
    if not subject or not subject.strip():
        raise SubjectNotFoundError(f"the subject is empty: {subject!r}")
    text, c0 = fill(template, subject)
    c1 = c0 + len(subject)
    if tokenizer.is_fast:
        enc = tokenizer(text, return_offsets_mapping=True)
        hits = [
            i
            for i, (a, b) in enumerate(enc["offset_mapping"])
            if b > a and a < c1 and b > c0 and text[max(a, c0):min(b, c1)].strip()
        ]
        if not hits:
            raise SubjectNotFoundError(f"subject {subject!r} covers no token of {text!r}")
        return hits[0], hits[-1] + 1
    # Slow tokenizers: the reference code's prefix method. The prefix's trailing space belongs
    # to the subject's first token (GPT-2's "Ġ", SentencePiece's "▁"): encoded alone it would
    # be a token of its own and shift the start by one, so it is stripped before counting.
    n_special = len(encode_prompt(tokenizer, "")) if tokenizer.bos_token else 0
    prefix = template[: template.index("{}")]
    start = len(encode_prompt(tokenizer, prefix.rstrip())) if prefix.rstrip() else n_special
    end = len(encode_prompt(tokenizer, prefix + subject))
    # Like the offsets rule: a whitespace-only token (a double space) is not a subject token.
    ids = encode_prompt(tokenizer, text)
    while start < end and not tokenizer.decode(ids[start:start + 1]).strip():
        start += 1
    if end <= start:
        raise SubjectNotFoundError(f"subject {subject!r} covers no token of {text!r}")
    return start, end


def fact_token_index(tokenizer: PreTrainedTokenizerBase, template: str, subject: str,
                     fact_token: FactToken = "subject_last") -> int:
    """The index of the token whose key is read or whose value is replaced.

    ``subject_first`` and ``subject_last`` are the first and last subject tokens; ``last`` is the
    prompt's final token.
    """
    if fact_token not in FACT_TOKENS:
        raise ValueError(f"fact_token must be one of {FACT_TOKENS}, got {fact_token!r}")
    if fact_token == "last":
        subject_span(tokenizer, template, subject)  # validates the subject all the same
        return len(encode_prompt(tokenizer, fill(template, subject)[0])) - 1
    start, end = subject_span(tokenizer, template, subject)
    return start if fact_token == "subject_first" else end - 1


@lru_cache(maxsize=65536)
def _continuation_ids(tokenizer: PreTrainedTokenizerBase, target: str) -> tuple[int, ...]:
    anchor = "The"
    base = tokenizer(anchor, add_special_tokens=False)["input_ids"]
    full = tokenizer(f"{anchor} {target}", add_special_tokens=False)["input_ids"]
    if full[: len(base)] == base and len(full) > len(base):
        return tuple(full[len(base):])
    return tuple(tokenizer(f" {target}", add_special_tokens=False)["input_ids"])


def continuation_ids(tokenizer: PreTrainedTokenizerBase, target: str) -> list[int]:
    """The tokens of ``target`` as a word that follows a prompt (the leading-space rule).

    Raises:
        ValueError: the target is empty or whitespace.
    """
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"the target is empty or whitespace: {target!r}")
    ids = list(_continuation_ids(tokenizer, target.strip()))
    if not ids:
        raise ValueError(f"the target {target!r} tokenizes to no tokens")
    return ids


def decode_tokens(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> list[str]:
    """Each id decoded on its own (for plot labels)."""
    return [tokenizer.decode([i]) for i in ids]
