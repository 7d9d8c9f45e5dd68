"""Batched teacher-forced scoring and generation: the one routine that editing, evaluation and
tracing share for probabilities and text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lightning_rome.tokens import continuation_ids, encode_prompt

__all__ = [
    "Batch",
    "candidate_nll",
    "candidate_probs",
    "forward_logits",
    "generate",
    "make_batch",
    "pad_sequences",
    "target_nll",
    "top_predictions",
]

Side = Literal["left", "right"]


@dataclass
class Batch:
    """Padded token ids with everything a forward pass needs.

    Attributes:
        input_ids: ``(B, T)``.
        attention_mask: ``(B, T)``, 1 on real tokens.
        position_ids: ``(B, T)``, counting real tokens only, so left padding gives the same
            positions as no padding.
        lengths: ``(B,)`` real lengths.
        offsets: ``(B,)`` index of each row's first real token (non-zero only with left padding).
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    lengths: Tensor
    offsets: Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask,
                                              self.position_ids, self.lengths, self.offsets)))

    def index(self, row: int, pos: int) -> int:
        """The padded index of unpadded token ``pos`` in ``row``."""
        return int(self.offsets[row]) + pos


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, side: Side = "right",
                  device: torch.device | str | None = None) -> Batch:
    """Pad token-id lists into a :class:`Batch` on the given side."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("cannot pad an empty batch or an empty sequence")
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    offsets = torch.zeros(len(seqs), dtype=torch.long)
    for i, s in enumerate(seqs):
        o = T - len(s) if side == "left" else 0
        ids[i, o:o + len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, o:o + len(s)] = 1
        offsets[i] = o
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    lengths = mask.sum(-1)
    batch = Batch(ids, mask, pos, lengths, offsets)
    return batch.to(device) if device is not None else batch


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def make_batch(tokenizer: PreTrainedTokenizerBase, seqs: Sequence[Sequence[int]],
               side: Side | None = None, device: torch.device | str | None = None) -> Batch:
    """Pad with the tokenizer's pad id and (by default) its padding side."""
    return pad_sequences(seqs, _pad_id(tokenizer), side or tokenizer.padding_side, device)


def forward_logits(model: nn.Module, batch: Batch) -> Tensor:
    """Logits ``(B, T, V)`` for a padded batch, with explicit positions so that padding on either
    side gives the same numbers as running each row alone."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, use_cache=False)
    return out.logits


@torch.no_grad()
def candidate_nll(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    candidates: Sequence[str],
    *,
    batch_size: int | None = None,
    side: Side | None = None,
) -> list[Tensor]:
    """Per-token negative log-likelihood of each candidate after its prompt, teacher-forced.

    Pair ``i`` is ``(prompts[i], candidates[i])``; candidates follow the leading-space rule of
    :func:`lightning_rome.tokens.continuation_ids`. All pairs run in one padded forward pass (or
    in chunks of ``batch_size``).

    Returns:
        One float32 tensor per pair, ``(n_candidate_tokens,)``: ``-log P(c_j | prompt, c_<j)``.
        ``exp(-nll.mean())`` is the probability the papers compare.

    Example:
        >>> nll = candidate_nll(model, tok, ["The capital of France is"] * 2, ["Paris", "Rome"])
        >>> bool(nll[0].mean() < nll[1].mean())
        True
    """
    if len(prompts) != len(candidates):
        raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidates")
    if not prompts:
        return []
    device = model_device(model)
    p_ids = [encode_prompt(tokenizer, p) for p in prompts]
    c_ids = [continuation_ids(tokenizer, c) for c in candidates]
    step = batch_size or len(prompts)
    out: list[Tensor] = []
    for s in range(0, len(prompts), step):
        pp, cc = p_ids[s:s + step], c_ids[s:s + step]
        batch = make_batch(tokenizer, [p + c[:-1] for p, c in zip(pp, cc)], side, device)
        logp = F.log_softmax(forward_logits(model, batch).float(), dim=-1)  # (B, T, V)
        for i, (p, c) in enumerate(zip(pp, cc)):
            # Token c_j is predicted at unpadded position len(p) - 1 + j.
            rows = torch.arange(len(c), device=device) + batch.index(i, len(p) - 1)  # (n_c,)
            target = torch.as_tensor(c, device=device)  # (n_c,)
            out.append(-logp[i, rows, target].cpu())
    return out


def candidate_probs(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                    prompts: Sequence[str], candidates: Sequence[str], **kwargs: object,
                    ) -> Tensor:
    """``P = exp(-mean NLL)`` per pair, ``(n_pairs,)``: the papers' probability of a candidate."""
    nll = candidate_nll(model, tokenizer, prompts, candidates, **kwargs)  # type: ignore[arg-type]
    return torch.stack([torch.exp(-n.mean()) for n in nll]) if nll else torch.empty(0)


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 20,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    stop_at_eos: bool = False,
    return_prompt: bool = True,
) -> list[str]:
    """Greedy (``top_k=None``) or top-k sampled generation from a batch of prompts.

    The batch is left-padded and decoded incrementally with the KV cache. The attention mask
    passed at every step covers the *whole* sequence so far (a mask for only the new token is
    silently mis-padded by transformers 5.x). An empty prompt starts from the BOS/EOS token, as
    the ROME code does for its context templates.

    Args:
        top_k: sample among the ``k`` most likely tokens; ``None`` or ``1`` is greedy.
        generator: a seeded ``torch.Generator`` (on the model's device) for reproducible samples.
        stop_at_eos: stop a row at the EOS token (it is not included in the text).
        return_prompt: return prompt + continuation (the default) or the continuation alone.
    """
    device = model_device(model)
    start = next((t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id,
                              getattr(model.config, "bos_token_id", None)) if t is not None), None)
    if start is None and any(not p for p in prompts):
        raise ValueError("an empty prompt needs a BOS or EOS token to start from")
    seqs = []
    for p in prompts:
        ids = encode_prompt(tokenizer, p) if p else []
        seqs.append(ids or [int(start)])
    batch = pad_sequences(seqs, _pad_id(tokenizer), "left", device)
    ids, mask, pos = batch.input_ids, batch.attention_mask, batch.position_ids
    B = ids.shape[0]
    new = torch.empty((B, 0), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    past = None
    step_ids, step_pos = ids, pos
    for _ in range(max_new_tokens):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                    past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[:, -1].float()  # (B, V)
        if top_k is None or top_k <= 1:
            nxt = logits.argmax(-1)  # (B,)
        else:
            vals, idx = logits.topk(top_k, dim=-1)  # (B, k)
            choice = torch.multinomial(F.softmax(vals, -1), 1, generator=generator)  # (B, 1)
            nxt = idx.gather(-1, choice).squeeze(-1)  # (B,)
        if stop_at_eos and tokenizer.eos_token_id is not None:
            done = done | (nxt == tokenizer.eos_token_id)
            nxt = torch.where(done, torch.full_like(nxt, _pad_id(tokenizer)), nxt)
        new = torch.cat([new, nxt[:, None]], dim=1)  # (B, n)
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)  # (B, T + n): the whole mask
        step_pos = (step_pos[:, -1:] + 1)  # (B, 1)
        step_ids = nxt[:, None]
        if stop_at_eos and bool(done.all()):
            break
    texts = []
    for i in range(B):
        cont_mask = mask[i, ids.shape[1]:].bool()
        cont = tokenizer.decode(new[i][cont_mask[: new.shape[1]]].tolist())
        texts.append((prompts[i] + cont) if return_prompt else cont)
    return texts


def target_nll(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
               targets: Sequence[str], *, side: Side = "right") -> Tensor:
    """Mean per-token NLL of each target after its prompt, teacher-forced, **differentiable**
    (the training loss of FT, MEND and KE). Same tokenization as :func:`candidate_nll`.

    Returns:
        ``(n,)`` float32, ``-1/|o| Σ_j log P(o_j | prompt, o_<j)`` per pair.
    """
    if len(prompts) != len(targets) or not prompts:
        raise ValueError(f"need equally many prompts and targets, got {len(prompts)} and "
                         f"{len(targets)}")
    device = model_device(model)
    p_ids = [encode_prompt(tokenizer, p) for p in prompts]
    c_ids = [continuation_ids(tokenizer, c) for c in targets]
    batch = make_batch(tokenizer, [p + c[:-1] for p, c in zip(p_ids, c_ids)], side, device)
    n, T = len(prompts), max(len(c) for c in c_ids)
    pos = torch.zeros((n, T), dtype=torch.long)
    ids = torch.zeros((n, T), dtype=torch.long)
    mask = torch.zeros((n, T))
    for i, (p, c) in enumerate(zip(p_ids, c_ids)):
        pos[i, : len(c)] = torch.arange(len(c)) + batch.index(i, len(p) - 1)
        ids[i, : len(c)] = torch.as_tensor(c)
        mask[i, : len(c)] = 1.0
    pos, ids, mask = pos.to(device), ids.to(device), mask.to(device)
    logp = F.log_softmax(forward_logits(model, batch).float(), dim=-1)  # (n, L, V)
    tok_logp = logp[torch.arange(n, device=device)[:, None], pos, ids]  # (n, T)
    return -(tok_logp * mask).sum(1) / mask.sum(1)  # (n,)


@torch.no_grad()
def top_predictions(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                    k: int = 5) -> list[list[tuple[str, float]]]:
    """The ``k`` most likely next tokens after each prompt, with their probabilities."""
    device = model_device(model)
    batch = make_batch(tokenizer, [encode_prompt(tokenizer, p) for p in prompts], "right", device)
    logits = forward_logits(model, batch).float()  # (B, T, V)
    last = logits[torch.arange(len(prompts), device=device), batch.lengths - 1]  # (B, V)
    probs, ids = F.softmax(last, -1).topk(k, dim=-1)  # (B, k)
    return [[(tokenizer.decode([int(i)]), float(p)) for i, p in zip(row_i, row_p)]
            for row_i, row_p in zip(ids, probs)]
