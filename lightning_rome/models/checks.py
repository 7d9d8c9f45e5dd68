"""Up-front checks that a tokenizer's output fits a model, so that a mismatch is reported by name
instead of as ``IndexError: index out of range in self`` from deep inside an embedding."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

__all__ = ["IncompatibleInputError", "check_requests", "check_texts", "check_token_ids",
           "max_positions"]

# Families whose learned absolute position embeddings fail beyond ``max_positions`` (rotary
# models run past it, with degraded quality, and are not checked).
_ABSOLUTE_POSITIONS = {"gpt2": "n_positions", "gpt_neo": "max_position_embeddings"}


class IncompatibleInputError(ValueError):
    """The tokenizer and the model do not match, or an input is longer than the model accepts."""


def _vocab_rows(model: nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return int(emb.num_embeddings) if isinstance(emb, nn.Embedding) else None


def max_positions(model: nn.Module) -> int | None:
    """The longest input of a model with learned absolute positions (``None``: not limited)."""
    config = getattr(model, "config", None)
    attr = _ABSOLUTE_POSITIONS.get(getattr(config, "model_type", None) or "")
    value = getattr(config, attr, None) if attr else None
    return int(value) if isinstance(value, int) else None


def check_token_ids(model: nn.Module, sequences: Iterable[Sequence[int]], *,
                    what: str = "input") -> None:
    """Raise :class:`IncompatibleInputError` if a token id has no embedding row in ``model`` or a
    sequence is longer than its position embeddings."""
    rows, limit = _vocab_rows(model), max_positions(model)
    for ids in sequences:
        if rows is not None and ids and max(ids) >= rows:
            raise IncompatibleInputError(
                f"the tokenizer produced token id {max(ids)} for this {what}, but the model's "
                f"embedding has only {rows} rows: the tokenizer does not match the model")
        if limit is not None and len(ids) > limit:
            raise IncompatibleInputError(
                f"this {what} is {len(ids)} tokens long; the model accepts at most {limit} "
                "(its position embeddings): shorten it")


def check_texts(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], *,
                extra_tokens: int = 0, what: str = "prompt") -> None:
    """:func:`check_token_ids` on the tokenized ``texts``, each lengthened by ``extra_tokens``
    (a target or a context prefix that will be added to it)."""
    for text in texts:
        ids = list(tokenizer(text)["input_ids"])
        check_token_ids(model, [ids + [0] * extra_tokens], what=f"{what} {_short(text)}")


def check_requests(model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Iterable[Any],
                   contexts: Sequence[str] = ()) -> None:
    """Check every request's prompt, with its target appended and the longest context prefix
    in front, against ``model`` (see :func:`check_token_ids`)."""
    from lightning_rome.tokens import continuation_ids

    prefix = max((len(tokenizer(c.replace("{}", ""), add_special_tokens=False)["input_ids"])
                  for c in contexts), default=0)
    for r in requests:
        target = list(continuation_ids(tokenizer, r.target_new))
        ids = list(tokenizer(r.text)["input_ids"])
        check_token_ids(model, [ids + target], what=f"request {_short(r.text)}")
        check_token_ids(model, [ids + target + [0] * prefix],
                        what=f"request {_short(r.text)} (with its longest context template)")


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")
