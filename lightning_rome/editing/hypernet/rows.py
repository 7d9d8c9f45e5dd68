"""The token rows a hypernetwork editor reads, and the per-row measures it is trained and judged
with (target NLL and accuracy, locality KL and agreement).

Rows are ``prompt ‖ target`` sequences built by
:func:`~lightning_rome.scoring.teacher_forced_rows` (right-padded, labelled on the target), each
tagged with the case it belongs to; a :class:`lightning_rome.data.LabeledBatch` is one too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lightning_rome.requests import EditRequest, as_requests, check_batch
from lightning_rome.scoring import encode_pairs, teacher_forced_rows
from lightning_rome.tokens import subject_span

__all__ = ["IGNORE_INDEX", "TokenRows", "case_index_of", "checked_requests", "edit_rows",
           "locality_agreement", "locality_kl", "rows_to_device", "target_accuracy",
           "target_row_nll"]

IGNORE_INDEX = -100


class TokenRows(Protocol):
    """What the functions below read from a batch of ``prompt ‖ target`` rows; a
    :class:`lightning_rome.data.LabeledBatch` is one (see :func:`edit_rows`)."""

    input_ids: Tensor  # (N, T)
    attention_mask: Tensor  # (N, T)
    position_ids: Tensor  # (N, T)
    labels: Tensor  # (N, T), -100 off target
    predict_mask: Tensor  # (N, T) bool, positions whose logits predict a target token
    case_index: Tensor  # (N,)


@dataclass
class _Rows:
    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    labels: Tensor
    predict_mask: Tensor
    case_index: Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def edit_rows(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
              targets: Sequence[str], case_index: Sequence[int] | None = None,
              device: torch.device | str | None = None) -> _Rows:
    """``encode_prompt(prompt) + continuation_ids(target)`` rows, right-padded, labelled on the
    target (the conventions of :mod:`lightning_rome.scoring` and
    :func:`lightning_rome.data.labeled_batch`)."""
    if len(prompts) != len(targets) or not prompts:
        raise ValueError(f"need equally many prompts and targets, got {len(prompts)} and "
                         f"{len(targets)}")
    tf = teacher_forced_rows(tokenizer, *encode_pairs(tokenizer, prompts, targets),
                             side="right", full_target=True)
    idx = torch.arange(len(prompts)) if case_index is None else torch.as_tensor(list(case_index))
    rows = _Rows(tf.batch.input_ids, tf.batch.attention_mask, tf.batch.position_ids,
                 tf.labels(IGNORE_INDEX), tf.predict_mask(), idx.long())
    return rows_to_device(rows, device) if device is not None else rows


def _plain(t: Tensor, device: torch.device | None = None) -> Tensor:
    """A tensor usable in autograd: inference tensors (batches moved under Lightning's
    ``inference_mode``) are cloned outside inference mode."""
    if device is not None and t.device != device:
        t = t.to(device)
    return t.clone() if t.is_inference() else t


def rows_to_device(rows: Any, device: torch.device | str | None) -> _Rows:
    dev = torch.device(device) if device is not None else None
    return _Rows(*(_plain(getattr(rows, k), dev) for k in (
        "input_ids", "attention_mask", "position_ids", "labels", "predict_mask")),
        _plain(case_index_of(rows), dev))


def case_index_of(rows: Any) -> Tensor:
    idx = getattr(rows, "case_index", None)
    return torch.arange(rows.input_ids.shape[0]) if idx is None else idx


def _token_logp(logits: Tensor, rows: TokenRows) -> tuple[Tensor, Tensor]:
    """Log-probability of each labelled token at the position predicting it, and the mask."""
    target = rows.labels[:, 1:]  # (N, T-1)
    valid = target != IGNORE_INDEX  # (N, T-1)
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (N, T-1, V)
    tok = logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)  # (N, T-1)
    return tok * valid, valid


def target_row_nll(logits: Tensor, rows: TokenRows) -> Tensor:
    """Mean per-token NLL of each row's target, ``(N,)`` (0 for a row without target)."""
    tok, valid = _token_logp(logits, rows)
    return -tok.sum(1) / valid.sum(1).clamp(min=1)  # (N,)


def target_accuracy(logits: Tensor, rows: TokenRows) -> Tensor:
    """Per row, the fraction of target tokens that are the argmax (teacher-forced), ``(N,)``."""
    target = rows.labels[:, 1:]  # (N, T-1)
    valid = target != IGNORE_INDEX
    hit = (logits[:, :-1].argmax(-1) == target) & valid  # (N, T-1)
    return hit.sum(1).float() / valid.sum(1).clamp(min=1)  # (N,)


def locality_kl(base_logits: Tensor, edited: Tensor, rows: TokenRows) -> Tensor:
    """``KL(p_θ ‖ p_θ̃)`` of the next-token distributions at the rows' ``predict_mask`` positions,
    averaged over those positions (a scalar)."""
    m = rows.predict_mask.bool()  # (N, T)
    if not bool(m.any()):
        raise ValueError("the locality rows mark no position to compare (predict_mask is empty)")
    logp = F.log_softmax(base_logits[m].float(), dim=-1)  # (P, V)
    logq = F.log_softmax(edited[m].float(), dim=-1)  # (P, V)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


def locality_agreement(base_logits: Tensor, edited: Tensor, rows: TokenRows) -> Tensor:
    """The fraction of ``predict_mask`` positions whose argmax the edit leaves unchanged."""
    m = rows.predict_mask.bool()
    return (base_logits[m].argmax(-1) == edited[m].argmax(-1)).float().mean()


def checked_requests(tokenizer: PreTrainedTokenizerBase, requests: Any,
                      method: str = "this editor") -> list[EditRequest]:
    reqs = check_batch(as_requests(requests), method)
    if not reqs:
        raise ValueError("no edit requests given")
    for r in reqs:
        subject_span(tokenizer, r.prompt, r.subject)  # SubjectNotFoundError names the request
    return reqs
